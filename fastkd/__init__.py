"""fastkd: fused Triton kernels for knowledge-distillation losses in PyTorch."""
from .dispatch import backends
from .dkd import dkd_loss
from .kd import KDLoss, kd_loss
from .topk import TopK, topk_teacher

__version__ = "0.1.0"
__all__ = ["kd_loss", "KDLoss", "dkd_loss", "TopK", "topk_teacher", "backends", "__version__"]
