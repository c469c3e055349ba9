"""fastkd: knowledge-distillation losses for PyTorch as fused Triton (GPU) and C++ (CPU) kernels."""
from . import adapters, schedules
from .dispatch import backends
from .distiller import Distiller
from .dkd import dkd_loss
from .kd import KDLoss, kd_loss
from .topk import TopK, topk_teacher

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "dkd_loss", "TopK", "topk_teacher", "Distiller", "adapters", "schedules", "backends",
           "__version__"]
