"""fastkd.linear_kd_loss: KD from the output heads' inputs (fused-linear KD), holding one chunk of rows' logits at
a time instead of the N×V student and teacher logits.

Per chunk of rows the student's logits come from one matmul (the teacher's too, without gradient, when it is given
as hidden states and a head), the kd_loss row kernels of :mod:`fastkd.kd` (Triton, C++) write the chunk's row
losses and the gradient of its logits, and that gradient is folded into the gradients of the hidden states
(``G @ W``), of the weight and of the bias (``Gᵀ @ h`` and ``Σ G``, accumulated in float32) before the next chunk.
With a ``"batchmean"`` or ``"sum"`` reduction the forward computes the gradients; the backward scales them by the
incoming gradient on the device (no host sync). With ``"none"``, and for a second backward through the same graph
(``retain_graph=True``), the backward recomputes the chunks. The specification is
:func:`linear_kd_loss_reference`: :func:`fastkd.kd_loss` on the materialised logits of
:func:`fastkd.reference.head_logits`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import cpu_backend, reference
from .dispatch import check_backend_name, kernel_op, launchers, select_backend
from .kd import (
    _check_options,
    _divisor,
    _finite_number,
    _kd_scale,
    _with_stats,
    check_float_tensor,
    check_labels,
    check_temperature,
    check_topk,
    kd_loss,
    topk_reference_rows,
    topk_teacher_temperature,
)
from .kernel_args import NUM_METRICS, KDOptions, TopKOptions
from .topk import TopK, counted_rows_only

MIN_CHUNK_ELEMENTS = 1 << 24  # the smallest logits chunk :func:`default_chunk_rows` aims at (64 MB in float32)


def default_chunk_rows(num_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk when ``chunk_rows`` is not given: the largest power of two whose chunk of logits
    (rows × ``vocab_size`` elements) holds no more elements than twice the student's hidden states
    (``2 × num_rows × hidden_size``), nor fewer than 2²⁴ (e.g. 512 rows at N = 4096, H = 1024, V = 32000 and at
    N = 8192, H = 4096, V = 128256). Smaller chunks run smaller matmuls (measured on a 2-core CPU at the first
    shape, forward+backward: 128 rows 1.18×, 512 rows 1.10×, 1024 rows 1.01× the time with materialised logits)
    and add one weight-gradient update each; larger ones hold more logits (``python bench/linear_chunk_sweep.py``)."""
    budget = max(2 * num_rows * hidden_size, MIN_CHUNK_ELEMENTS)
    return 1 << max(0, (budget // vocab_size).bit_length() - 1)


class LinearKDOptions(NamedTuple):
    """The options of one linear_kd_loss computation, validated once (a frozen tuple); also the option arguments
    of the ``fastkd::linear_kd_*`` custom ops, taken by keyword (``**options._asdict()``)."""

    temperature: float
    teacher_temperature: float  # a TopK teacher's T_t (see TopKOptions); T for a full teacher
    divergence: str
    beta: float
    ignore_index: int
    ce_weight: float
    kd_scale: float  # kd_weight, times T² with scale_by_t2
    tail: str  # a TopK teacher's tail ("bucket", "spread" or "renormalize"); "" for a full teacher
    vocab_size: int  # the classes: the first vocab_size rows of the heads (columns of teacher logits)
    softcap: Optional[float]  # c of c·tanh(z/c) on the heads' logits, or None
    chunk_rows: int

    def kd(self) -> KDOptions:
        return KDOptions(
            temperature=self.temperature,
            divergence=self.divergence,
            beta=self.beta,
            ignore_index=self.ignore_index,
            ce_weight=self.ce_weight,
            kd_scale=self.kd_scale,
        )

    def topk(self) -> TopKOptions:
        return TopKOptions(
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            tail=self.tail,
            ignore_index=self.ignore_index,
            ce_weight=self.ce_weight,
            kd_scale=self.kd_scale,
        )


class _Inputs(NamedTuple):
    """The tensors of one computation, rows flattened: the student head's input (N, H), weight (Vs, H) and bias
    (Vs,); one teacher: hidden (N, Ht), weight (Vt, Ht), bias (Vt,), or logits (N, Vt), or TopK values and indices
    (N, K); labels (N,). Absent ones are None."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    student_bias: Optional[torch.Tensor]
    teacher_hidden: Optional[torch.Tensor]
    teacher_weight: Optional[torch.Tensor]
    teacher_bias: Optional[torch.Tensor]
    teacher_logits: Optional[torch.Tensor]
    topk_values: Optional[torch.Tensor]
    topk_indices: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# the chunk loop (every backend)
# ----------------------------------------------------------------------------------------------------------------


def _teacher_chunk(inputs: _Inputs, rows: slice, options: LinearKDOptions):
    """The teacher of a chunk of rows: logits (n, vocab_size), or a (values, indices) pair for a TopK teacher."""
    if inputs.topk_values is not None:
        return inputs.topk_values[rows], inputs.topk_indices[rows]
    if inputs.teacher_logits is not None:
        return inputs.teacher_logits[rows, : options.vocab_size]
    with torch.no_grad():
        return reference.head_logits(
            inputs.teacher_hidden[rows],
            inputs.teacher_weight,
            inputs.teacher_bias,
            vocab_size=options.vocab_size,
            softcap=options.softcap,
        )


def _reference_rows_and_grad(logits, teacher, labels, options: LinearKDOptions, grad_rows, with_metrics):
    """:func:`_rows_and_grad` by the reference rows and autograd."""
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(grad_rows is not None)
        if isinstance(teacher, tuple):
            rows = topk_reference_rows(leaf, *teacher, labels, options.topk())
        else:
            rows = reference.kd_loss_rows(
                leaf,
                teacher,
                labels,
                temperature=options.temperature,
                divergence=options.divergence,
                beta=options.beta,
                ignore_index=options.ignore_index,
                ce_weight=options.ce_weight,
                kd_weight=options.kd_scale,
                scale_by_t2=False,
            )
        grad = None if grad_rows is None else torch.autograd.grad(rows, leaf, grad_rows.to(rows.dtype))[0]
    metrics = None
    if with_metrics:
        if isinstance(teacher, tuple):
            values, indices = teacher
            metrics = reference.kd_topk_fidelity_rows(
                logits, values, indices.long(), labels, tail=options.tail, ignore_index=options.ignore_index
            )
        else:
            metrics = reference.kd_fidelity_rows(logits, teacher, labels, ignore_index=options.ignore_index)
    return rows.detach(), metrics, grad


def _rows_and_grad(
    backend: str, logits, teacher, labels, options: LinearKDOptions, grad_rows, with_metrics, unit_rows: bool
):
    """Row losses (n,), metrics (NUM_METRICS, n) or None, and the gradient of Σ grad_rows·row_loss w.r.t. the
    chunk's (n, V) ``logits`` (None when ``grad_rows`` is None; ``unit_rows``: grad_rows are all 1) by one
    backend's row kernels."""
    if backend == "reference":
        return _reference_rows_and_grad(logits, teacher, labels, options, grad_rows, with_metrics)
    kernels = launchers(backend, "kd")
    if isinstance(teacher, tuple):
        values, indices = teacher
        rows, stats, metrics = kernels.kd_topk_forward(
            logits, values, indices, labels, options.topk(), with_metrics=with_metrics
        )
        grad = (
            None
            if grad_rows is None
            else kernels.kd_topk_backward(grad_rows, logits, values, indices, labels, stats, options.topk())
        )
        return rows, metrics, grad
    kd_options = options.kd()
    if backend == "cpu" and unit_rows and kd_options.divergence in cpu_backend.FUSED_DIVERGENCES:
        # one kernel writes the losses and the gradient of their sum
        rows, _stats, metrics, grad, _ = cpu_backend.kd_forward_with_grad(
            logits, teacher, labels, kd_options, grad_scale=1.0, teacher_grad=False, with_metrics=with_metrics
        )
        return rows, metrics, grad
    rows, stats, metrics = kernels.kd_forward(logits, teacher, labels, kd_options, with_metrics=with_metrics)
    if grad_rows is None:
        return rows, metrics, None
    grad, _ = kernels.kd_backward(grad_rows, logits, teacher, labels, stats, kd_options, teacher_grad=False)
    return rows, metrics, grad


def _add_product(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``accumulator += a @ b`` for a float32 (V, H) accumulator, (V, n) ``a`` and (n, H) ``b``. A float16/bfloat16
    product is formed in its dtype (float32 accumulation inside the matmul) in blocks of accumulator rows no larger
    than ``a`` (the chunk's logits), then added: no (V, H) temporary."""
    if a.dtype == torch.float32:
        accumulator.addmm_(a, b)
        return
    block = max(1, a.numel() // max(b.shape[1], 1))
    for start in range(0, accumulator.shape[0], block):
        accumulator[start : start + block] += torch.mm(a[start : start + block], b)


def _chunks(
    inputs: _Inputs,
    options: LinearKDOptions,
    backend: str,
    *,
    with_metrics: bool,
    grad_rows: Optional[torch.Tensor],
    wants: tuple[bool, bool, bool],
):
    """Row losses (N,), metrics (NUM_METRICS, N or 0) and the gradients of Σ grad_rows·row_loss (unit weights when
    ``grad_rows`` is None) w.r.t. the student's hidden states (their dtype), weight and bias (float32), each an
    empty tensor unless ``wants`` (hidden, weight, bias) asks for it; chunk by chunk."""
    hidden, weight, bias = inputs.student_hidden, inputs.student_weight, inputs.student_bias
    num_rows, vocab, softcap = hidden.shape[0], options.vocab_size, options.softcap
    math_dtype = torch.float32 if backend != "reference" else reference._math_dtype(hidden)
    device = hidden.device
    row_loss = torch.empty(num_rows, dtype=math_dtype, device=device)
    metrics = torch.empty((NUM_METRICS, num_rows) if with_metrics else (0,), dtype=math_dtype, device=device)
    grad_hidden = torch.empty(hidden.shape if wants[0] else (0,), dtype=hidden.dtype, device=device)
    grad_weight = torch.zeros(weight.shape if wants[1] else (0,), dtype=torch.float32, device=device)
    grad_bias = torch.zeros(bias.shape if wants[2] else (0,), dtype=torch.float32, device=device)
    with_grad = any(wants)
    unit_rows = torch.ones((), dtype=torch.float32, device=device)
    for start in range(0, num_rows, options.chunk_rows):
        rows = slice(start, min(num_rows, start + options.chunk_rows))
        h = hidden[rows]
        logits = reference.head_logits(h, weight, bias, vocab_size=vocab, softcap=softcap)
        labels = None if inputs.labels is None else inputs.labels[rows]
        chunk_grad_rows = None
        if with_grad:
            chunk_grad_rows = unit_rows.expand(h.shape[0]) if grad_rows is None else grad_rows[rows]
        loss, chunk_metrics, grad = _rows_and_grad(
            backend,
            logits,
            _teacher_chunk(inputs, rows, options),
            labels,
            options,
            chunk_grad_rows,
            with_metrics,
            unit_rows=with_grad and grad_rows is None,
        )
        row_loss[rows] = loss
        if with_metrics:
            metrics[:, rows] = chunk_metrics
        if not with_grad:
            continue
        if softcap is not None:  # d(c·tanh(z/c))/dz = 1 − tanh²(z/c)
            grad = grad * (1 - (logits / softcap).square())
        grad = grad.to(hidden.dtype)
        if wants[0]:
            torch.mm(grad, weight[:vocab], out=grad_hidden[rows])
        if wants[1]:
            _add_product(grad_weight[:vocab], grad.t(), h)
        if wants[2]:
            grad_bias[:vocab] += grad.sum(0, dtype=torch.float32)
    return row_loss, metrics, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------------------------------------------
# custom ops (kernel backends: "triton" and "cpu")
# ----------------------------------------------------------------------------------------------------------------


@kernel_op("linear_kd_forward")
def _linear_kd_forward_op(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor],
    teacher_bias: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor],
    topk_values: Optional[torch.Tensor],
    topk_indices: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    temperature: float,
    teacher_temperature: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    ce_weight: float,
    kd_scale: float,
    tail: str,
    vocab_size: int,
    softcap: Optional[float],
    chunk_rows: int,
    backend: str,
    with_metrics: bool,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = _Inputs(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        topk_values,
        topk_indices,
        labels,
    )
    options = LinearKDOptions(
        temperature,
        teacher_temperature,
        divergence,
        beta,
        ignore_index,
        ce_weight,
        kd_scale,
        tail,
        vocab_size,
        softcap,
        chunk_rows,
    )
    return _chunks(
        inputs, options, backend, with_metrics=with_metrics, grad_rows=None, wants=(grad_hidden, grad_weight, grad_bias)
    )


def _fake_grads(student_hidden, student_weight, student_bias, wants):
    return (
        student_hidden.new_empty(student_hidden.shape if wants[0] else (0,)),
        student_hidden.new_empty(student_weight.shape if wants[1] else (0,), dtype=torch.float32),
        student_hidden.new_empty(student_bias.shape if wants[2] else (0,), dtype=torch.float32),
    )


@_linear_kd_forward_op.register_fake
def _(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    teacher_logits,
    topk_values,
    topk_indices,
    labels,
    temperature,
    teacher_temperature,
    divergence,
    beta,
    ignore_index,
    ce_weight,
    kd_scale,
    tail,
    vocab_size,
    softcap,
    chunk_rows,
    backend,
    with_metrics,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    num_rows = student_hidden.shape[0]
    return (
        student_hidden.new_empty(num_rows, dtype=torch.float32),
        student_hidden.new_empty((NUM_METRICS, num_rows) if with_metrics else (0,), dtype=torch.float32),
        *_fake_grads(student_hidden, student_weight, student_bias, (grad_hidden, grad_weight, grad_bias)),
    )


@kernel_op("linear_kd_backward")
def _linear_kd_backward_op(
    grad_rows: torch.Tensor,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: Optional[torch.Tensor],
    teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor],
    teacher_bias: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor],
    topk_values: Optional[torch.Tensor],
    topk_indices: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    temperature: float,
    teacher_temperature: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    ce_weight: float,
    kd_scale: float,
    tail: str,
    vocab_size: int,
    softcap: Optional[float],
    chunk_rows: int,
    backend: str,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = _Inputs(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        topk_values,
        topk_indices,
        labels,
    )
    options = LinearKDOptions(
        temperature,
        teacher_temperature,
        divergence,
        beta,
        ignore_index,
        ce_weight,
        kd_scale,
        tail,
        vocab_size,
        softcap,
        chunk_rows,
    )
    _, _, *grads = _chunks(
        inputs,
        options,
        backend,
        with_metrics=False,
        grad_rows=grad_rows.to(torch.float32),
        wants=(grad_hidden, grad_weight, grad_bias),
    )
    return tuple(grads)


@_linear_kd_backward_op.register_fake
def _(
    grad_rows,
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    teacher_logits,
    topk_values,
    topk_indices,
    labels,
    temperature,
    teacher_temperature,
    divergence,
    beta,
    ignore_index,
    ce_weight,
    kd_scale,
    tail,
    vocab_size,
    softcap,
    chunk_rows,
    backend,
    grad_hidden,
    grad_weight,
    grad_bias,
):
    return _fake_grads(student_hidden, student_weight, student_bias, (grad_hidden, grad_weight, grad_bias))


def _forward(inputs: _Inputs, options: LinearKDOptions, backend: str, with_metrics: bool, wants):
    if backend == "reference":  # autograd inside: not through a custom op
        return _chunks(inputs, options, backend, with_metrics=with_metrics, grad_rows=None, wants=wants)
    return _linear_kd_forward_op(
        *inputs,
        **options._asdict(),
        backend=backend,
        with_metrics=with_metrics,
        grad_hidden=wants[0],
        grad_weight=wants[1],
        grad_bias=wants[2],
    )


def _backward(grad_rows: torch.Tensor, inputs: _Inputs, options: LinearKDOptions, backend: str, wants):
    if backend == "reference":
        return _chunks(inputs, options, backend, with_metrics=False, grad_rows=grad_rows, wants=wants)[2:]
    return _linear_kd_backward_op(
        grad_rows,
        *inputs,
        **options._asdict(),
        backend=backend,
        grad_hidden=wants[0],
        grad_weight=wants[1],
        grad_bias=wants[2],
    )


class _LinearKD(torch.autograd.Function):
    """Row losses (``total=False``) or their sum (``total=True``) of a linear_kd_loss; the gradient reaches the
    student's hidden states, weight and bias only (the teacher's tensors are constants).

    With ``total=True`` and grad mode on (``grad_enabled``) the forward computes the gradients of the sum (the
    ``_chunks`` loop) and the backward scales them by the incoming 0-d gradient, on the device, in place in eager
    mode (then a second backward through the same graph recomputes the chunks). With ``total=False`` the backward
    recomputes the chunks with the incoming row gradients.
    """

    @staticmethod
    def forward(
        ctx, options: LinearKDOptions, backend: str, with_metrics: bool, total: bool, grad_enabled: bool, *tensors
    ):
        inputs = _Inputs(*tensors)
        wants = tuple(ctx.needs_input_grad[5:8])
        fuse = total and grad_enabled and any(wants)
        row_loss, metrics, *grads = _forward(inputs, options, backend, with_metrics, wants if fuse else (False,) * 3)
        ctx.save_for_backward(*tensors)
        ctx.options, ctx.backend, ctx.total, ctx.num_rows = options, backend, total, row_loss.shape[0]
        ctx.fused_grads = grads if fuse else None
        ctx.in_place = not torch.compiler.is_compiling()
        ctx.mark_non_differentiable(metrics)
        return (row_loss.sum() if total else row_loss), metrics

    @staticmethod
    @once_differentiable  # the gradient has no graph of its own: create_graph=True is refused, loudly
    def backward(ctx, grad_output, _grad_metrics):
        inputs = _Inputs(*ctx.saved_tensors)
        wants = tuple(ctx.needs_input_grad[5:8])
        if ctx.fused_grads is not None:
            grads = ctx.fused_grads
            if ctx.in_place:
                ctx.fused_grads = None  # scaled in place below: a second backward recomputes
                grads = [g.mul_(grad_output) for g in grads]
            else:
                grads = [g * grad_output for g in grads]
        else:
            grad_rows = grad_output.expand(ctx.num_rows) if ctx.total else grad_output
            grads = _backward(grad_rows, inputs, ctx.options, ctx.backend, wants)
        params = (inputs.student_hidden, inputs.student_weight, inputs.student_bias)
        grads = [g.to(p.dtype) if want else None for g, p, want in zip(grads, params, wants)]
        return (None,) * 5 + tuple(grads) + (None,) * 7


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def _check_float(name: str, x, device: Optional[torch.device] = None) -> None:
    check_float_tensor(name, x)
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on the device of student_hidden ({device}), got {x.device}")


def _check_head(prefix: str, hidden, weight, bias, row_shape, device) -> None:
    """A head's hidden states (*, H), weight (V, H) and bias (V,): one dtype, one device, matching sizes."""
    _check_float(f"{prefix}_hidden", hidden, device)
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{prefix}_hidden must have shape (*, H) with H >= 1, got {tuple(hidden.shape)}")
    if row_shape is not None and hidden.shape[:-1] != row_shape:
        raise ValueError(
            f"{prefix}_hidden must have the leading dims of student_hidden, {tuple(row_shape)}, got "
            f"{tuple(hidden.shape[:-1])}"
        )
    _check_float(f"{prefix}_weight", weight, hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{prefix}_weight must have shape (V, H) with V >= 1 and H = {prefix}_hidden.shape[-1] = "
            f"{hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight must have the dtype of {prefix}_hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        _check_float(f"{prefix}_bias", bias, hidden.device)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{prefix}_bias must have the dtype of {prefix}_hidden ({hidden.dtype}), got {bias.dtype}")


def _check_vocab_size(vocab_size, student_classes: int, teacher_classes: int, teacher_what: str) -> int:
    if vocab_size is None:
        if student_classes != teacher_classes:
            raise ValueError(
                f"student_weight has {student_classes} rows (classes) and {teacher_what} {teacher_classes}: give "
                f"vocab_size, the classes both share (the first vocab_size; the rest are padding)"
            )
        return student_classes
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= min(student_classes, teacher_classes):
        raise ValueError(
            f"vocab_size must lie in [1, {min(student_classes, teacher_classes)}] (student_weight has "
            f"{student_classes} rows, {teacher_what} {teacher_classes}), got {vocab_size}"
        )
    return vocab_size


def _teacher_inputs(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, row_shape, device):
    """(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, topk_values, topk_indices) flattened to
    rows and detached, the teacher's number of classes and what holds them (for messages)."""
    given_head = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    if given_head == (teacher_logits is not None):
        raise ValueError(
            "give the teacher either as teacher_hidden and teacher_weight (with an optional teacher_bias) or as "
            "teacher_logits (a tensor or a fastkd.TopK), not both"
        )
    if given_head:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("a teacher head needs both teacher_hidden and teacher_weight")
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, row_shape, device)
        hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        bias = None if teacher_bias is None else teacher_bias.detach()
        teacher = (hidden, teacher_weight.detach(), bias, None, None, None)
        return teacher, teacher_weight.shape[0], "teacher_weight has"
    if isinstance(teacher_logits, TopK):  # checked by kd.check_topk once the classes are known
        k = teacher_logits.values.shape[-1]
        values, indices = teacher_logits.values.detach().reshape(-1, k), teacher_logits.indices.reshape(-1, k)
        return (None,) * 4 + (values, indices), None, "the TopK teacher"
    _check_float("teacher_logits", teacher_logits, device)
    if teacher_logits.shape[:-1] != row_shape or teacher_logits.dim() == 0 or teacher_logits.shape[-1] == 0:
        raise ValueError(
            f"teacher_logits must have shape (*, V) with * = {tuple(row_shape)} (the leading dims of "
            f"student_hidden) and V >= 1, got {tuple(teacher_logits.shape)}"
        )
    logits = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    return (None,) * 3 + (logits, None, None), teacher_logits.shape[-1], "teacher_logits have"


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    teacher_logits: Union[torch.Tensor, TopK, None] = None,
    labels: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    scale_by_t2: bool = True,
    reduction: str = "batchmean",
    normalizer: Union[float, torch.Tensor, None] = None,
    vocab_size: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    chunk_rows: Optional[int] = None,
    return_stats: bool = False,
    tail: Optional[str] = None,
    backend: str = "auto",
    group=None,
    vocab_start: Optional[int] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, dict]]:
    r""":func:`fastkd.kd_loss` of the logits two output heads give, computed chunk by chunk of rows, never holding
    the N×V logits.

    With z_s = student_hidden @ student_weight[:V]ᵀ (+ student_bias[:V]) and the teacher's z_t alike (or given),
    each optionally soft-capped (z ← c·tanh(z/c), before the temperature), it returns::

        kd_loss(z_s, z_t, labels=labels, temperature=..., divergence=..., reduction=..., ...)

    with the same value and gradients (:func:`linear_kd_loss_reference` computes exactly that expression). V is
    ``vocab_size``, else the heads' common number of rows.

    Args:
        student_hidden (Tensor): ``(*, H)``, the student head's input, float32, float16 or bfloat16 (float64 runs
            the reference rows); gets a gradient.
        student_weight (Tensor): ``(Vs, H)``, the student head's weight (``nn.Linear.weight``, or a tied
            embedding's), dtype of ``student_hidden``; gets a gradient unless ``requires_grad=False`` (then no
            weight-gradient buffer is allocated).
        teacher_hidden, teacher_weight (Tensor, optional): ``(*, Ht)`` and ``(Vt, Ht)``: the teacher's head, its
            logits computed chunk by chunk without gradient (Ht may differ from H).
        student_bias, teacher_bias (Tensor, optional): ``(Vs,)`` and ``(Vt,)``.
        teacher_logits (Tensor or TopK, optional): instead of a teacher head: full logits ``(*, Vt)`` or a sparse
            :class:`fastkd.TopK` teacher ``(*, K)`` (``divergence="kl"``, see ``tail``). Used as given
            (``logit_softcap`` applies to the heads only). No gradient reaches the teacher in any form.
        labels (Tensor, optional): ``*``, int64 or int32, in [0, V) or ``ignore_index``.
        temperature, divergence, beta, ignore_index, ce_weight, kd_weight, scale_by_t2, reduction, normalizer,
            return_stats, tail: as in :func:`fastkd.kd_loss`.
        vocab_size (int, optional): the classes: the first ``vocab_size`` rows of each head (columns of
            ``teacher_logits``); the rest (padded vocabularies, a teacher with more rows) are absent, not
            zero-probability classes. Needed when the two sides have different numbers of classes.
        logit_softcap (float, optional): c > 0 of Gemma's c·tanh(z/c), on the logits of both heads.
        chunk_rows (int, optional): rows per chunk (default :func:`default_chunk_rows`).
        backend (str, default ``"auto"``): ``"triton"`` or ``"cpu"`` row kernels (``"auto"``: Triton on CUDA,
            C++ on CPU, also for a TopK teacher; float64 runs the reference rows, still chunked);
            ``"reference"`` the reference rows chunk by chunk.
        group (ProcessGroup, optional), vocab_start (int, optional): vocabulary-parallel heads, as in
            :func:`fastkd.kd_loss`: ``student_weight`` (with ``student_bias``) and ``teacher_weight`` (or the
            columns of ``teacher_logits``) are this rank's slice of the vocabulary. One all-gather in the forward,
            none in the backward (:func:`fastkd.distributed.vocab_parallel_linear_kd_loss`; two for jsd and tvd),
            with or without CE; no softcap, ``vocab_size`` or TopK teacher; the teacher gets no gradient.
            The hidden states' gradient is this rank's part (its slice's logits): the layer that made them reduces
            it over the group, as a column-parallel head's input gradient is.

    Returns:
        Tensor (and a stats dict with ``return_stats``): as :func:`fastkd.kd_loss`.

    Shape:
        hidden ``(*, H)``; labels, teacher logits and TopK ``(*, ·)`` with the same leading dims; the loss ``()`` or
        ``*`` with ``reduction="none"``.

    Example::

        >>> h, w = torch.randn(64, 32, requires_grad=True), torch.randn(1000, 32, requires_grad=True)
        >>> th, tw = torch.randn(64, 48), torch.randn(1000, 48)
        >>> fastkd.linear_kd_loss(h, w, th, tw, temperature=2.0).backward()

    Notes:
        - Memory: besides the gradients themselves (the weight's in float32 while it accumulates), one chunk's
          student and teacher logits and their gradient, ``chunk_rows × V`` each.
        - With ``reduction="batchmean"`` or ``"sum"`` the forward computes the gradients (one pass over the
          chunks) and the backward only scales them; with ``"none"`` the backward recomputes the chunks with the
          incoming row gradients. A second backward (``retain_graph=True``) recomputes. ``create_graph=True`` is
          refused.
        - float16/bfloat16 heads: each chunk's logits are one matmul in that dtype (float32 accumulation), as in
          the expression above; each chunk's weight-gradient product is added to a float32 accumulator in blocks of
          rows no larger than the chunk's logits.
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
    _check_head("student", student_hidden, student_weight, student_bias, None, None)
    if group is not None or vocab_start is not None:
        return _vocab_parallel(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            teacher_logits,
            labels,
            options,
            group=group,
            vocab_start=vocab_start,
            chunk_rows=chunk_rows,
            vocab_size=vocab_size,
            logit_softcap=logit_softcap,
            return_stats=return_stats,
        )
    device, row_shape = student_hidden.device, student_hidden.shape[:-1]
    if isinstance(teacher_logits, TopK):  # padded rows may hold anything
        teacher_logits = counted_rows_only(teacher_logits, labels, options["ignore_index"])
    teacher, teacher_classes, teacher_what = _teacher_inputs(
        teacher_hidden, teacher_weight, teacher_bias, teacher_logits, row_shape, device
    )
    topk = isinstance(teacher_logits, TopK)
    if topk:
        teacher_classes = student_weight.shape[0] if vocab_size is None else vocab_size
    vocab_size = _check_vocab_size(vocab_size, student_weight.shape[0], teacher_classes, teacher_what)
    if topk:
        tail = check_topk(
            teacher_logits,
            row_shape,
            vocab_size,
            device,
            tail=tail,
            divergence=options["divergence"],
            holder="student_hidden",
            temperature=options["temperature"],
        )
    elif tail is not None:
        raise ValueError("tail applies to a TopK teacher only")
    if logit_softcap is not None:
        logit_softcap = _finite_number("logit_softcap", logit_softcap, positive=True)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    num_rows = hidden.shape[0]
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(num_rows, hidden.shape[1], vocab_size)
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    teacher_tensors = [x for x in teacher if x is not None and x.is_floating_point()]
    check_temperature(options["temperature"], reference._math_dtype(hidden, *teacher_tensors))
    check_labels(
        labels, row_shape, vocab_size, device, ce_weight=options["ce_weight"], ignore_index=options["ignore_index"]
    )
    flat_labels = None if labels is None else labels.reshape(-1)
    chosen = select_backend(backend, hidden, *teacher_tensors, op="linear_kd_loss", kernels=("triton", "cpu"))
    linear_options = LinearKDOptions(
        temperature=options["temperature"],
        teacher_temperature=topk_teacher_temperature(teacher_logits, options["temperature"])
        if topk
        else options["temperature"],
        divergence=options["divergence"],
        beta=options["beta"],
        ignore_index=options["ignore_index"],
        ce_weight=options["ce_weight"],
        kd_scale=_kd_scale(options),
        tail=tail if topk else "",
        vocab_size=vocab_size,
        softcap=logit_softcap,
        chunk_rows=chunk_rows,
    )
    total = options["reduction"] != "none"
    loss, metrics = _LinearKD.apply(
        linear_options,
        chosen,
        return_stats,
        total,
        torch.is_grad_enabled(),
        hidden,
        student_weight,
        student_bias,
        *teacher,
        flat_labels,
    )
    if options["reduction"] == "none":
        loss = loss.reshape(row_shape)
    elif options["reduction"] == "batchmean":
        loss = loss / _divisor(options, flat_labels, num_rows)
    return _with_stats(loss, metrics, flat_labels, num_rows, options) if return_stats else loss


def _vocab_parallel(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    teacher_logits,
    labels,
    options,
    *,
    group,
    vocab_start,
    chunk_rows,
    vocab_size,
    logit_softcap,
    return_stats,
):
    """linear_kd_loss with ``group``: the checks of its sharded heads, then :mod:`fastkd.distributed`."""
    from .distributed import vocab_parallel_linear_kd_loss

    if isinstance(teacher_logits, TopK) or vocab_size is not None or logit_softcap is not None:
        raise ValueError("linear_kd_loss with group= takes no TopK teacher, vocab_size or logit_softcap for now")
    row_shape, local_classes = student_hidden.shape[:-1], student_weight.shape[0]
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None:
            raise ValueError("give the teacher either as teacher_hidden and teacher_weight or as teacher_logits")
        if teacher_logits.shape != (*row_shape, local_classes):
            raise ValueError(
                f"teacher_logits must have shape {(*row_shape, local_classes)} (this rank's slice), got "
                f"{tuple(teacher_logits.shape)}"
            )
    else:
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, row_shape, student_hidden.device)
        if teacher_weight.shape[0] != local_classes:
            raise ValueError(
                f"teacher_weight must hold this rank's {local_classes} classes, like student_weight, got "
                f"{teacher_weight.shape[0]}"
            )
    check_labels(
        labels,
        row_shape,
        None,
        student_hidden.device,
        ce_weight=options["ce_weight"],
        ignore_index=options["ignore_index"],
    )
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(row_shape.numel(), student_hidden.shape[-1], max(local_classes, 1))
    return vocab_parallel_linear_kd_loss(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        labels,
        group=group,
        vocab_start=vocab_start,
        options=options,
        chunk_rows=chunk_rows,
        return_stats=return_stats,
    )


def linear_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    teacher_logits: Union[torch.Tensor, TopK, None] = None,
    vocab_size: Optional[int] = None,
    logit_softcap: Optional[float] = None,
    **kd_options,
) -> Union[torch.Tensor, tuple[torch.Tensor, dict]]:
    """The specification of :func:`linear_kd_loss`: the heads' logits materialised
    (:func:`fastkd.reference.head_logits`; the teacher's without gradient) and :func:`fastkd.kd_loss` with
    ``backend="reference"`` and ``kd_options``."""
    vocab = vocab_size if vocab_size is not None else student_weight.shape[0]
    student = reference.head_logits(
        student_hidden, student_weight, student_bias, vocab_size=vocab, softcap=logit_softcap
    )
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = reference.head_logits(
                teacher_hidden, teacher_weight, teacher_bias, vocab_size=vocab, softcap=logit_softcap
            )
    elif isinstance(teacher_logits, torch.Tensor):
        teacher_logits = teacher_logits.detach()[..., :vocab]
    return kd_loss(student, teacher_logits, backend="reference", **kd_options)


def head_parameters(head: nn.Module, name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The (V, H) weight and the bias (or None) of an output head module named ``name`` in messages."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"{name} must be an output head with a 2-d weight (V, H): an nn.Linear or a tied nn.Embedding, got "
            f"{type(head).__name__}"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


class LinearKDLoss(nn.Module):
    """Module form of :func:`linear_kd_loss` over two output heads (``nn.Linear``, or a tied ``nn.Embedding``:
    any module with a ``(V, H)`` ``weight`` and an optional ``bias``); the teacher head may be omitted when each
    call passes ``teacher_logits``. The heads are referenced, not registered: the loss adds no parameters or
    state_dict entries.

    ``forward(student_hidden, teacher_hidden=None, labels=None, *, teacher_logits=None, normalizer=None,
    return_stats=False)``.
    """

    def __init__(
        self,
        student_head: nn.Module,
        teacher_head: Optional[nn.Module] = None,
        *,
        vocab_size: Optional[int] = None,
        logit_softcap: Optional[float] = None,
        chunk_rows: Optional[int] = None,
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
        head_parameters(student_head, "student_head")
        if teacher_head is not None:
            head_parameters(teacher_head, "teacher_head")
        self._heads = (student_head, teacher_head)  # a tuple: not registered as submodules
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
        self.head_options = dict(vocab_size=vocab_size, logit_softcap=logit_softcap, chunk_rows=chunk_rows)
        self.backend = backend

    def forward(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        teacher_logits: Union[torch.Tensor, TopK, None] = None,
        normalizer: Union[float, torch.Tensor, None] = None,
        return_stats: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, dict]]:
        student_head, teacher_head = self._heads
        student_weight, student_bias = head_parameters(student_head, "student_head")
        teacher_weight = teacher_bias = None
        if teacher_hidden is not None:
            if teacher_head is None:
                raise ValueError(
                    "teacher_hidden needs a teacher_head; construct LinearKDLoss(student_head, teacher_head)"
                )
            teacher_weight, teacher_bias = head_parameters(teacher_head, "teacher_head")
        return linear_kd_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            teacher_logits=teacher_logits,
            labels=labels,
            normalizer=normalizer,
            return_stats=return_stats,
            backend=self.backend,
            **self.head_options,
            **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self.head_options, **self.options}.items())
