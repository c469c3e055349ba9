"""The C++ CPU backend: the extension ``fastkd._C`` built from csrc/ (pybind11, OpenMP, AVX-512/AVX2/portable
kernels chosen at run time), and the launchers that hand it CPU tensors.

The extension sees no torch types: each launcher passes data pointers, shapes, row strides and dtype codes, and
allocates the outputs with torch. Rows must have unit column stride; other layouts are copied first. When the
extension was not built (no compiler at install time, ``FASTKD_BUILD_CPU=0``) :data:`AVAILABLE` is False and
CPU tensors run through the reference implementation.

The kernels run on ``torch.get_num_threads()`` threads, or fewer for small inputs (one per 2¹⁵ logits: waking a
thread team costs more than less work). Each row is computed by one thread in a fixed order, so the results are
the same, bit for bit, for every thread count.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from .kernel_args import (
    DTYPE_CODES,
    NUM_METRICS,
    NUM_STATS,
    Divergence,
    DType,
    FeatureKind,
    FeatureNormalize,
    KDOptions,
    TopKOptions,
    feature_groups,
    kd_launch_args,
    kd_scalars,
    rows_spec,
)

try:
    from . import _C
except ImportError as exc:  # not built: the package works without it
    _C = None
    IMPORT_ERROR: Optional[ImportError] = exc
else:
    IMPORT_ERROR = None

AVAILABLE = _C is not None
if AVAILABLE and "FASTKD_CPU_CACHE_BYTES" in os.environ:
    _C.set_cache_limit(int(os.environ["FASTKD_CPU_CACHE_BYTES"]))
FUSED_DIVERGENCES = ("kl", "reverse_kl")


def _extension():
    if _C is None:
        raise RuntimeError(f"the C++ CPU backend (fastkd._C) was not built: {IMPORT_ERROR}")
    return _C


def isa() -> Optional[str]:
    """The instruction set the kernels run with (``"avx512"``, ``"avx2"`` or ``"portable"``), None if not built."""
    return _C.isa() if _C is not None else None


def usable_isas() -> list:
    """Instruction sets compiled into the extension and supported by this CPU, best first."""
    return _C.usable_isas() if _C is not None else []


def set_isa(name: str) -> None:
    """Run the kernels with instruction set ``name`` (one of :func:`usable_isas`), e.g. to test or time the
    portable path on a CPU that has AVX-512."""
    _extension().set_isa(name)


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; from 1 MiB up its memory comes from the extension's buffer pool, which keeps
    released blocks for the next call of the same size (a fresh large allocation is zero-filled page by page on
    first touch, which costs more than the kernels). See :func:`empty_cache`."""
    nbytes = math.prod(shape) * dtype.itemsize
    if _C is None or nbytes < 2**20:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(_C.empty_buffer(nbytes)).view(dtype).view(shape)


def empty_cache() -> None:
    """Free the buffer pool's cached blocks (memory of released kernel outputs kept for reuse)."""
    if _C is not None:
        _C.empty_cache()


def cache_info() -> dict:
    """``{"cached_bytes": ..., "limit_bytes": ...}`` of the buffer pool (0 and 0 without the extension)."""
    if _C is None:
        return {"cached_bytes": 0, "limit_bytes": 0}
    return {"cached_bytes": _C.cached_bytes(), "limit_bytes": _C.cache_limit()}


def set_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` in the buffer pool's free blocks (default 1 GiB, or the environment variable
    ``FASTKD_CPU_CACHE_BYTES``; 0 turns caching off)."""
    _extension().set_cache_limit(int(nbytes))


def _forward(student, teacher, labels, options: KDOptions, with_metrics, grad_scale=None, teacher_grad=False):
    num_rows = student.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32)
    stats = torch.empty(NUM_STATS, num_rows, dtype=torch.float32)
    metrics = torch.empty((NUM_METRICS, num_rows) if with_metrics else (0,), dtype=torch.float32)
    args, _keep = kd_launch_args(student, teacher, labels, stats, options, num_threads=torch.get_num_threads())
    args.update(
        loss=loss.data_ptr(),
        fused_grad_student=0,
        fused_grad_teacher=0,
        grad_scale=1.0,
        metrics=metrics.data_ptr() if with_metrics else 0,
    )
    grads = ()
    if grad_scale is not None:
        grad_s = empty(student.shape, student.dtype)
        grad_t = empty(teacher.shape if teacher_grad else (0,), teacher.dtype)
        args.update(
            fused_grad_student=grad_s.data_ptr(),
            grad_scale=grad_scale,
            fused_grad_teacher=grad_t.data_ptr() if teacher_grad else 0,
        )
        grads = (grad_s, grad_t)
    _extension().kd_forward(args)
    return (loss, stats, metrics) + grads


def _one_teacher(ensemble: str) -> None:
    if ensemble != "none":
        raise ValueError("the C++ kd_loss kernels take one teacher; an ensemble's target is materialised first")


def kd_forward(
    student, teacher, labels, options: KDOptions, *, with_metrics=False, teacher_weights=None, ensemble="none"
):
    """Row losses (N,) float32, statistics (NUM_STATS, N) and metrics (NUM_METRICS, N, or empty without
    ``with_metrics``) float32 of (N, V) CPU logits; the same contract as :func:`fastkd.kernels.kd.kd_forward`,
    for one teacher."""
    _one_teacher(ensemble)
    return _forward(student, teacher, labels, options, with_metrics)


def kd_forward_with_grad(
    student, teacher, labels, options: KDOptions, *, grad_scale: float, teacher_grad: bool, with_metrics=False
):
    """:func:`kd_forward` plus the gradients of ``grad_scale·Σ row_loss`` w.r.t. student (and teacher if
    teacher_grad; else an empty tensor), written by the same kernel from the exponentials it already holds, so
    no exponential is computed twice. Divergences ``"kl"`` and ``"reverse_kl"`` (see :data:`FUSED_DIVERGENCES`)."""
    if options.divergence not in FUSED_DIVERGENCES:
        raise ValueError(f"the fused gradient covers divergences {FUSED_DIVERGENCES}, got {options.divergence!r}")
    return _forward(student, teacher, labels, options, with_metrics, float(grad_scale), teacher_grad)


def kd_loss_reduced(
    student, teacher, labels, options: KDOptions, *, divisor: float, grad: bool, teacher_grad: bool, with_metrics: bool
):
    """``(loss, metrics, grad_s, grad_t)`` in one kernel call, for (N, V) CPU logits:

    - ``loss``: the 0-d float32 ``Σ row_loss / divisor``, summed in float64 in row order (``divisor`` 0: the
      counted rows, at least 1; NaN: a NaN loss);
    - ``metrics``: the fidelity metrics' means over the counted rows, (NUM_METRICS,) (0 when none counts; empty
      without ``with_metrics``);
    - with ``grad`` (kl and reverse_kl, :data:`FUSED_DIVERGENCES`): the gradients of the loss w.r.t. the student
      and, with ``teacher_grad``, the teacher (contiguous, in their input dtypes; empty when not asked for).

    The kd_loss path for a reduced loss: no row losses, statistics or argument dict (csrc/module.cpp)."""
    student, student_spec = rows_spec(student)
    teacher, teacher_spec = rows_spec(teacher)
    if labels is not None and (labels.dtype != torch.int64 or not labels.is_contiguous()):
        labels = labels.to(torch.int64).contiguous()
    loss = torch.empty((), dtype=torch.float32)
    metrics = torch.empty(NUM_METRICS if with_metrics else 0, dtype=torch.float32)
    grad_s = empty(student.shape if grad else (0,), student.dtype)
    grad_t = empty(teacher.shape if grad and teacher_grad else (0,), teacher.dtype)
    ignore_index, divergence, scalars, ce_weight, kd_scale = _reduced_option_args(options)
    _extension().kd_loss_reduced(
        student_spec,
        teacher_spec,
        student.shape[0],
        student.shape[1],
        0 if labels is None else labels.data_ptr(),
        ignore_index,
        divergence,
        scalars,
        ce_weight,
        kd_scale,
        grad_s.data_ptr() if grad else 0,
        grad_t.data_ptr() if grad and teacher_grad else 0,
        metrics.data_ptr() if with_metrics else 0,
        float(divisor),
        loss.data_ptr(),
        torch.get_num_threads(),
    )
    return loss, metrics, grad_s, grad_t


@functools.lru_cache(maxsize=256)
def _reduced_option_args(options: KDOptions) -> tuple:
    """The option arguments of ``_C.kd_loss_reduced``, derived once per distinct options."""
    scalars = tuple(kd_scalars(options).values())
    return options.ignore_index, int(Divergence.of(options.divergence)), scalars, options.ce_weight, options.kd_scale


def first_bad_label(labels: torch.Tensor, num_classes: int, ignore_index: int) -> int:
    """The flat position (in row-major order) of the first label of an integer CPU tensor that is neither in
    [0, num_classes) nor ``ignore_index``, or -1 (one host loop; int64 contiguous labels are read in place)."""
    labels = labels.to(torch.int64).contiguous()
    return _extension().first_bad_label(labels.data_ptr(), labels.numel(), num_classes, ignore_index)


def scale_rows_(rows: torch.Tensor, factors: torch.Tensor) -> None:
    """``rows[i] *= factors[i]`` in place for a contiguous (N, V) CPU tensor and (N,) float32 factors; rows whose
    factor is exactly 1 are not touched (one rounding in the tensor's dtype, computed in float32)."""
    factors = factors.to(torch.float32)
    _extension().scale_rows(
        dict(
            rows=rows.data_ptr(),
            dtype=int(DTYPE_CODES[rows.dtype]),
            num_rows=rows.shape[0],
            num_cols=rows.shape[1],
            factors=factors.data_ptr(),
            factor_stride=factors.stride(0),
            num_threads=torch.get_num_threads(),
        )
    )


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
    contiguous (N, V) in the dtype of their input; the same contract as :func:`fastkd.kernels.kd.kd_backward`."""
    _one_teacher(ensemble)
    grad_s = empty(student.shape, student.dtype)
    grad_t = empty(teacher.shape if teacher_grad else (0,), teacher.dtype)
    grad_loss = grad_loss.to(torch.float32)
    stats = stats.contiguous()
    args, _keep = kd_launch_args(student, teacher, labels, stats, options, num_threads=torch.get_num_threads())
    args.update(
        grad_loss=grad_loss.data_ptr(),
        grad_loss_stride=grad_loss.stride(0),
        grad_student=grad_s.data_ptr(),
        grad_teacher=grad_t.data_ptr() if teacher_grad else 0,
    )
    _extension().kd_backward(args)
    return grad_s, grad_t


def _topk_launch_args(student, values, indices, labels, stats, options: TopKOptions) -> tuple[dict, list]:
    """The argument dict of the sparse-teacher kernels (csrc/module.cpp ``topk_args``) and the tensors it points
    into (to keep them alive). The tail is decided per launch as the Triton launcher does: a bucket with "bucket" or
    "spread" and K < V."""
    student, student_spec = rows_spec(student)
    values, values_spec = rows_spec(values)
    if indices.stride(1) != 1 and indices.shape[1] > 1:
        indices = indices.contiguous()
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
    num_slots, num_cols = values.shape[1], student.shape[1]
    args = dict(
        student=student_spec,
        values=values_spec,
        indices=indices.data_ptr(),
        index_bytes=indices.element_size(),
        indices_row_stride=indices.stride(0),
        num_rows=student.shape[0],
        num_cols=num_cols,
        num_slots=num_slots,
        labels=labels.data_ptr() if labels is not None else 0,
        ignore_index=options.ignore_index,
        inv_temperature=1.0 / options.temperature,
        inv_teacher_temperature=1.0 / options.teacher_temperature,
        ce_weight=options.ce_weight,
        kd_scale=options.kd_scale,
        bucket=options.tail in ("bucket", "spread") and num_slots < num_cols,
        spread=options.tail == "spread" and num_slots < num_cols,
        stats=stats.data_ptr(),
        num_threads=torch.get_num_threads(),
    )
    return args, [student, values, indices, labels]


def kd_topk_forward(student, values, indices, labels, options: TopKOptions, *, with_metrics=False):
    """Row losses (N,), statistics (NUM_STATS, N; the TopKStat slots) and metrics (NUM_METRICS, N, or empty
    without ``with_metrics``), float32, of (N, V) CPU logits against a sparse teacher: (N, K) ``values`` and int32
    or int64 ``indices`` (−1: an empty slot); the same contract as :func:`fastkd.kernels.kd.kd_topk_forward`."""
    num_rows = student.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32)
    stats = torch.empty(NUM_STATS, num_rows, dtype=torch.float32)
    metrics = torch.empty((NUM_METRICS, num_rows) if with_metrics else (0,), dtype=torch.float32)
    if num_rows == 0:
        return loss, stats, metrics
    args, _keep = _topk_launch_args(student, values, indices, labels, stats, options)
    args.update(loss=loss.data_ptr(), metrics=metrics.data_ptr() if with_metrics else 0)
    _extension().kd_topk_forward(args)
    return loss, stats, metrics


def kd_topk_backward(grad_loss, student, values, indices, labels, stats, options: TopKOptions):
    """Gradient of Σ grad_loss·row_loss w.r.t. the (N, V) CPU logits against a sparse teacher, contiguous in their
    dtype, from either backend's forward statistics; the same contract as
    :func:`fastkd.kernels.kd.kd_topk_backward`."""
    grad_s = empty(student.shape, student.dtype)
    if student.shape[0] == 0:
        return grad_s
    grad_loss = grad_loss.to(torch.float32)
    stats = stats.contiguous()
    args, _keep = _topk_launch_args(student, values, indices, labels, stats, options)
    args.update(grad_loss=grad_loss.data_ptr(), grad_loss_stride=grad_loss.stride(0), grad_student=grad_s.data_ptr())
    _extension().kd_topk_backward(args)
    return grad_s


def power_iteration(matrices, u, v, *, n_iter: int, eps: float):
    """``n_iter`` grouped power iterations over 2-D CPU ``matrices`` (one dtype, unit column stride) from flat
    float32 u, v: σ (L,), the new u and v, and the v of the last iteration's start; the same contract as
    :func:`fastkd.kernels.lipschitz.power_iteration`."""
    matrices = [m if m.stride(1) == 1 else m.contiguous() for m in matrices]
    u, v = u.to(torch.float32).contiguous(), v.to(torch.float32).contiguous()
    sigma = torch.empty(len(matrices), dtype=torch.float32)
    u_out, v_out, v_prev = torch.empty_like(u), torch.empty_like(v), torch.empty_like(v)
    _extension().power_iteration(
        dict(
            matrices=[(m.data_ptr(), m.shape[0], m.shape[1], m.stride(0)) for m in matrices],
            dtype=int(DTYPE_CODES[matrices[0].dtype]),
            n_iter=n_iter,
            eps=eps,
            u=u.data_ptr(),
            v=v.data_ptr(),
            sigma=sigma.data_ptr(),
            u_out=u_out.data_ptr(),
            v_out=v_out.data_ptr(),
            v_prev=v_prev.data_ptr(),
            num_threads=torch.get_num_threads(),
        )
    )
    return sigma, u_out, v_out, v_prev


def _strided3(x: Optional[torch.Tensor]) -> tuple:
    if x is None:
        return (0, 0, (0, 0, 0))
    code = DType.UINT8 if x.dtype in (torch.bool, torch.uint8) else DTYPE_CODES[x.dtype]  # masks: bool as uint8
    return (x.data_ptr(), int(code), tuple(x.stride()))


def _feature_args(student, teacher, mask, margin, *, kind, normalize, group, beta) -> tuple[dict, list]:
    if mask is not None and mask.is_floating_point() and mask.dtype not in DTYPE_CODES:
        mask = mask.to(torch.float32)
    margin = margin.to(torch.float32).contiguous() if margin is not None else None
    num_n, num_c, num_s = student.shape
    args = dict(
        student=_strided3(student),
        teacher=_strided3(teacher),
        mask=_strided3(mask),
        num_n=num_n,
        num_c=num_c,
        num_s=num_s,
        margin=margin.data_ptr() if margin is not None else 0,
        kind=int(FeatureKind.of(kind)),
        normalize=int(FeatureNormalize.of(normalize)),
        group=group,
        beta=beta,
        num_threads=torch.get_num_threads(),
    )
    return args, [mask, margin]


def feature_loss_flat(student, teacher, *, kind: str, beta: float, mean: bool, grad: bool, teacher_grad: bool):
    """``(loss, grad_s, grad_t)`` of plain features in one kernel call: contiguous CPU student and teacher of the
    same shape, no mask, normalisation or margin, an element-wise kind. ``loss`` is the 0-d float32
    ``Σ term(s − t)`` (÷ the element count with ``mean``), summed in float64 in a fixed order; ``grad_s`` and
    ``grad_t`` its gradients (in the inputs' dtypes; empty when ``grad``, ``teacher_grad`` is false)."""
    count = student.numel()
    loss = torch.empty((), dtype=torch.float32)
    grad_s = empty(student.shape if grad else (0,), student.dtype)
    grad_t = empty(teacher.shape if teacher_grad else (0,), teacher.dtype)
    _extension().feature_loss_flat(
        student.data_ptr(),
        DTYPE_CODES[student.dtype],
        teacher.data_ptr(),
        DTYPE_CODES[teacher.dtype],
        count,
        _FEATURE_KIND_CODES[kind],
        beta,
        float(max(count, 1)) if mean else 1.0,
        grad_s.data_ptr() if grad else 0,
        grad_t.data_ptr() if teacher_grad else 0,
        loss.data_ptr(),
        torch.get_num_threads(),
    )
    return loss, grad_s, grad_t


_FEATURE_KIND_CODES = {kind.name.lower(): int(kind) for kind in FeatureKind}


def feature_forward(student, teacher, mask, margin, *, kind, normalize, group, beta):
    """Per-group Σ mask·term and Σ mask of (N, C, S) CPU features; the contract of
    :func:`fastkd.kernels.features.feature_forward`."""
    args, _keep = _feature_args(student, teacher, mask, margin, kind=kind, normalize=normalize, group=group, beta=beta)
    groups = feature_groups(group, *student.shape)
    terms = torch.empty(groups, dtype=torch.float32)
    weights = torch.empty(groups, dtype=torch.float32)
    if groups:
        _extension().feature_forward(dict(args, terms=terms.data_ptr(), weights=weights.data_ptr()))
    return terms, weights


def feature_backward(scale, student, teacher, mask, margin, *, kind, normalize, group, beta, teacher_grad):
    """Gradients of scale·Σ terms w.r.t. (N, C, S) CPU student (and teacher if teacher_grad; else empty) features,
    laid out like their inputs; the contract of :func:`fastkd.kernels.features.feature_backward`."""
    args, _keep = _feature_args(student, teacher, mask, margin, kind=kind, normalize=normalize, group=group, beta=beta)
    grad_s = torch.empty_like(student)
    grad_t = torch.empty_like(teacher) if teacher_grad else torch.empty(0, dtype=teacher.dtype)
    scale = scale.to(torch.float32).contiguous()
    if student.numel():
        _extension().feature_backward(
            dict(
                args,
                scale=scale.data_ptr(),
                grad_student=_strided3(grad_s),
                grad_teacher=_strided3(grad_t if teacher_grad else None),
            )
        )
    return grad_s, grad_t


def _rkd_angle_args(d_s: torch.Tensor, d_t: torch.Tensor) -> tuple[dict, list]:
    d_s, d_t = d_s.to(torch.float32).contiguous(), d_t.to(torch.float32).contiguous()
    num = d_s.shape[0]
    args = dict(
        student=d_s.data_ptr(), teacher=d_t.data_ptr(), num=num, row_stride=num, num_threads=torch.get_num_threads()
    )
    return args, [d_s, d_t]


def rkd_angle_forward(d_s: torch.Tensor, d_t: torch.Tensor) -> torch.Tensor:
    """RKD's angle loss summed over the B³ triplets from the (B, B) distances, float32 0-d (csrc/relational_cpu.h);
    the contract of :func:`fastkd.kernels.relational.rkd_angle_forward`."""
    args, _keep = _rkd_angle_args(d_s, d_t)
    loss = torch.zeros((), dtype=torch.float32)
    _extension().rkd_angle_forward(dict(args, loss=loss.data_ptr()))
    return loss


def rkd_angle_backward(d_s: torch.Tensor, d_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """∂(scale·Σ ℓ)/∂d_s, (B, B) float32; the contract of :func:`fastkd.kernels.relational.rkd_angle_backward`."""
    args, _keep = _rkd_angle_args(d_s, d_t)
    grad = torch.empty(d_s.shape, dtype=torch.float32)
    _extension().rkd_angle_backward(dict(args, scale=float(scale), grad=grad.data_ptr()))
    return grad


def _bank_dot_args(bank: torch.Tensor, contrast_index: torch.Tensor) -> tuple[dict, list]:
    bank, bank_spec = rows_spec(bank)
    contrast_index = contrast_index.to(torch.int64).contiguous()
    args = dict(
        bank=bank_spec,
        num_bank_rows=bank.shape[0],
        dim=bank.shape[1],
        index=contrast_index.data_ptr(),
        num_queries=contrast_index.shape[0],
        num_contrast=contrast_index.shape[1],
        num_threads=torch.get_num_threads(),
    )
    return args, [bank, contrast_index]


def crd_gather_dot(bank: torch.Tensor, contrast_index: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """scores[b, c] = ⟨bank[contrast_index[b, c]], anchors[b]⟩, (B, C) float32, reading the bank rows in place
    (csrc/relational_cpu.h); the contract of :func:`fastkd.kernels.relational.crd_gather_dot`."""
    args, _keep = _bank_dot_args(bank, contrast_index)
    anchors = anchors.to(torch.float32).contiguous()
    scores = torch.empty(contrast_index.shape, dtype=torch.float32)
    _extension().bank_gather_dot(dict(args, query=anchors.data_ptr(), scores=scores.data_ptr()))
    return scores


def crd_scatter_dot(bank: torch.Tensor, contrast_index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Σ_c grad[b, c]·bank[contrast_index[b, c]], (B, d) float32; the contract of
    :func:`fastkd.kernels.relational.crd_scatter_dot`."""
    args, _keep = _bank_dot_args(bank, contrast_index)
    grad = grad.to(torch.float32).contiguous()
    grad_anchors = torch.empty((contrast_index.shape[0], bank.shape[1]), dtype=torch.float32)
    _extension().bank_scatter_dot(dict(args, grad=grad.data_ptr(), grad_query=grad_anchors.data_ptr()))
    return grad_anchors


def crd_score_grad(bank, contrast_index, anchors, normalizer, *, temperature: float, noise: float, grad_scale: float):
    """(scores (B, C), their NCE gradient summed over the rows (B, d)), float32, from one read of each bank row
    (csrc/relational_cpu.h); the contract of :func:`fastkd.kernels.relational.crd_score_grad`."""
    args, _keep = _bank_dot_args(bank, contrast_index)
    anchors = anchors.to(torch.float32).contiguous()
    scores = torch.empty(contrast_index.shape, dtype=torch.float32)
    grad_anchors = torch.empty((contrast_index.shape[0], bank.shape[1]), dtype=torch.float32)
    args.update(
        query=anchors.data_ptr(),
        scores=scores.data_ptr(),
        grad_query=grad_anchors.data_ptr(),
        inv_temperature=1.0 / temperature,
        inv_normalizer=1.0 / float(normalizer),
        noise=noise,
        grad_scale=grad_scale,
    )
    _extension().bank_score_grad(args)
    return scores, grad_anchors
