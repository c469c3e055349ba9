r"""Masked feature matching: ``fastkd.feature_loss`` (FitNets, OFD, FEED), ``fastkd.ofd_margin`` and
``fastkd.FEED``.

The features are viewed as (N, C, S): the batch, the channels (``channel_dim``) and every other dim flattened
into S (spatial positions or tokens). Then, with m the mask broadcast to the features (bool or float; elements
with m = 0 are absent: no statistic, no loss, zero gradient)::

    normalize:  "channel": y = (x − mean)/sqrt(var + 1e-5) per (sample, channel) over S      (both sides)
                "sample":  the same per sample over C and S
                "l2":      y = x / max(‖x‖₂, 1e-12) along the channels, per (sample, position)
    margin (OFD): t' = max(t, m_c) per channel; an element counts when s > t' or t' > 0
    kind:       "mse" (s − t)², "l1" |s − t|, "smooth_l1" (½d²/β if |d| < β else |d| − ½β),
                "cosine" 1 − ⟨s, t⟩/(max(‖s‖, 1e-8)·max(‖t‖, 1e-8)) along the channels, per position

Statistics (mean, variance, norms) run over the present elements. ``reduction="mean"`` divides Σ m·term by Σ m
(the masked count; for "cosine" the count of positions); a fully masked input gives 0, not NaN. ``"sum"`` is
Σ m·term. For "cosine" and "l2" the mask must be constant along the channels (size 1 there).

Backends (:mod:`fastkd.dispatch`): ``"triton"`` runs one fused kernel per pass (CUDA, or the interpreter on
CPU), the statistics computed in the same launch, one program per normalisation group; ``"cpu"`` runs the same
algorithm in the C++ extension (csrc/feature_loss_impl.h, OpenMP over groups, the same bits for any thread count);
for plain features there (contiguous, no mask, normalisation or margin, an element-wise kind) one flat pass returns
the loss and both gradients, and the backward only scales them (:mod:`fastkd.fused_gradient`).
``normalize="channel"`` or ``"sample"`` with ``kind="cosine"`` mixes two groupings and always runs the reference.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import cpu_backend, fused_gradient, reference
from .adapters import adapter_for
from .dispatch import kernel_op, kernel_or_reference, launchers, select_backend
from .kernel_args import FeatureGroup, feature_groups

KINDS = ("mse", "l1", "smooth_l1", "cosine")
NORMALIZATIONS = (None, "channel", "sample", "l2")
REDUCTIONS = ("mean", "sum")


@kernel_op("feature_loss_groups")
def _feature_loss_groups_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor],
    margin: Optional[torch.Tensor],
    kind: str,
    normalize: str,
    group: int,
    beta: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers(backend, "features").feature_forward(
        student, teacher, mask, margin, kind=kind, normalize=normalize or None, group=group, beta=beta
    )


@_feature_loss_groups_op.register_fake
def _(student, teacher, mask, margin, kind, normalize, group, beta, backend):
    num_n, num_c, num_s = student.shape
    groups = feature_groups(group, num_n, num_c, num_s)
    return student.new_empty(groups, dtype=torch.float32), student.new_empty(groups, dtype=torch.float32)


@kernel_op("feature_loss_backward")
def _feature_loss_backward_op(
    scale: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: Optional[torch.Tensor],
    margin: Optional[torch.Tensor],
    kind: str,
    normalize: str,
    group: int,
    beta: float,
    backend: str,
    teacher_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return launchers(backend, "features").feature_backward(
        scale,
        student,
        teacher,
        mask,
        margin,
        kind=kind,
        normalize=normalize or None,
        group=group,
        beta=beta,
        teacher_grad=teacher_grad,
    )


@_feature_loss_backward_op.register_fake
def _(scale, student, teacher, mask, margin, kind, normalize, group, beta, backend, teacher_grad):
    return torch.empty_like(student), torch.empty_like(teacher) if teacher_grad else teacher.new_empty(0)


def _over(x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    """x ÷ divisor, and 0 where the divisor is 0 (nothing counted), never NaN."""
    return torch.where(divisor > 0, x / divisor.clamp_min(torch.finfo(divisor.dtype).tiny), 0)


class _FeatureLoss(torch.autograd.Function):
    """(N, C, S) features → 0-d float32 loss through the kernels; backward scales by incoming grad ÷ divisor."""

    @staticmethod
    def forward(ctx, student, teacher, mask, margin, kind, normalize, group, beta, backend, mean):
        terms, weights = _feature_loss_groups_op(student, teacher, mask, margin, kind, normalize, group, beta, backend)
        total = terms.sum()
        divisor = weights.sum() if mean else torch.ones((), dtype=torch.float32, device=terms.device)
        loss = _over(total, divisor)
        ctx.save_for_backward(student, teacher, mask, margin, divisor)
        ctx.options = (kind, normalize, group, beta, backend)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, mask, margin, divisor = ctx.saved_tensors
        scale = _over(grad_loss, divisor)
        teacher_grad = ctx.needs_input_grad[1]
        grad_s, grad_t = _feature_loss_backward_op(
            scale.reshape(1).to(torch.float32), student, teacher, mask, margin, *ctx.options, teacher_grad
        )
        return grad_s, grad_t if teacher_grad else None, None, None, None, None, None, None, None, None


# plain features (contiguous, no mask, normalisation or margin, an element-wise kind): the loss and its gradient in
# one call of the C++ backend


@kernel_op("feature_loss_flat")
def _feature_loss_flat_op(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float, mean: bool, grad: bool, teacher_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return cpu_backend.feature_loss_flat(
        student, teacher, kind=kind, beta=beta, mean=mean, grad=grad, teacher_grad=teacher_grad
    )


@_feature_loss_flat_op.register_fake
def _(student, teacher, kind, beta, mean, grad, teacher_grad):
    return (
        student.new_empty((), dtype=torch.float32),
        student.new_empty(student.shape if grad else (0,)),
        teacher.new_empty(teacher.shape if teacher_grad else (0,)),
    )


class _FeatureLossFlat(torch.autograd.Function):
    """Plain features on the C++ backend: the forward's one call returns the loss and its gradients, the backward
    hands them on (:mod:`fastkd.fused_gradient`)."""

    @staticmethod
    def forward(ctx, student, teacher, kind, beta, mean):
        wants = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_s, grad_t = _feature_loss_flat_op(student, teacher, kind, beta, mean, *wants)
        fused_gradient.keep(ctx, (grad_s, grad_t), (student, teacher))
        ctx.options = kind, beta, mean
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        wants = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s, grad_t = fused_gradient.take(
            ctx, grad_loss, lambda student, teacher: _feature_loss_flat_op(student, teacher, *ctx.options, *wants)[1:]
        )
        return grad_s if wants[0] else None, grad_t if wants[1] else None, None, None, None


def _plain(student, teacher, mask, margin, kind: str, normalize: Optional[str]) -> bool:
    """Whether the C++ backend's flat pass (:class:`_FeatureLossFlat`) computes this call: contiguous features,
    no mask, normalisation or margin, an element-wise kind (the layout of the channels then does not matter)."""
    return (
        mask is None
        and margin is None
        and normalize is None
        and kind != "cosine"
        and student.is_contiguous()
        and teacher.is_contiguous()
    )


def _as_groups(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """(N, C, S) view: channels moved to dim 1, the other dims after the batch flattened."""
    x = x.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _check(student, teacher, mask, *, kind, normalize, margin, channel_dim, reduction, beta) -> int:
    for name, x in (("student_feat", student), ("teacher_feat", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_feat and teacher_feat must have the same shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)} (map the student to the teacher with fastkd.adapters.adapter_for)"
        )
    if student.device != teacher.device:
        raise ValueError(f"student_feat is on {student.device}, teacher_feat on {teacher.device}")
    if student.dim() < 2:
        raise ValueError(f"features need a batch and a channel dim, got shape {tuple(student.shape)}")
    if (
        isinstance(channel_dim, bool)
        or not isinstance(channel_dim, int)
        or not -student.dim() <= channel_dim < student.dim()
        or channel_dim % student.dim() == 0
    ):
        raise ValueError(
            f"channel_dim must index a dim other than the batch (dim 0) of {student.dim()}-d features, "
            f"got {channel_dim!r}"
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite positive number, got {beta!r}")
    channel_dim %= student.dim()
    if normalize == "channel" and student.dim() == 2:
        raise ValueError(
            "normalize='channel' standardises each channel over the spatial/token dims, and (N, C) "
            "features have none; use 'sample' or 'l2'"
        )
    if margin is not None:
        if not isinstance(margin, torch.Tensor) or margin.shape != (student.shape[channel_dim],):
            raise ValueError(
                f"margin must be a tensor of shape (C,) = ({student.shape[channel_dim]},), got "
                f"{tuple(margin.shape) if isinstance(margin, torch.Tensor) else type(margin).__name__}"
            )
        if margin.device != student.device:
            raise ValueError(f"margin is on {margin.device}, the features on {student.device}")
        if normalize is not None or kind == "cosine":
            raise ValueError(
                "margin (OFD) applies to raw features with an element-wise kind: use normalize=None and "
                "kind 'mse', 'l1' or 'smooth_l1'"
            )
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool or float tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool or floating-point, got {mask.dtype}")
        if mask.device != student.device:
            raise ValueError(f"mask is on {mask.device}, the features on {student.device}")
        try:
            torch.broadcast_shapes(mask.shape, student.shape)
        except RuntimeError:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the features' shape {tuple(student.shape)}"
            ) from None
        if torch.broadcast_shapes(mask.shape, student.shape) != student.shape:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} would enlarge the features' shape {tuple(student.shape)}"
            )
        aligned = (1,) * (student.dim() - mask.dim()) + tuple(mask.shape)
        if (kind == "cosine" or normalize == "l2") and aligned[channel_dim] != 1:
            raise ValueError(
                f"with kind='cosine' or normalize='l2' the mask must be constant along the channels "
                f"(size 1 at channel_dim={channel_dim}), got mask shape {tuple(mask.shape)}"
            )
    return channel_dim


def _kernel_group(kind: str, normalize: Optional[str], num_c: int, num_s: int) -> Optional[FeatureGroup]:
    """The kernels' normalisation group (kernels/features.py), or None where they do not cover the combination."""
    if kind == "cosine":
        return FeatureGroup.POSITION if normalize in (None, "l2") else None
    if normalize == "channel":
        return FeatureGroup.CHANNEL
    if normalize == "sample":
        return FeatureGroup.SAMPLE
    if normalize == "l2":
        return FeatureGroup.POSITION
    return FeatureGroup.CHANNEL if num_s >= num_c else FeatureGroup.POSITION


def feature_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    kind: str = "mse",
    normalize: Optional[str] = None,
    margin: Optional[torch.Tensor] = None,
    beta: float = 1.0,
    channel_dim: int = 1,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    r"""Masked feature-matching loss between student and teacher features of the same shape (the module docstring
    has the math of each kind and normalisation).

    Args:
        student_feat (Tensor): ``(N, C, H, W)`` maps, ``(N, L, C)`` tokens (``channel_dim=-1``), ``(N, C)`` vectors,
            or any ``(N, …)`` with ``channel_dim`` naming the channels; float32, float16 or bfloat16 (math in
            float32; float64 runs the reference). Gets the gradient.
        teacher_feat (Tensor): the same shape; gets a gradient when it requires one.
        mask (Tensor, optional): bool or float, broadcastable to the features (spatial ``(N, 1, H, W)``, token
            ``(N, L, 1)``, per-channel ``(C, 1, 1)``, …); elements of mask 0 are absent (no statistic, no loss, zero
            gradient), float values weigh the terms. Constant along the channels for ``"cosine"`` and ``"l2"``.
        kind (str, default ``"mse"``): ``"mse"``, ``"l1"``, ``"smooth_l1"`` or ``"cosine"`` (along the channels).
        normalize (str, optional): ``"channel"`` or ``"sample"`` standardisation, or ``"l2"`` along the channels.
        margin (Tensor, optional): OFD's per-channel teacher margin, shape ``(C,)`` (:func:`ofd_margin`); raw
            features and an element-wise kind only.
        beta (float, default 1.0): the smooth-L1 threshold.
        channel_dim (int, default 1): the channels' dim (not the batch's).
        reduction (str, default ``"mean"``): ``"mean"`` Σ mask·term ÷ Σ mask (positions for ``"cosine"``; 0 when
            nothing is present); ``"sum"`` Σ mask·term.
        backend (str, default ``"auto"``): ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        Tensor: 0-d, float32 (float64 for float64 inputs).

    Notes:
        The kernels differentiate the features only: a float ``mask`` or a ``margin`` that requires grad runs the
        reference under ``"auto"`` (and is an error with a kernel backend named). ``normalize="channel"`` or
        ``"sample"`` with ``kind="cosine"`` always runs the reference.

    Example::

        >>> loss = fastkd.feature_loss(adapter(student_map), teacher_map, mask=foreground, normalize="channel")
    """
    channel_dim = _check(
        student_feat,
        teacher_feat,
        mask,
        kind=kind,
        normalize=normalize,
        margin=margin,
        channel_dim=channel_dim,
        reduction=reduction,
        beta=beta,
    )
    if student_feat.numel() == 0:  # nothing to match: 0, connected to both inputs (as a fully masked input)
        return (student_feat.sum() + teacher_feat.sum()).to(reference._math_dtype(student_feat, teacher_feat)) * 0
    num_c = student_feat.shape[channel_dim]
    group = _kernel_group(kind, normalize, num_c, student_feat.numel() // (student_feat.shape[0] * num_c))
    if group is None:
        chosen = select_backend(
            backend,
            student_feat,
            teacher_feat,
            kernels=(),
            op=f"feature_loss with normalize={normalize!r} and kind={kind!r}",
        )
    else:
        chosen = select_backend(backend, student_feat, teacher_feat, op="feature_loss")
    # the kernels differentiate the features only: a mask or margin that wants a gradient runs the reference
    for name, x in (("mask", mask), ("margin", margin)):
        chosen = kernel_or_reference(
            chosen, backend, "feature_loss", name, x is not None and torch.is_grad_enabled() and x.requires_grad
        )
    mean = reduction == "mean"
    if chosen == "cpu" and _plain(student_feat, teacher_feat, mask, margin, kind, normalize):
        if torch.is_grad_enabled() and (student_feat.requires_grad or teacher_feat.requires_grad):
            return _FeatureLossFlat.apply(student_feat, teacher_feat, kind, float(beta), mean)
        return _feature_loss_flat_op(student_feat, teacher_feat, kind, float(beta), mean, False, False)[0]
    student, teacher = _as_groups(student_feat, channel_dim), _as_groups(teacher_feat, channel_dim)
    if chosen in ("triton", "cpu"):  # the kernels read the mask through its strides (0 where it is broadcast)
        groups_mask = (
            None
            if mask is None
            else _as_groups(
                (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).expand(student_feat.shape), channel_dim
            )
        )
        return _FeatureLoss.apply(
            student,
            teacher,
            groups_mask,
            margin,
            kind,
            normalize or "",
            int(group),
            float(beta),
            chosen,
            mean,
        )
    math_dtype = reference._math_dtype(student, teacher)  # cast before expanding: no full-size copy of the mask
    weights_mask = (
        torch.ones((), dtype=math_dtype, device=student.device).expand(student.shape)
        if mask is None
        else _as_groups(mask.to(math_dtype).expand(student_feat.shape), channel_dim)
    )
    terms, weights = reference.feature_loss_terms(
        student, teacher, weights_mask, kind=kind, beta=float(beta), normalize=normalize, margin=margin
    )
    total = terms.sum()
    if reduction == "sum":
        return total
    return _over(total, weights.sum())


def ofd_margin(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    r"""OFD's per-channel margin from the teacher's pre-ReLU BatchNorm (Heo et al. 2019): for x ~ N(β, γ²),
    m = E[x | x < 0] = β − |γ|·φ(β/|γ|)/Φ(−β/|γ|), and −3|γ| where Φ(−β/|γ|) ≤ 1e-3. Returns (C,), no grad."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None or bn.bias is None:
        raise TypeError("ofd_margin needs an affine BatchNorm module (with weight γ and bias β)")
    with torch.no_grad():
        std, mean = bn.weight.detach().abs().double(), bn.bias.detach().double()
        normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
        z = mean / std
        left = normal.cdf(-z)
        margin = mean - std * torch.exp(normal.log_prob(z)) / left.clamp_min(1e-300)
        return torch.where(left > 1e-3, margin, -3 * std).to(bn.weight.dtype)


class FEED(nn.Module):
    r"""Parallel FEED (Park & Kwak 2019): one adapter per teacher on the same student feature, each regressing
    its teacher's feature; ``forward(student_feat, teacher_feats)`` = Σ_k w_k·feature_loss(adapter_k(s), t_k).

    The adapters are sized from example features (``example_student``, ``example_teachers``, e.g. one batch) with
    :func:`fastkd.adapters.adapter_for`, or given as ``adapters``. ``weights``: K numbers (default 1 each).
    ``loss_options`` go to :func:`feature_loss` (FEED regresses L2-normalised maps: ``normalize="l2"`` is the
    default here).
    """

    def __init__(
        self,
        example_student: Optional[torch.Tensor] = None,
        example_teachers: Optional[Sequence[torch.Tensor]] = None,
        *,
        adapters: Optional[Sequence[nn.Module]] = None,
        weights: Optional[Sequence[float]] = None,
        **loss_options,
    ):
        super().__init__()
        if adapters is None:
            if example_student is None or not example_teachers:
                raise ValueError("FEED needs example_student and example_teachers to size its adapters, or adapters")
            adapters = [
                adapter_for(example_student.shape, t.shape).to(example_student.device, example_student.dtype)
                for t in example_teachers
            ]
        self.adapters = nn.ModuleList(adapters)
        weights = [1.0] * len(self.adapters) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.adapters):
            raise ValueError(f"weights has {len(weights)} entries for {len(self.adapters)} teachers")
        self.weights = weights
        self.loss_options = {"normalize": "l2", **loss_options}

    def forward(
        self, student_feat: torch.Tensor, teacher_feats: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if len(teacher_feats) != len(self.adapters):
            raise ValueError(f"teacher_feats has {len(teacher_feats)} features for {len(self.adapters)} adapters")
        return sum(
            w * feature_loss(adapter(student_feat), t, mask=mask, **self.loss_options)
            for w, adapter, t in zip(self.weights, self.adapters, teacher_feats)
        )
