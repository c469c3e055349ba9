"""The CUDA C++ backend of kd_loss (``backend="cuda"``): the extension ``fastkd._C_cuda`` built from csrc/kd_cuda.cu,
and the launchers that hand it CUDA tensors.

The extension is prebuilt by setup.py when it finds nvcc and a GPU driver (``FASTKD_BUILD_CUDA=1`` forces it,
``0`` skips it); otherwise it is built just in time on first use, with nvcc and ninja, for the current GPU's
architecture and cached per user (:mod:`fastkd.cuda_build`; ``FASTKD_CUDA_JIT=0`` forbids that; without ninja
the steps run one after another). Kernels are
launched on PyTorch's current stream; nothing synchronises.

What it covers (:func:`covers`): divergences ``"kl"`` and ``"reverse_kl"`` with the hard-label CE term, labels
and ``ignore_index``, one teacher of the student's dtype (float32, float16, bfloat16), gradients to the student
and the teacher. Anything else (JSD, cosine, DKD, ensembles, ``return_stats``, mixed dtypes) runs on the Triton
kernels instead: kd_loss falls back to them, and says so in its docstring. ``backend="auto"`` does not pick
``"cuda"``: it has not been measured against the Triton kernels on a GPU yet.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import torch

from . import cuda_build
from .kernel_args import DTYPE_CODES, NUM_STATS, KDOptions, kd_launch_args

DIVERGENCES = ("kl", "reverse_kl")
_module = None
_failure: str = ""  # why loading the extension failed (kept: a failed build is not retried on every call)


def _import_prebuilt():
    try:
        from . import _C_cuda
    except ImportError:
        return None
    return _C_cuda


def _import_path(path) -> object:
    spec = importlib.util.spec_from_file_location(f"{__package__}.{cuda_build.MODULE}", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _driver_cuda_major():
    """The newest CUDA major version the driver supports (12 for 12.4), None where libcuda cannot be asked."""
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            version = ctypes.c_int()
            if ctypes.CDLL(name).cuDriverGetVersion(ctypes.byref(version)) == 0:
                return version.value // 1000
        except (OSError, AttributeError):
            continue
    return None


def runs_on(archs: str, capability: tuple) -> bool:
    """Whether a module with machine code for ``archs`` ("80,90") and PTX of the last runs on a device of compute
    ``capability`` (major, minor): machine code for X.Y runs on X.Z with Z ≥ Y; the PTX is compiled for newer."""
    built = [(int(a.rstrip("a")[:-1]), int(a.rstrip("a")[-1])) for a in archs.split(",")]
    return (
        any(major == capability[0] and minor <= capability[1] for major, minor in built)
        or tuple(capability) >= built[-1]
    )


def _load():
    capability = torch.cuda.get_device_capability()
    driver = _driver_cuda_major()
    module = _import_prebuilt()
    if (
        module is not None
        and runs_on(module.archs, capability)
        and (driver is None or module.runtime_version // 1000 <= driver)
    ):
        return module
    if os.environ.get("FASTKD_CUDA_JIT", "1") == "0":
        raise RuntimeError(
            "backend='cuda' needs the extension fastkd._C_cuda built for this GPU and driver; it was "
            "not, and FASTKD_CUDA_JIT=0 forbids building it now"
        )
    nvcc = cuda_build.nvcc_major()
    if nvcc is None:
        raise RuntimeError("backend='cuda' needs nvcc to build fastkd._C_cuda for this GPU (set CUDA_HOME)")
    if driver is not None and nvcc > driver:
        raise RuntimeError(
            f"nvcc builds for CUDA {nvcc}, but the driver runs CUDA {driver} at most: a module built "
            "here could not load; use an older CUDA toolkit (CUDA_HOME), or backend='triton'"
        )
    return _import_path(cuda_build.cached_build((f"{capability[0]}{capability[1]}",)))


def extension():
    """The loaded extension: the prebuilt one where it has code for this GPU and the driver runs its CUDA
    runtime, else one built just in time for this GPU (about a minute the first time, cached afterwards).
    Raises RuntimeError, saying why, when neither is possible (and again on later calls, without retrying)."""
    global _module, _failure
    if _module is None:
        if _failure:
            raise RuntimeError(_failure)
        try:
            _module = _load()
        except RuntimeError as exc:
            _failure = str(exc)
            raise
    return _module


def why_unavailable() -> str:
    """Why ``backend="cuda"`` cannot run here ("" when it may: a CUDA device, and the extension prebuilt or
    buildable: nvcc found, just in time allowed). Cheap; whether the module fits this GPU and driver is checked at
    the first launch (:func:`extension`)."""
    if not torch.cuda.is_available():
        return "there is no CUDA device"
    if _failure:
        return _failure
    if _module is not None or _import_prebuilt() is not None:
        return ""
    if os.environ.get("FASTKD_CUDA_JIT", "1") == "0":
        return "fastkd._C_cuda was not built, and FASTKD_CUDA_JIT=0 forbids building it now"
    return (
        ""
        if cuda_build.find_nvcc() is not None
        else "fastkd._C_cuda was not built, and building it now needs nvcc (set CUDA_HOME)"
    )


def available() -> bool:
    return not why_unavailable()


def covers(
    student: torch.Tensor, teacher: torch.Tensor, *, divergence: str, with_metrics: bool, ensemble: bool
) -> bool:
    """Whether the CUDA kernels compute this kd_loss call (see the module docstring); the rest runs on Triton."""
    return (
        divergence in DIVERGENCES
        and not with_metrics
        and not ensemble
        and student.dtype == teacher.dtype
        and student.dtype in DTYPE_CODES
    )


def _launch_args(student, teacher, labels, stats, options: KDOptions, ensemble: str) -> tuple[dict, list]:
    if ensemble != "none" or options.divergence not in DIVERGENCES:
        raise ValueError(f"the CUDA kernels take one teacher and divergences {DIVERGENCES}")
    args, keep = kd_launch_args(student, teacher, labels, stats, options, num_threads=1)
    args["stream"] = torch.cuda.current_stream(student.device).cuda_stream
    return args, keep


def kd_forward(
    student, teacher, labels, options: KDOptions, *, with_metrics=False, teacher_weights=None, ensemble="none"
):
    """Row losses (N,) float32, statistics (NUM_STATS, N) float32 and an empty metrics tensor of (N, V) CUDA
    logits; the contract of :func:`fastkd.kernels.kd.kd_forward` for the calls :func:`covers` accepts."""
    if with_metrics:
        raise ValueError("the CUDA kernels compute no fidelity metrics")
    num_rows = student.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(NUM_STATS, num_rows, dtype=torch.float32, device=student.device)
    args, _keep = _launch_args(student, teacher, labels, stats, options, ensemble)
    args["loss"] = loss.data_ptr()
    with torch.cuda.device(student.device):
        extension().kd_forward(args)
    return loss, stats, torch.empty(0, dtype=torch.float32, device=student.device)


def kd_backward(
    grad_loss,
    student,
    teacher,
    labels,
    stats,
    options: KDOptions,
    *,
    teacher_grad,
    teacher_weights=None,
    ensemble="none",
):
    """Gradients of Σ grad_loss·row_loss w.r.t. student (and teacher if teacher_grad; else an empty tensor),
    contiguous (N, V) in the dtype of their input; the contract of :func:`fastkd.kernels.kd.kd_backward`."""
    grad_s = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    grad_t = torch.empty(teacher.shape if teacher_grad else (0,), dtype=teacher.dtype, device=teacher.device)
    grad_loss, stats = grad_loss.to(torch.float32), stats.contiguous()  # held until the launch has been queued
    args, _keep = _launch_args(student, teacher, labels, stats, options, ensemble)
    args.update(
        grad_loss=grad_loss.data_ptr(),
        grad_loss_stride=grad_loss.stride(0),
        grad_student=grad_s.data_ptr(),
        grad_teacher=grad_t.data_ptr() if teacher_grad else 0,
    )
    with torch.cuda.device(student.device):
        extension().kd_backward(args)
    return grad_s, grad_t
