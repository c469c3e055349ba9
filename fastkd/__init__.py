"""fastkd: knowledge-distillation losses for PyTorch as fused Triton and CUDA (GPU) and C++ (CPU) kernels."""

from . import adapters, datafree, lipschitz, meta, relational, schedules
from .dispatch import backends
from .distiller import Distiller
from .dkd import dkd_loss
from .features import FEED, feature_loss, ofd_margin
from .kd import KDLoss, kd_loss
from .linear_kd import LinearKDLoss, linear_kd_loss
from .lipschitz import london_loss, spectral_norms
from .relational import CRDLoss, graph_kd_loss, rkd_angle_loss, rkd_distance_loss, rkd_loss
from .teacher_cache import TeacherCache
from .teacher_route import TeacherRoute
from .topk import TopK, sampled_teacher, topk_teacher

__version__ = "0.1.0"
__all__ = [
    "kd_loss",
    "KDLoss",
    "linear_kd_loss",
    "LinearKDLoss",
    "dkd_loss",
    "TopK",
    "sampled_teacher",
    "topk_teacher",
    "TeacherCache",
    "TeacherRoute",
    "feature_loss",
    "ofd_margin",
    "FEED",
    "spectral_norms",
    "london_loss",
    "rkd_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "graph_kd_loss",
    "CRDLoss",
    "Distiller",
    "adapters",
    "lipschitz",
    "relational",
    "meta",
    "datafree",
    "schedules",
    "backends",
    "__version__",
]
