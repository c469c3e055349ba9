"""fastkd.kd_loss: temperature-softened logit distillation (KL, reverse KL, generalized JSD) with optional
hard-label cross-entropy, in one fused pass over each row.

This module holds the validation, the dispatch call, the ``torch.library`` custom ops with their autograd,
and the reduction. The kernels are in :mod:`fastkd.kernels.kd`, the specification in
:func:`fastkd.reference.kd_loss_rows`.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import cpu_backend, cuda_backend, fused_gradient, reference, second_order
from .dispatch import check_backend_name, kernel_op, kernel_or_reference, launchers, select_backend
from .kernel_args import NUM_METRICS, NUM_STATS, KDOptions, Metric, TopKOptions, stats_rows
from .topk import EMPTY, TAILS, TopK, counted_rows_only

DIVERGENCES = ("kl", "reverse_kl", "jsd", "cosine", "tvd")
REDUCTIONS = ("batchmean", "sum", "none")
ENSEMBLES = ("prob", "logit")
FIDELITY_METRICS = tuple(metric.name.lower() for metric in Metric)  # the keys of kd_loss's stats, in slot order
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# the largest temperature for each math dtype (float32 for float32/16 and bfloat16 inputs): the divergence's
# relative error grows as about 6e-8·T² in float32 and 1e-16·T² in float64 (measured: 7e-4 at T = 100 and 5e-2 at
# T = 1000 in float32, 1e-4 at T = 1e6 in float64), so past these bounds fewer than three digits would be right
MAX_TEMPERATURE = {torch.float32: 100.0, torch.float64: 1e6}


# ----------------------------------------------------------------------------------------------------------------
# custom ops (kernel backends: "triton", "cpu" and "cuda")
# ----------------------------------------------------------------------------------------------------------------

# ``teacher`` is (N, V) with ensemble "none", or (K, N, V) with ``teacher_weights`` (K,) float32 summing to 1 and
# ensemble "prob" or "logit" (Triton only; no teacher gradient)


@kernel_op("kd_loss_rows")
def _kd_loss_rows_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    teacher_weights: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    temperature: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    ce_weight: float,
    kd_scale: float,
    alpha: float,
    ensemble: str,
    backend: str,
    with_metrics: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = KDOptions(
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        ce_weight=ce_weight,
        kd_scale=kd_scale,
        alpha=alpha,
    )
    return launchers(backend, "kd").kd_forward(
        student, teacher, labels, options, with_metrics=with_metrics, teacher_weights=teacher_weights, ensemble=ensemble
    )


@_kd_loss_rows_op.register_fake
def _(
    student,
    teacher,
    teacher_weights,
    labels,
    temperature,
    divergence,
    beta,
    ignore_index,
    ce_weight,
    kd_scale,
    alpha,
    ensemble,
    backend,
    with_metrics,
):
    num_rows = student.shape[0]
    return (
        student.new_empty(num_rows, dtype=torch.float32),
        student.new_empty((stats_rows(teacher, ensemble), num_rows), dtype=torch.float32),
        student.new_empty((NUM_METRICS, num_rows) if with_metrics else (0,), dtype=torch.float32),
    )


@kernel_op("kd_loss_rows_backward")
def _kd_loss_rows_backward_op(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    teacher_weights: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    stats: torch.Tensor,
    temperature: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    ce_weight: float,
    kd_scale: float,
    alpha: float,
    ensemble: str,
    backend: str,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    options = KDOptions(
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        ce_weight=ce_weight,
        kd_scale=kd_scale,
        alpha=alpha,
    )
    return launchers(backend, "kd").kd_backward(
        grad_loss,
        student,
        teacher,
        labels,
        stats,
        options,
        teacher_grad=teacher_grad,
        teacher_weights=teacher_weights,
        ensemble=ensemble,
    )


@_kd_loss_rows_backward_op.register_fake
def _(
    grad_loss,
    student,
    teacher,
    teacher_weights,
    labels,
    stats,
    temperature,
    divergence,
    beta,
    ignore_index,
    ce_weight,
    kd_scale,
    alpha,
    ensemble,
    backend,
    teacher_grad,
):
    grad_t = teacher.new_empty(teacher.shape if teacher_grad else (0,))
    return student.new_empty(student.shape), grad_t


def _fuse_gradient(ctx, backend: str, options: KDOptions, grad_scale: Optional[torch.Tensor]) -> bool:
    """Whether the forward computes the gradient too (C++ backend, kl/reverse_kl, eager mode, the student wants a
    gradient): then each exponential is computed once instead of twice (csrc/kd_cpu_impl.h). Under
    torch.compile the two-kernel path keeps the graph functional."""
    return (
        backend == "cpu"
        and options.divergence in cpu_backend.FUSED_DIVERGENCES
        and grad_scale is not None
        and ctx.needs_input_grad[0]
        and not torch.compiler.is_compiling()
        and math.isfinite(float(grad_scale))
        and float(grad_scale) > 0
    )


class _KDLossRows(torch.autograd.Function):
    """Row losses through a kernel backend: forward and backward are the two custom ops above. (Not
    ``register_autograd``: its generated backward wrapper took ~200 µs of host time per call on the H100 machine,
    bench/profile_overhead.py; dynamo traces an autograd.Function just as well.)

    With the C++ backend in eager mode the forward may also write the gradient of ``grad_scale·Σ row_loss``
    (see :func:`_fuse_gradient`); the backward then only rescales rows whose incoming gradient differs from
    ``grad_scale`` (none in ``loss.backward()`` of a batchmean or sum loss). A second backward through the same
    graph (``retain_graph=True``) runs the backward kernel.
    """

    @staticmethod
    def forward(
        ctx, student, teacher, labels, grad_scale, backend, with_metrics, teacher_weights, ensemble, options: KDOptions
    ):
        ctx.fused_grads = None
        if ensemble == "none" and _fuse_gradient(ctx, backend, options, grad_scale):
            row_loss, stats, metrics, grad_s, grad_t = cpu_backend.kd_forward_with_grad(
                student,
                teacher,
                labels,
                options,
                grad_scale=float(grad_scale),
                teacher_grad=ctx.needs_input_grad[1],
                with_metrics=with_metrics,
            )
            ctx.fused_grads = (grad_s, grad_t, grad_scale)
        else:
            row_loss, stats, metrics = _kd_loss_rows_op(
                student,
                teacher,
                teacher_weights=teacher_weights,
                labels=labels,
                **options._asdict(),
                ensemble=ensemble,
                backend=backend,
                with_metrics=with_metrics,
            )
        ctx.save_for_backward(student, teacher, teacher_weights, labels, stats)
        ctx.backend = backend
        ctx.ensemble = ensemble
        ctx.options = options
        ctx.mark_non_differentiable(metrics)
        return row_loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        teacher_grad = ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True: a gradient with a graph (fastkd.second_order)
            ctx.fused_grads = None
            student, teacher, teacher_weights, labels, _ = ctx.saved_tensors
            rows = second_order.reference_rows(student, teacher, labels, ctx.options, teacher_weights, ctx.ensemble)
            grads = second_order.row_gradients(grad_loss, rows, (student, teacher), ctx.needs_input_grad[:2])
            return (*grads, None, None, None, None, None, None, None)
        if ctx.fused_grads is not None:
            grad_s, grad_t, grad_scale = ctx.fused_grads
            ctx.fused_grads = None  # rescaled in place below: usable once
            factor = grad_loss / grad_scale  # exactly 1 for the rows of a plain backward of a batchmean/sum loss
            cpu_backend.scale_rows_(grad_s, factor)
            if teacher_grad:
                cpu_backend.scale_rows_(grad_t, factor)
        else:
            student, teacher, teacher_weights, labels, stats = ctx.saved_tensors
            grad_s, grad_t = _kd_loss_rows_backward_op(
                grad_loss,
                student,
                teacher,
                teacher_weights=teacher_weights,
                labels=labels,
                stats=stats,
                **ctx.options._asdict(),
                ensemble=ctx.ensemble,
                backend=ctx.backend,
                teacher_grad=teacher_grad,
            )
        # student, teacher; labels, grad_scale, backend, with_metrics, teacher_weights, ensemble, options
        return grad_s, grad_t if teacher_grad else None, None, None, None, None, None, None, None


# a reduced kl/reverse_kl loss with its gradient in one call: the C++ backend


@kernel_op("kd_loss_reduced")
def _kd_loss_reduced_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    normalizer: Optional[torch.Tensor],
    temperature: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    ce_weight: float,
    kd_scale: float,
    alpha: float,
    divisor: float,
    grad: bool,
    teacher_grad: bool,
    with_metrics: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = KDOptions(
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        ce_weight=ce_weight,
        kd_scale=kd_scale,
        alpha=alpha,
    )
    if normalizer is not None:  # read here, inside the op: torch.compile sees no host read
        divisor = host_divisor(normalizer)
    return cpu_backend.kd_loss_reduced(
        student,
        teacher,
        labels,
        options,
        divisor=divisor,
        grad=grad,
        teacher_grad=teacher_grad,
        with_metrics=with_metrics,
    )


@_kd_loss_reduced_op.register_fake
def _(
    student,
    teacher,
    labels,
    normalizer,
    temperature,
    divergence,
    beta,
    ignore_index,
    ce_weight,
    kd_scale,
    alpha,
    divisor,
    grad,
    teacher_grad,
    with_metrics,
):
    return (
        student.new_empty((), dtype=torch.float32),
        student.new_empty(NUM_METRICS if with_metrics else 0, dtype=torch.float32),
        student.new_empty(student.shape if grad else (0,)),
        teacher.new_empty(teacher.shape if grad and teacher_grad else (0,)),
    )


def _kd_loss_reduced(
    student, teacher, labels, normalizer, options: KDOptions, divisor: float, *, grad, teacher_grad, with_metrics
):
    """``_kd_loss_reduced_op`` with the kernel options as one :class:`KDOptions`."""
    return _kd_loss_reduced_op(
        student,
        teacher,
        labels,
        normalizer,
        **options._asdict(),
        divisor=divisor,
        grad=grad,
        teacher_grad=teacher_grad,
        with_metrics=with_metrics,
    )


class _KDLossReduced(torch.autograd.Function):
    """A ``"batchmean"`` or ``"sum"`` loss of kl or reverse_kl with one teacher on the C++ backend: one kernel call
    returns the reduced loss (and the metrics) and its gradient (:func:`fastkd.cpu_backend.kd_loss_reduced`), so a
    small call costs one autograd node and no row losses, statistics or reduction ops. The backward hands the
    gradient on (:mod:`fastkd.fused_gradient`)."""

    @staticmethod
    def forward(ctx, student, teacher, labels, normalizer, options: KDOptions, divisor: float, with_metrics: bool):
        loss, metrics, grad_s, grad_t = _kd_loss_reduced(
            student,
            teacher,
            labels,
            normalizer,
            options,
            divisor,
            grad=True,
            teacher_grad=ctx.needs_input_grad[1],
            with_metrics=with_metrics,
        )
        fused_gradient.keep(ctx, (grad_s, grad_t), (student, teacher, labels, normalizer))
        ctx.options, ctx.divisor = options, divisor
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        teacher_grad = ctx.needs_input_grad[1]
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # create_graph=True (second_order)
            ctx.fused_grads = None
            student, teacher, labels, normalizer = ctx.saved_tensors
            rows = second_order.reference_rows(student, teacher, labels, ctx.options)
            if normalizer is not None:
                divisor = host_divisor(normalizer)
            elif ctx.divisor == 0:  # the counted rows
                divisor = _counted_rows(labels, student.shape[0], ctx.options.ignore_index)
            else:
                divisor = ctx.divisor
            grad_rows = (grad_loss / divisor).expand_as(rows)
            grads = second_order.row_gradients(grad_rows, rows, (student, teacher), ctx.needs_input_grad[:2])
            return (*grads, None, None, None, None, None)

        def recompute(student, teacher, labels, normalizer):
            return _kd_loss_reduced(
                student,
                teacher,
                labels,
                normalizer,
                ctx.options,
                ctx.divisor,
                grad=True,
                teacher_grad=teacher_grad,
                with_metrics=False,
            )[2:]

        grad_s, grad_t = fused_gradient.take(ctx, grad_loss, recompute)
        # student, teacher; labels, normalizer, options, divisor, with_metrics
        return grad_s, grad_t if teacher_grad else None, None, None, None, None, None


# a sparse teacher (TopK): Triton and C++ CPU kernels; no gradient to its values


@kernel_op("kd_topk_rows")
def _kd_topk_rows_op(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    labels: Optional[torch.Tensor],
    temperature: float,
    teacher_temperature: float,
    tail: str,
    ignore_index: int,
    ce_weight: float,
    kd_scale: float,
    backend: str,
    with_metrics: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    options = TopKOptions(
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        tail=tail,
        ignore_index=ignore_index,
        ce_weight=ce_weight,
        kd_scale=kd_scale,
    )
    return launchers(backend, "kd").kd_topk_forward(
        student, values, indices, labels, options, with_metrics=with_metrics
    )


@_kd_topk_rows_op.register_fake
def _(
    student,
    values,
    indices,
    labels,
    temperature,
    teacher_temperature,
    tail,
    ignore_index,
    ce_weight,
    kd_scale,
    backend,
    with_metrics,
):
    num_rows = student.shape[0]
    return (
        student.new_empty(num_rows, dtype=torch.float32),
        student.new_empty((NUM_STATS, num_rows), dtype=torch.float32),
        student.new_empty((NUM_METRICS, num_rows) if with_metrics else (0,), dtype=torch.float32),
    )


@kernel_op("kd_topk_rows_backward")
def _kd_topk_rows_backward_op(
    grad_loss: torch.Tensor,
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    labels: Optional[torch.Tensor],
    stats: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
    tail: str,
    ignore_index: int,
    ce_weight: float,
    kd_scale: float,
    backend: str,
) -> torch.Tensor:
    options = TopKOptions(
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        tail=tail,
        ignore_index=ignore_index,
        ce_weight=ce_weight,
        kd_scale=kd_scale,
    )
    return launchers(backend, "kd").kd_topk_backward(grad_loss, student, values, indices, labels, stats, options)


@_kd_topk_rows_backward_op.register_fake
def _(
    grad_loss,
    student,
    values,
    indices,
    labels,
    stats,
    temperature,
    teacher_temperature,
    tail,
    ignore_index,
    ce_weight,
    kd_scale,
    backend,
):
    return student.new_empty(student.shape)


class _KDTopKRows(torch.autograd.Function):
    """Row losses against a sparse teacher through the two custom ops above; the gradient reaches the student
    only."""

    @staticmethod
    def forward(ctx, student, values, indices, labels, with_metrics, backend, options: TopKOptions):
        row_loss, stats, metrics = _kd_topk_rows_op(
            student, values, indices, labels=labels, **options._asdict(), backend=backend, with_metrics=with_metrics
        )
        ctx.save_for_backward(student, values, indices, labels, stats)
        ctx.backend = backend
        ctx.options = options
        ctx.mark_non_differentiable(metrics)
        return row_loss, metrics

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_metrics):
        student, values, indices, labels, stats = ctx.saved_tensors
        grad_s = _kd_topk_rows_backward_op(
            grad_loss,
            student,
            values,
            indices,
            labels=labels,
            stats=stats,
            **ctx.options._asdict(),
            backend=ctx.backend,
        )
        # student; values, indices, labels, with_metrics, backend, options
        return grad_s, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def _finite_number(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite {'positive ' if positive else ''}number, got {value}")
    return value


def check_ignore_index(ignore_index) -> int:
    """``ignore_index`` as an int (a bool or a float such as 1.5 is a ``TypeError``)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    return int(ignore_index)


def check_normalizer(normalizer, *, zero_allowed: bool = False):
    """A normalizer validated: a finite positive number (0 too with ``zero_allowed``: a step without counted
    rows), or a 0-d real tensor, which on the CPU must also hold a finite value ≥ 0. A CUDA tensor's value is not
    read (that would cost a device sync): :func:`tensor_divisor` makes a negative or non-finite value give NaN."""
    if not isinstance(normalizer, torch.Tensor):
        if (
            zero_allowed
            and not isinstance(normalizer, bool)
            and isinstance(normalizer, numbers.Real)
            and normalizer == 0
        ):
            return 0.0
        return _finite_number("normalizer", normalizer, positive=True)
    if normalizer.dim() != 0 or normalizer.is_complex() or normalizer.dtype == torch.bool:
        raise ValueError(
            f"normalizer must be a number or a 0-d real tensor, got a tensor of shape "
            f"{tuple(normalizer.shape)} and dtype {normalizer.dtype}"
        )
    if normalizer.device.type == "cpu" and not torch.compiler.is_compiling():
        value = float(normalizer)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"normalizer must be finite and ≥ 0 (0: no counted rows in the step), got {value}")
    return normalizer


def tensor_divisor(normalizer: torch.Tensor) -> torch.Tensor:
    """The float32 divisor of a 0-d tensor normalizer, computed on its device: the normalizer where finite and
    > 0, 1 where 0 (a step without counted rows: the loss is 0, not NaN), NaN where negative or not finite (a
    wrong normalizer on CUDA, where it is not checked, gives NaN, never a wrong number)."""
    value = normalizer.to(torch.float32)
    return torch.where((value > 0) & value.isfinite(), value, torch.where(value == 0, 1.0, math.nan))


def host_divisor(normalizer: torch.Tensor) -> float:
    """:func:`tensor_divisor` read on the host (one read of a CPU scalar; a sync for a CUDA one)."""
    value = float(normalizer if normalizer.dtype == torch.float32 else normalizer.to(torch.float32))
    if value > 0 and math.isfinite(value):
        return value
    return 1.0 if value == 0 else math.nan


def _check_options(
    *, temperature, divergence, beta, reduction, ignore_index, ce_weight, kd_weight, scale_by_t2, normalizer
) -> dict:
    """Validate the tensor-free options of kd_loss; return them normalised (floats, ints) with the kernels'
    :class:`KDOptions` under ``"kernel"``. The number options are checked once per distinct set of values (a cache
    keyed on values and types): most training loops pass the same ones every step."""
    key = (temperature, divergence, beta, reduction, ignore_index, ce_weight, kd_weight, scale_by_t2)
    uncached = _checked_scalar_options.__wrapped__
    # dynamo traces the checks themselves, not the cache
    check = uncached if torch.compiler.is_compiling() else _checked_scalar_options
    try:
        options = check(*key)
    except TypeError:  # an unhashable or wrongly typed value: validate uncached, which names the argument
        options = uncached(*key)
    options = dict(options)  # a copy: the cached dict is shared
    if normalizer is not None:
        if reduction != "batchmean":
            raise ValueError(
                f"normalizer replaces the divisor of reduction='batchmean'; it has no meaning with "
                f"reduction={reduction!r}"
            )
        normalizer = check_normalizer(normalizer)
    options["normalizer"] = normalizer
    return options


@functools.lru_cache(maxsize=256, typed=True)
def _checked_scalar_options(temperature, divergence, beta, reduction, ignore_index, ce_weight, kd_weight, scale_by_t2):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction == "mean":
        raise ValueError(
            "reduction='mean' averages over every element (rows × classes), which divides the KD loss "
            "by the vocabulary size; use reduction='batchmean' (sum over rows ÷ number of counted "
            "rows), 'sum' or 'none'"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    beta = _finite_number("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    ignore_index = check_ignore_index(ignore_index)
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {type(scale_by_t2).__name__}")
    options = dict(
        temperature=_finite_number("temperature", temperature, positive=True),
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        ignore_index=ignore_index,
        ce_weight=_finite_number("ce_weight", ce_weight),
        kd_weight=_finite_number("kd_weight", kd_weight),
        scale_by_t2=scale_by_t2,
    )
    options["kernel"] = KDOptions(
        temperature=options["temperature"],
        divergence=divergence,
        beta=beta,
        ignore_index=ignore_index,
        ce_weight=options["ce_weight"],
        kd_scale=_kd_scale(options),
    )
    return options


def _check_tensors(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    ce_weight: float,
    ignore_index: int,
    temperature: float,
) -> None:
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        check_float_tensor(name, x)
        if x.dim() == 0 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape (*, V) with V >= 1, got {tuple(x.shape)}")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student_logits and teacher_logits must have the same number of classes V (last dim), got "
            f"{student.shape[-1]} and {teacher.shape[-1]}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {student.device} and {teacher.device}"
        )
    check_temperature(temperature, reference._math_dtype(student, teacher))
    check_labels(
        labels, student.shape[:-1], student.shape[-1], student.device, ce_weight=ce_weight, ignore_index=ignore_index
    )


def check_float_tensor(name: str, x) -> None:
    """Raise ``TypeError`` unless ``x`` is a tensor of a dtype the ops take (float32/16, bfloat16, float64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 (or float64), got {x.dtype}")


def check_temperature(temperature: float, math_dtype: torch.dtype) -> None:
    """Refuse a temperature past :data:`MAX_TEMPERATURE` for the math dtype (float32 or float64)."""
    if temperature > MAX_TEMPERATURE[math_dtype]:
        raise ValueError(
            f"temperature must be at most {MAX_TEMPERATURE[math_dtype]:g} for {math_dtype} math, got "
            f"{temperature:g}: the divergence is a difference of log-sums of size log V and loses about "
            f"{'6e-8' if math_dtype == torch.float32 else '1e-16'}·T² relative accuracy (fewer than three "
            f"digits left past the bound); use a smaller temperature"
            f"{' or float64 logits' if math_dtype == torch.float32 else ''}"
        )


def check_labels(
    labels: Optional[torch.Tensor],
    row_shape: torch.Size,
    num_classes: Optional[int],
    device: torch.device,
    *,
    ce_weight: float,
    ignore_index: int,
) -> None:
    """Validate ``labels`` for rows of shape ``row_shape`` over ``num_classes`` classes on ``device`` (None only
    without a CE term); label values are read only for CPU tensors (elsewhere a bad row comes out NaN), and not at
    all when ``num_classes`` is None."""
    if labels is None:
        if ce_weight != 0:
            raise ValueError("ce_weight != 0 needs labels")
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if labels.shape != row_shape:
        raise ValueError(
            f"labels must have the shape of student_logits without its last dim, "
            f"{tuple(row_shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the device of the logits ({device}), got {labels.device}")
    # a free check where reading the labels costs no device sync; elsewhere bad rows come out NaN
    if num_classes is None:  # not known here (vocabulary-parallel logits): checked later
        return
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and labels.numel() > 0:
        if cpu_backend.AVAILABLE:  # one host loop, no tensor op
            bad = cpu_backend.first_bad_label(labels, num_classes, ignore_index)
            bad_label = None if bad < 0 else int(labels.reshape(-1)[bad])
        else:
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
            bad_label = int(labels[bad][0]) if bool(bad.any()) else None
        if bad_label is not None:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, got {bad_label}"
            )


def _teacher_ensemble(student: torch.Tensor, teacher_logits, teacher_weights, ensemble: str):
    """(K, *, V) teacher logits and their weights normalised to sum 1 when ``teacher_logits`` is a list of K
    tensors or a tensor with one more leading dim than the student; None for a single teacher."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    if isinstance(teacher_logits, (list, tuple)):
        if len(teacher_logits) == 0:
            raise ValueError("teacher_logits is an empty list; give at least one teacher")
        for k, x in enumerate(teacher_logits):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"teacher_logits[{k}] must be a torch.Tensor, got {type(x).__name__}")
            if x.shape != student.shape:
                raise ValueError(
                    f"teacher_logits[{k}] must have the student's shape {tuple(student.shape)}, got {tuple(x.shape)}"
                )
            if x.device != student.device:
                raise ValueError(
                    f"teacher_logits[{k}] must be on the student's device {student.device}, got {x.device}"
                )
        teachers = torch.stack(list(teacher_logits))
    elif isinstance(teacher_logits, torch.Tensor) and teacher_logits.dim() == student.dim() + 1:
        if teacher_logits.shape[1:] != student.shape:
            raise ValueError(
                f"an ensemble teacher_logits must have shape (K, *student shape) = (K, "
                f"{', '.join(map(str, student.shape))}), got {tuple(teacher_logits.shape)}"
            )
        teachers = teacher_logits
    else:
        if teacher_weights is not None:
            raise ValueError("teacher_weights needs K teachers: teacher_logits of shape (K, *, V) or a list")
        return None
    num_teachers = teachers.shape[0]
    if num_teachers == 0:
        raise ValueError("teacher_logits holds K = 0 teachers; give at least one")
    if teacher_weights is None:
        return teachers, torch.full((num_teachers,), 1.0 / num_teachers, dtype=torch.float32)
    if isinstance(teacher_weights, torch.Tensor):
        if teacher_weights.requires_grad:
            raise ValueError("teacher_weights are constants of the loss (no gradient reaches them); detach them")
        values = teacher_weights.detach().double().cpu().tolist() if teacher_weights.dim() == 1 else None
    else:  # numbers are checked without tensors: nothing here reads a device value (torch.compile, CUDA)
        try:
            values = [float(w) for w in teacher_weights]
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"teacher_weights must be K numbers (a sequence or a 1-d tensor), got {teacher_weights!r}"
            ) from exc
    if values is None or len(values) != num_teachers:
        shape = tuple(teacher_weights.shape) if isinstance(teacher_weights, torch.Tensor) else (len(values),)
        raise ValueError(f"teacher_weights must have shape ({num_teachers},) for {num_teachers} teachers, got {shape}")
    if not all(math.isfinite(w) and w >= 0 for w in values) or not sum(values) > 0:
        raise ValueError(f"teacher_weights must be finite, non-negative and sum to a positive value, got {values}")
    total = sum(values)
    return teachers, torch.tensor([w / total for w in values], dtype=torch.float32)


def _dtensor(x) -> bool:
    """Whether ``x`` is a DTensor (by name: torch.distributed.tensor is not imported for plain tensors)."""
    return type(x).__name__ == "DTensor"


def _kd_scale(options: dict) -> float:
    """The factor of the divergence in each row loss: kd_weight, times T² with scale_by_t2."""
    t = options["temperature"]
    return options["kd_weight"] * (t * t if options["scale_by_t2"] else 1.0)


def _counted_rows(flat_labels: Optional[torch.Tensor], num_rows: int, ignore_index: int):
    """The rows that count, at least 1: all of them without labels, else those whose label is not ignore_index."""
    return max(num_rows, 1) if flat_labels is None else (flat_labels != ignore_index).sum().clamp_min(1)


def _divisor(options: dict, flat_labels: Optional[torch.Tensor], num_rows: int):
    """What the sum of row losses is divided by: the normalizer or the counted rows for "batchmean", else 1."""
    if options["reduction"] != "batchmean":
        return 1
    normalizer = options["normalizer"]
    if isinstance(normalizer, torch.Tensor):
        return tensor_divisor(normalizer)
    if normalizer is not None:
        return normalizer
    return _counted_rows(flat_labels, num_rows, options["ignore_index"])


def _kd_loss_reduced_cpu(student, teacher, flat_labels, options: dict, with_metrics: bool):
    """``(loss, metric means)`` of a C++ backend call of kl or reverse_kl in one kernel call (:class:`_KDLossReduced`),
    or None where that does not apply: another divergence, ``reduction="none"``, a gradient for the teacher alone.
    The same call gives the same bits with or without the student's gradient or ``return_stats``."""
    if options["divergence"] not in cpu_backend.FUSED_DIVERGENCES or options["reduction"] == "none":
        return None
    normalizer = options["normalizer"]
    tensor_normalizer = normalizer if isinstance(normalizer, torch.Tensor) else None
    # the kernel's divisor (a tensor normalizer is read inside the op); 0 stands for the counted rows
    divisor = 1.0 if options["reduction"] == "sum" or tensor_normalizer is not None else (normalizer or 0.0)
    if torch.is_grad_enabled() and teacher.requires_grad and not student.requires_grad:
        return None  # the kernel writes the teacher's gradient beside the student's only: take the backward kernel
    if torch.is_grad_enabled() and student.requires_grad:
        return _KDLossReduced.apply(
            student, teacher, flat_labels, tensor_normalizer, options["kernel"], divisor, with_metrics
        )
    return _kd_loss_reduced(
        student,
        teacher,
        flat_labels,
        tensor_normalizer,
        options["kernel"],
        divisor,
        grad=False,
        teacher_grad=False,
        with_metrics=with_metrics,
    )[:2]


def _reduce(row_loss: torch.Tensor, row_shape, reduction: str, divisor) -> torch.Tensor:
    if reduction == "none":
        return row_loss.reshape(row_shape)
    return row_loss.sum() if reduction == "sum" else row_loss.sum() / divisor


def check_topk(
    topk: TopK,
    row_shape: torch.Size,
    num_classes: int,
    device: torch.device,
    *,
    tail,
    divergence: str,
    holder: str,
    temperature: float,
) -> str:
    """Validate a sparse teacher for rows of shape ``row_shape`` over ``num_classes`` classes on ``device`` (the
    device of ``holder``, for messages) at the loss's ``temperature``, and return its tail (the default for its
    kind when ``tail`` is None). Indices are read only for CPU tensors (range, distinct): elsewhere the kernels
    make such rows NaN."""
    if topk.kind == "sampled":
        if tail not in (None, "renormalize"):
            raise ValueError(f"a sampled TopK teacher is its own distribution: tail must be None, got {tail!r}")
        if temperature != topk.draw_temperature:
            raise ValueError(
                f"this sampled TopK teacher was drawn at temperature {topk.draw_temperature}; its estimate holds "
                f"there only, got temperature={temperature} (draw it again with sampled_teacher(temperature=...))"
            )
        tail = "renormalize"
    tail = tail if tail is not None else ("bucket" if topk.kind == "logprobs" else "renormalize")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if tail != "renormalize" and topk.kind != "logprobs":
        raise ValueError(
            f"tail={tail!r} needs the teacher's log-probabilities (TopK kind='logprobs'); top-K logits "
            "say nothing of the mass outside them: use tail='renormalize'"
        )
    if divergence != "kl":
        raise ValueError(f"a TopK teacher works with divergence='kl' for now, got {divergence!r}")
    values, indices = topk.values, topk.indices
    if values.shape[:-1] != row_shape:
        raise ValueError(f"TopK values must have shape (*, K) with * = {tuple(row_shape)}, got {tuple(values.shape)}")
    k = values.shape[-1]
    if k > num_classes:
        raise ValueError(f"TopK has K={k} entries per row, more than the V={num_classes} classes")
    if values.device != device:
        raise ValueError(f"TopK must be on the device of {holder} ({device}), got {values.device}")
    if indices.device.type == "cpu" and not torch.compiler.is_compiling() and indices.numel():
        present = indices >= 0
        if bool(((indices < EMPTY) | (indices >= num_classes)).any()):
            raise ValueError(f"TopK indices must lie in [0, {num_classes}), or be -1 for an empty slot")
        if k > 1 and bool(
            (torch.where(present, indices, -1 - _slot_numbers(indices)).sort(dim=-1).values.diff(dim=-1) == 0).any()
        ):
            raise ValueError("TopK indices must be distinct within a row")
        if k == num_classes and tail != "renormalize" and bool((present.any(-1) & ~present.all(-1)).any()):
            raise ValueError(
                f"a TopK of K = V = {num_classes} slots leaves no class outside it, so tail={tail!r} has nowhere to "
                "put the mass of its empty slots: give K < V or tail='renormalize'"
            )
        if topk.kind == "logprobs":
            _check_topk_mass(torch.where(present, values, -math.inf))
    return tail


def _slot_numbers(indices: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., K − 1 along the last dim (distinct stand-ins for empty slots in the duplicate check)."""
    return torch.arange(indices.shape[-1], device=indices.device, dtype=indices.dtype)


def topk_teacher_temperature(topk: TopK, temperature: float) -> float:
    """T_t of a sparse teacher's log-weights v/T_t: 1 for a sampled teacher (its values are the target), T/T_c for
    log-probabilities taken at T_c (:class:`fastkd.TopK`'s ``temperature``), else T."""
    if topk.kind == "sampled":
        return 1.0
    return temperature / topk.draw_temperature if topk.kind == "logprobs" else temperature


def _check_topk_mass(values: torch.Tensor) -> None:
    """Refuse CPU log-probabilities whose probabilities sum to more than 1 by more than the rounding of their dtype
    allows (Σ_k p_k·|log p_k|·ε: each stored log p_k is off by up to |log p_k|·ε/2); empty slots are −inf."""
    log_p = values.detach().double()
    p = log_p.exp()
    excess = p.sum(-1) - 1 - _weighted_abs(p, log_p).sum(-1) * torch.finfo(values.dtype).eps - 1e-6
    if bool((excess > 0).any()):
        row = int((excess > 0).flatten().nonzero()[0])
        mass = float(p.reshape(-1, p.shape[-1])[row].sum())
        raise ValueError(
            f"TopK log-probabilities of row {row} sum to probability {mass:.6g} > 1: they are not the "
            f"log-probabilities of one distribution (give logits as TopK(kind='logits'))"
        )


def _weighted_abs(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """p·|log p|, 0 where p = 0."""
    return torch.where(p == 0, 0.0, p * log_p.abs())


def _kd_loss_topk(
    student_logits, topk: TopK, labels, tail, options, return_stats, backend
) -> Union[torch.Tensor, tuple[torch.Tensor, dict]]:
    """kd_loss against a sparse teacher: validation, the Triton or C++ kernels or the reference rows (+ CE), and the
    reduction."""
    _check_tensors(
        student_logits,
        student_logits,
        labels,
        ce_weight=options["ce_weight"],
        ignore_index=options["ignore_index"],
        temperature=options["temperature"],
    )
    num_classes = student_logits.shape[-1]
    topk = counted_rows_only(topk, labels, options["ignore_index"])
    tail = check_topk(
        topk,
        student_logits.shape[:-1],
        num_classes,
        student_logits.device,
        tail=tail,
        divergence=options["divergence"],
        holder="the logits",
        temperature=options["temperature"],
    )
    k = topk.values.shape[-1]
    student = student_logits.reshape(-1, num_classes)
    values, indices = topk.values.reshape(-1, k), topk.indices.reshape(-1, k)
    flat_labels = None if labels is None else labels.reshape(-1)
    t = options["temperature"]
    chosen = select_backend(
        backend, student, values, op="kd_loss with a TopK teacher", kernels=("triton", "cpu", "cuda"), cuda_covers=False
    )
    chosen = kernel_or_reference(
        chosen,
        backend,
        "kd_loss with a TopK teacher",
        "the TopK values",
        torch.is_grad_enabled() and values.requires_grad,
    )
    topk_options = TopKOptions(
        temperature=t,
        teacher_temperature=topk_teacher_temperature(topk, t),
        tail=tail,
        ignore_index=options["ignore_index"],
        ce_weight=options["ce_weight"],
        kd_scale=_kd_scale(options),
    )
    if chosen in ("triton", "cpu"):
        rows, metrics = _KDTopKRows.apply(student, values, indices, flat_labels, return_stats, chosen, topk_options)
    else:
        metrics = (
            reference.kd_topk_fidelity_rows(
                student, values, indices.long(), flat_labels, tail=tail, ignore_index=options["ignore_index"]
            )
            if return_stats
            else None
        )
        rows = topk_reference_rows(student, values, indices, flat_labels, topk_options)
    divisor = _divisor(options, flat_labels, student.shape[0])
    loss = _reduce(rows, student_logits.shape[:-1], options["reduction"], divisor)
    return _with_stats(loss, metrics, flat_labels, student.shape[0], options) if return_stats else loss


def topk_reference_rows(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    labels: Optional[torch.Tensor],
    options: TopKOptions,
) -> torch.Tensor:
    """The row losses of (N, V) student logits against a sparse teacher ((N, K) values and indices) by the
    reference (what the TopK kernels compute): kd_scale·:func:`fastkd.reference.kd_topk_rows`, plus the CE term,
    0 at ignored rows."""
    ignore_index = options.ignore_index
    rows = options.kd_scale * reference.kd_topk_rows(
        reference.counted_rows_only(student, labels, ignore_index),
        reference.counted_rows_only(values, labels, ignore_index),
        indices.long(),
        tail=options.tail,
        temperature=options.temperature,
        teacher_temperature=options.teacher_temperature,
    )
    if labels is None:
        return rows
    ce_rows = reference.kd_loss_rows(  # the CE term and the ignored rows, as for a full teacher
        student,
        student,
        labels,
        temperature=options.temperature,
        divergence="kl",
        beta=0.5,
        ignore_index=ignore_index,
        ce_weight=options.ce_weight,
        kd_weight=0.0,
        scale_by_t2=True,
    )
    return torch.where(labels != ignore_index, rows + ce_rows, 0)


def _with_stats(loss: torch.Tensor, metrics: torch.Tensor, flat_labels, num_rows: int, options: dict):
    """``(loss, stats)``: each fidelity metric's mean over the counted rows (0 if there are none)."""
    means = metrics.sum(1) / _counted_rows(flat_labels, num_rows, options["ignore_index"])
    return loss, dict(zip(FIDELITY_METRICS, means.unbind()))


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Union[torch.Tensor, Sequence[torch.Tensor], TopK],
    *,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    scale_by_t2: bool = True,
    normalizer: Union[float, torch.Tensor, None] = None,
    return_stats: bool = False,
    teacher_weights: Union[Sequence[float], torch.Tensor, None] = None,
    ensemble: str = "prob",
    tail: Optional[str] = None,
    backend: str = "auto",
    group=None,
    vocab_start: Optional[int] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, dict]]:
    r"""Knowledge-distillation loss between student and teacher logits, fused in one pass over each row.

    Per row (the leading dims of ``(*, V)`` logits are flattened), with p_s = softmax(s/T), p_t = softmax(t/T)::

        row_loss = kd_weight · (T² if scale_by_t2 else 1) · D(p_t, p_s) + ce_weight · CE(softmax(s), label)

    and the rows reduced by ``reduction``. With the defaults (2-D logits) it equals::

        F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T

    Args:
        student_logits (Tensor): ``(*, V)``, float32, float16 or bfloat16 (float64 runs the reference), any strides.
        teacher_logits (Tensor, list of Tensors or TopK): one teacher ``(*, V)`` (gets a gradient only when it
            requires grad); K teachers as ``(K, *, V)`` or a list of K ``(*, V)`` (see Notes); or a sparse
            :class:`fastkd.TopK` teacher.
        temperature (float, default 1.0): T > 0; at most 100 for float32 math, 1e6 for float64
            (:data:`MAX_TEMPERATURE`).
        divergence (str, default ``"kl"``): D. ``"kl"`` KL(p_t‖p_s) (Hinton); ``"reverse_kl"`` KL(p_s‖p_t);
            ``"jsd"`` β·KL(p_t‖m) + (1−β)·KL(p_s‖m), m = β·p_t + (1−β)·p_s (continuous in β, exactly 0 at β = 0
            and 1); ``"cosine"`` 1 − ⟨p_s, p_t⟩/(‖p_s‖‖p_t‖); ``"tvd"`` ½ Σ |p_s − p_t| (total variation).
        beta (float, default 0.5): the JSD weight β in [0, 1].
        reduction (str, default ``"batchmean"``): ``"batchmean"`` Σ row_loss ÷ the counted rows (all rows without
            ``labels``, else those whose label is not ``ignore_index``; 0, connected to the graph, when none
            counts); ``"sum"`` Σ row_loss; ``"none"`` the row losses, shape ``*`` (0 at ignored rows). Torch's
            element-wise ``"mean"`` (÷ N·V) is refused.
        labels (Tensor, optional): ``*``, int64 or int32: the CE term's targets, and ``ignore_index`` marks rows that
            contribute 0, get zero gradient and are not counted. Another label outside [0, V) is an error for CPU
            tensors and makes its row NaN on CUDA (checking would cost a sync).
        ignore_index (int, default -100): the label of rows to skip.
        ce_weight (float, default 0.0): the weight of the hard-label CE term (at T = 1); needs ``labels``.
        kd_weight (float, default 1.0): the weight of the divergence.
        scale_by_t2 (bool, default True): multiply the divergence by T² (Hinton: keeps the soft-target gradient
            comparable across temperatures); ``False`` returns the divergence as Liger-Kernel and TRL do.
        normalizer (float or 0-d Tensor, optional): replaces the divisor of ``"batchmean"``, e.g. the counted rows
            of a whole gradient-accumulation step. A tensor 0 (no counted row in the step) gives 0; a negative or
            non-finite tensor is an error on the CPU and makes the loss NaN on CUDA (:func:`check_normalizer`).
        return_stats (bool, default False): also return fidelity metrics (Stanton et al.), computed in the same
            forward without gradient or host sync.
        teacher_weights (sequence of K numbers or 1-d Tensor, optional): the teachers' weights, non-negative,
            normalised to sum 1 (uniform by default); a tensor is read on the host, no gradient reaches it.
        ensemble (str, default ``"prob"``): the K teachers' target: ``"prob"`` Σ_k w_k softmax(t_k/T), the mean
            distribution; ``"logit"`` softmax(Σ_k w_k t_k/T). A teacher of weight 0 takes no part.
        tail (str, optional): for a TopK teacher: ``"bucket"`` (default for log-probabilities) keeps the mass
            outside the K as one more class; ``"spread"`` (log-probabilities) spreads it evenly over the V − K
            other classes and takes the KL over all V, which keeps the scale of full-logit KD at T > 1 where the
            bucket does not; ``"renormalize"`` (default and only choice for logits and sampled teachers)
            renormalises the teacher over its K classes (see :func:`fastkd.reference.kd_topk_rows`).
        backend (str, default ``"auto"``): ``"auto"``, ``"triton"``, ``"cpu"``, ``"cuda"`` or ``"reference"``
            (:mod:`fastkd.dispatch`).
        group (ProcessGroup, optional): vocabulary parallelism: the logits' last dim is this rank's contiguous
            slice of the vocabulary, starting at class ``vocab_start`` (default rank × this slice's size: give it
            when the slices differ in size). Every rank returns the loss of the whole rows; each rank's gradient is
            its slice of the full gradient; one all-gather in the forward (two for ``"jsd"`` and ``"tvd"``), none
            in the backward (:mod:`fastkd.distributed`; every divergence, one full teacher). DTensor logits
            placed ``Shard(-1)`` on a 1-D mesh need neither argument.
        vocab_start (int, optional): with ``group``, this rank's first class.

    Returns:
        Tensor: the loss, float32 (float64 for float64 inputs); 0-d, or ``*`` with ``reduction="none"``. With
        ``return_stats=True`` a pair ``(loss, stats)``: ``stats`` maps ``"top1_agreement"``, ``"predictive_kl"``
        (KL(p_t‖p_s)), ``"teacher_entropy"`` and ``"student_entropy"`` (nats), all at T = 1, to 0-d float32
        tensors averaged over the counted rows (0 when none counts).

    Shape:
        student ``(*, V)``; teacher ``(*, V)``, ``(K, *, V)`` or a TopK of ``(*, K)``; labels ``*``; loss ``()`` or
        ``*``. A row is one ``V``-vector: for ``(batch, seq, V)`` logits ``"batchmean"`` averages over tokens.

    Example::

        >>> s, t = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100)
        >>> loss = fastkd.kd_loss(s, t, temperature=4.0, labels=torch.randint(0, 100, (8,)), ce_weight=0.1)
        >>> loss.backward()

    Notes:
        - Several teachers: the Triton kernels read the K rows in place and mix them in log space (no N×V
          target); the C++ and reference backends, and any backend when the teachers require grad, first form the
          target's logits (one N×V float32 tensor, :func:`fastkd.reference.ensemble_teacher_logits`). A list is
          stacked into one (K, N, V) tensor first. ``return_stats`` measures fidelity to the ensemble at T = 1.
        - A TopK teacher takes ``divergence="kl"``; the student keeps its full-row normalisation and gets a gradient
          on all V logits; ``return_stats`` measures fidelity to the sparse teacher. The Triton and C++ kernels sum
          the student's mass outside the K over those columns themselves (never 1 − Σ_K); values that require grad run
          the reference. Slots of index −1 are empty (ragged teachers: top-p, sampled); with tail
          ``"renormalize"`` a row without entries adds no KD loss. A sampled teacher
          (:func:`fastkd.sampled_teacher`) is the target itself, not re-tempered, and runs only at the temperature
          it was drawn at. Rows whose label is ``ignore_index`` may hold anything (their slots are emptied).
          Indices are checked on the host for CPU tensors (in range or −1, distinct), and so are
          log-probabilities (a row whose probabilities sum to more than 1 beyond its dtype's rounding is refused);
          on CUDA neither is read (a host sync): a row with bad indices comes out NaN, but log-probabilities of
          mass above 1 are not detected and give a finite, meaningless loss.
        - Backends: ``"auto"`` runs Triton on CUDA tensors, the C++ kernels on CPU tensors, the reference for
          float64. ``"cuda"`` (never chosen by ``"auto"`` yet) covers kl and reverse_kl with CE and one teacher
          of the student's dtype without ``return_stats``; other calls run on Triton.
        - Accuracy: math in float32 keeps about seven digits of each log-sum-exp; a divergence that is a small
          difference of such numbers keeps fewer (large T, a student close to its teacher): see the README's
          "Float32 limits".
    """
    options = _check_options(
        temperature=temperature,
        divergence=divergence,
        beta=beta,
        reduction=reduction,
        ignore_index=ignore_index,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        scale_by_t2=scale_by_t2,
        normalizer=normalizer,
    )
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    if (
        group is not None
        or vocab_start is not None
        or (type(student_logits) is not torch.Tensor and _dtensor(student_logits))
    ):
        from .distributed import vocab_parallel_kd_loss

        return vocab_parallel_kd_loss(
            student_logits,
            teacher_logits,
            group=group,
            vocab_start=vocab_start,
            labels=labels,
            options=options,
            return_stats=return_stats,
            teacher_weights=teacher_weights,
            ensemble=ensemble,
            tail=tail,
        )
    if isinstance(teacher_logits, TopK):
        if teacher_weights is not None or ensemble != "prob":
            raise ValueError("teacher_weights and ensemble apply to several teachers; a TopK teacher is one")
        return _kd_loss_topk(student_logits, teacher_logits, labels, tail, options, return_stats, backend)
    if tail is not None:
        raise ValueError("tail applies to a TopK teacher only")
    ensemble_teachers = _teacher_ensemble(student_logits, teacher_logits, teacher_weights, ensemble)
    _check_tensors(
        student_logits,
        teacher_logits if ensemble_teachers is None else ensemble_teachers[0][0],
        labels,
        ce_weight=options["ce_weight"],
        ignore_index=options["ignore_index"],
        temperature=options["temperature"],
    )
    row_shape = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    # (N, V) rows: a view whenever the leading dims allow one (none for 2-D logits: a view would add a graph node)
    student = student_logits if student_logits.dim() == 2 else student_logits.reshape(-1, num_classes)
    flat_labels = labels if labels is None or labels.dim() == 1 else labels.reshape(-1)
    t = options["temperature"]

    if ensemble_teachers is None:
        teacher = teacher_logits if teacher_logits.dim() == 2 else teacher_logits.reshape(-1, num_classes)
        teachers = teacher
    else:
        teachers, weights = ensemble_teachers
        teachers = teachers.reshape(teachers.shape[0], -1, num_classes)
    cuda_covers = cuda_backend.covers(
        student,
        teachers,
        divergence=options["divergence"],
        with_metrics=return_stats,
        ensemble=ensemble_teachers is not None,
    )
    chosen = select_backend(backend, student, teachers, kernels=("triton", "cpu", "cuda"), cuda_covers=cuda_covers)
    teacher_weights, fused_ensemble, metrics_teacher = None, "none", None
    if ensemble_teachers is not None:
        if chosen == "triton" and not (torch.is_grad_enabled() and teachers.requires_grad):
            # the fused kernels read the K teacher rows in place: no N×V temporary
            teacher, teacher_weights, fused_ensemble = teachers, weights.to(student.device), ensemble
        else:  # one N×V float32 temporary: the target's logits (C++ and reference backends, teacher gradients)
            teachers = reference.counted_rows_only(teachers, flat_labels, options["ignore_index"])
            teacher = reference.ensemble_teacher_logits(teachers, weights, ensemble=ensemble, temperature=t)
            if return_stats and ensemble == "prob" and t != 1.0:  # the metrics' teacher is the mean at T = 1
                with torch.no_grad():
                    metrics_teacher = reference.ensemble_teacher_logits(
                        teachers, weights, ensemble=ensemble, temperature=1.0
                    )
    if chosen == "cpu" and ensemble_teachers is None:
        reduced = _kd_loss_reduced_cpu(student, teacher, flat_labels, options, return_stats)
        if reduced is not None:  # the metrics come averaged
            loss, metric_means = reduced
            return (loss, dict(zip(FIDELITY_METRICS, metric_means.unbind()))) if return_stats else loss
    divisor = _divisor(options, flat_labels, student.shape[0])
    kernel_metrics = return_stats and metrics_teacher is None
    if chosen in ("triton", "cpu", "cuda"):
        # grad_scale: the gradient each row loss receives from a plain backward of the reduced loss (used by
        # the C++ CPU backend's fused gradient only; on CUDA it would cost a launch)
        wants_grad = torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad)
        grad_scale = torch.ones((), dtype=torch.float32) / divisor if chosen == "cpu" and wants_grad else None
        row_loss, metrics = _KDLossRows.apply(
            student,
            teacher,
            flat_labels,
            grad_scale,
            chosen,
            kernel_metrics,
            teacher_weights,
            fused_ensemble,
            options["kernel"],
        )
    else:
        row_loss = reference.kd_loss_rows(
            student,
            teacher,
            flat_labels,
            temperature=t,
            divergence=options["divergence"],
            beta=options["beta"],
            ignore_index=options["ignore_index"],
            ce_weight=options["ce_weight"],
            kd_weight=options["kd_weight"],
            scale_by_t2=options["scale_by_t2"],
        )
        metrics = (
            reference.kd_fidelity_rows(student, teacher, flat_labels, ignore_index=options["ignore_index"])
            if kernel_metrics
            else None
        )
    if metrics_teacher is not None:
        metrics = reference.kd_fidelity_rows(
            student.detach(), metrics_teacher, flat_labels, ignore_index=options["ignore_index"]
        )

    loss = _reduce(row_loss, row_shape, options["reduction"], divisor)
    return _with_stats(loss, metrics, flat_labels, student.shape[0], options) if return_stats else loss


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`: holds the options, ``forward(student_logits, teacher_logits, labels=None)``.

    ``normalizer`` and ``return_stats`` may also be passed per call to ``forward``.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        divergence: str = "kl",
        beta: float = 0.5,
        reduction: str = "batchmean",
        ignore_index: int = -100,
        ce_weight: float = 0.0,
        kd_weight: float = 1.0,
        scale_by_t2: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.options = dict(
            temperature=temperature,
            divergence=divergence,
            beta=beta,
            reduction=reduction,
            ignore_index=ignore_index,
            ce_weight=ce_weight,
            kd_weight=kd_weight,
            scale_by_t2=scale_by_t2,
        )
        _check_options(normalizer=None, **self.options)
        check_backend_name(backend)
        self.backend = backend

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        normalizer: Union[float, torch.Tensor, None] = None,
        return_stats: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, dict]]:
        return kd_loss(
            student_logits,
            teacher_logits,
            labels=labels,
            normalizer=normalizer,
            return_stats=return_stats,
            backend=self.backend,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
