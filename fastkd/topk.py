"""Sparse teachers: the top-K entries an inference server returns instead of a full row of logits.

:class:`TopK` holds them; pass one as ``teacher_logits`` to :func:`fastkd.kd_loss`. :func:`topk_teacher` makes one
from full teacher logits. The loss's specification is :func:`fastkd.reference.kd_topk_rows`; its Triton kernels are
``kd_topk_forward_kernel``/``kd_topk_backward_kernel`` in :mod:`fastkd.kernels.kd`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

KINDS = ("logits", "logprobs")
TAILS = ("bucket", "spread", "renormalize")


@dataclasses.dataclass(frozen=True)
class TopK:
    """A teacher's top-K entries per row: ``values`` (*, K) float and ``indices`` (*, K) int64 (distinct, in
    [0, V)). ``kind="logprobs"`` (log-probabilities, which carry the mass outside the K: see ``tail`` in
    :func:`fastkd.kd_loss`; on CPU a row whose probabilities sum to more than 1, beyond the rounding of their dtype,
    is refused) or ``"logits"`` (only their differences mean anything). Rows whose label is ``ignore_index`` need
    no valid entries (:func:`counted_rows_only`)."""

    values: torch.Tensor
    indices: torch.Tensor
    kind: str = "logprobs"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TopK kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.values, torch.Tensor) or not self.values.is_floating_point():
            raise TypeError("TopK values must be a floating-point torch.Tensor")
        if not isinstance(self.indices, torch.Tensor) or self.indices.dtype not in (torch.int64, torch.int32):
            raise TypeError("TopK indices must be an int64 or int32 torch.Tensor")
        if self.values.shape != self.indices.shape or self.values.dim() == 0 or self.values.shape[-1] == 0:
            raise ValueError(
                f"TopK values and indices must have the same shape (*, K) with K >= 1, got "
                f"{tuple(self.values.shape)} and {tuple(self.indices.shape)}"
            )
        if self.values.device != self.indices.device:
            raise ValueError("TopK values and indices must be on the same device")


def topk_teacher(teacher_logits: torch.Tensor, k: int, *, kind: str = "logprobs") -> TopK:
    """The top-``k`` entries of full teacher logits (*, V) as a :class:`TopK`: their log-probabilities
    (log_softmax, ``kind="logprobs"``) or their logits."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must be an int in [1, V={teacher_logits.shape[-1]}], got {k!r}")
    with torch.no_grad():
        source = torch.log_softmax(teacher_logits.float(), dim=-1) if kind == "logprobs" else teacher_logits
        values, indices = source.topk(k, dim=-1)
    return TopK(values, indices, kind)


def counted_rows_only(topk: TopK, labels, ignore_index: int) -> TopK:
    """``topk`` with the rows whose label is ``ignore_index`` replaced by a valid placeholder (indices 0..K−1,
    log(1/K) each), so that padded rows may hold anything (index −1, garbage) and reach no kernel as such. One
    (*, K) select, no host sync; ``topk`` itself when there are no labels or they do not fit its rows."""
    if labels is None or not isinstance(labels, torch.Tensor) or labels.shape != topk.values.shape[:-1]:
        return topk
    k = topk.values.shape[-1]
    counted = (labels != ignore_index).unsqueeze(-1)
    placeholder = torch.arange(k, device=topk.indices.device, dtype=topk.indices.dtype)
    values = torch.where(counted, topk.values, torch.full((), -math.log(k), dtype=topk.values.dtype))
    return TopK(values, torch.where(counted, topk.indices, placeholder), topk.kind)
