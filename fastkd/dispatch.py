"""Backend choice for every fastkd op, in one place.

Backends:

- ``"triton"``: the fused Triton kernels in :mod:`fastkd.kernels`. Chosen by ``"auto"`` for CUDA tensors of
  dtype float32, float16 or bfloat16. On CPU tensors it runs only under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported), which is how the CPU test-suite exercises the very
  kernel code that runs on the GPU.
- ``"cpu"``: the C++ CPU kernels of the extension ``fastkd._C`` (:mod:`fastkd.cpu_backend`). Chosen by ``"auto"``
  for CPU tensors of dtype float32, float16 or bfloat16 when the extension was built.
- ``"cuda"``: the CUDA C++ kernels of the extension ``fastkd._C_cuda`` (:mod:`fastkd.cuda_backend`), for kd_loss
  only, prebuilt or built just in time on first use. Never chosen by ``"auto"`` (not yet measured against Triton
  on a GPU); a call outside what they cover (:func:`fastkd.cuda_backend.covers`) runs on Triton.
- ``"reference"``: the pure-PyTorch implementation in :mod:`fastkd.reference`, the executable specification.
  Chosen by ``"auto"`` for dtypes the kernels do not take (float64), and for CPU tensors when the extension is
  missing.

The environment variable ``FASTKD_BACKEND`` (``auto``, ``triton``, ``cpu``, ``cuda`` or ``reference``) replaces
``"auto"`` as the default; an explicit ``backend=`` argument always wins.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from . import cpu_backend, cuda_backend

BACKENDS = ("auto", "triton", "cpu", "cuda", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpreted() -> bool:
    """True when Triton runs its interpreter (kernels execute on CPU tensors with numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None  # looked up once: torch.compile traces dispatch


def backends() -> dict:
    """What can run here: ``{"triton": bool, "triton_interpreter": bool, "cuda": bool, "cuda_kernels": bool,
    "cpu": bool, "cpu_isa": str or None, "reference": True}`` (``cuda``: a CUDA device; ``cuda_kernels``: the
    CUDA C++ kernels can run, prebuilt or buildable, see :mod:`fastkd.cuda_backend`; ``cpu``: the C++ extension
    was built; ``cpu_isa``: the instruction set its kernels use, see :mod:`fastkd.cpu_backend`)."""
    return {
        "triton": TRITON_AVAILABLE,
        "triton_interpreter": TRITON_AVAILABLE and triton_interpreted(),
        "cuda": torch.cuda.is_available(),
        "cuda_kernels": cuda_backend.available(),
        "cpu": cpu_backend.AVAILABLE,
        "cpu_isa": cpu_backend.isa(),
        "reference": True,
    }


def launchers(backend: str, triton_module: str):
    """The module whose launchers run ``backend``'s kernels of an op: :mod:`fastkd.cpu_backend` for ``"cpu"``,
    :mod:`fastkd.cuda_backend` for ``"cuda"``, else ``fastkd.kernels.<triton_module>`` (imported here, lazily:
    triton is optional and may need TRITON_INTERPRET set first). All take and return the same things."""
    if backend == "cpu":
        return cpu_backend
    if backend == "cuda":
        return cuda_backend
    return importlib.import_module(f"fastkd.kernels.{triton_module}")


def check_backend_name(requested: str) -> None:
    """Raise ``ValueError`` unless ``requested`` names a backend."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")


def select_backend(
    requested: str,
    *tensors: torch.Tensor,
    op: str = "kd_loss",
    kernels: tuple = ("triton", "cpu"),
    cuda_covers: bool = True,
) -> str:
    """Return ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"reference"`` for the op ``op`` over ``tensors`` (validated
    to share a device); ``kernels`` names the kernel backends the op has (the reference always exists).
    ``cuda_covers``: whether the CUDA kernels compute this call (:func:`fastkd.cuda_backend.covers`); a call they
    do not cover goes to ``"triton"``.

    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` when the backend asked for cannot
    run on these tensors or does not exist for this op.
    """
    check_backend_name(requested)
    explicit = requested != "auto"
    if requested == "auto":
        requested = os.environ.get("FASTKD_BACKEND", "auto")
        if requested not in BACKENDS:
            raise ValueError(f"environment variable FASTKD_BACKEND must be one of {BACKENDS}, got {requested!r}")
    if requested not in ("auto", "reference") and requested not in kernels:
        if explicit:
            raise RuntimeError(f"{op} has no {requested!r} backend yet (it has {kernels + ('reference',)})")
        requested = "auto"  # FASTKD_BACKEND names a backend this op lacks: choose among those it has
    device = tensors[0].device
    kernel_dtypes = True
    for t in tensors:
        kernel_dtypes = kernel_dtypes and t.dtype in KERNEL_DTYPES
    if requested == "auto":
        if "triton" in kernels and device.type == "cuda" and kernel_dtypes and TRITON_AVAILABLE:
            return "triton"
        if "cpu" in kernels and device.type == "cpu" and kernel_dtypes and cpu_backend.AVAILABLE:
            return "cpu"
        return "reference"
    if requested != "reference" and not kernel_dtypes:
        dtypes = sorted({str(t.dtype) for t in tensors})
        raise RuntimeError(
            f"backend={requested!r} takes float32, float16 and bfloat16 tensors, got {dtypes}; "
            "use backend='reference' for other dtypes"
        )
    if requested == "cpu":
        if not cpu_backend.AVAILABLE:
            raise RuntimeError(
                f"backend='cpu' needs the C++ extension fastkd._C, which was not built "
                f"({cpu_backend.IMPORT_ERROR}); reinstall fastkd with a C++17 compiler, or use "
                "backend='reference'"
            )
        if device.type != "cpu":
            raise RuntimeError(f"backend='cpu' runs on CPU tensors, got device {device}")
    if requested == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' runs on CUDA tensors, got device {device}")
        if not cuda_covers:
            requested = "triton"
        elif not cuda_backend.available():
            raise RuntimeError(f"backend='cuda' cannot run here: {cuda_backend.why_unavailable()}")
    if requested == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if device.type == "cpu" and not triton_interpreted():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use backend='reference'"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors (or CPU ones under the interpreter), got device {device}"
            )
    return requested


def kernel_op(name: str):
    """Decorator: register the function as the custom op ``fastkd::<name>`` (``torch.compile`` sees the op and its
    fake kernel, registered with ``.register_fake`` on the result) and return a callable that runs the function
    itself in eager mode. The same code runs either way; in eager mode the op's dispatch (its autograd wrapper, the
    redispatch and the dynamo-disabled backend call) would cost more than the kernels at small shapes: about 45% of
    a kd_loss forward at 8×10 on CPU."""

    def wrap(fn):
        op = torch.library.custom_op(f"fastkd::{name}", mutates_args=())(fn)

        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            return fn(*args, **kwargs)

        call.register_fake = op.register_fake
        call.__doc__, call.__name__ = fn.__doc__, fn.__name__
        return call

    return wrap


def kernel_or_reference(chosen: str, requested: str, op: str, what_needs_grad: str, needs_grad: bool) -> str:
    """``chosen``, or the reference when ``chosen``'s kernels give ``what_needs_grad`` no gradient and it needs one;
    a ``RuntimeError`` instead when a kernel backend was asked for by name (``requested`` not ``"auto"``)."""
    if chosen == "reference" or not needs_grad:
        return chosen
    if requested != "auto":
        raise RuntimeError(
            f"{op}'s {chosen!r} kernels give no gradient to {what_needs_grad}; detach it or use backend='reference'"
        )
    return "reference"
