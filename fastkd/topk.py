"""Sparse teachers: the top-K entries an inference server returns instead of a full row of logits, the top-p
entries (ragged: a different count per row), or tokens sampled from the teacher.

:class:`TopK` holds them; pass one as ``teacher_logits`` to :func:`fastkd.kd_loss`. :func:`topk_teacher` makes one
from full teacher logits (top-K, or top-p with ``top_p``), :func:`sampled_teacher` draws one. The loss's
specification is :func:`fastkd.reference.kd_topk_rows`; its Triton kernels are
``kd_topk_forward_kernel``/``kd_topk_backward_kernel`` in :mod:`fastkd.kernels.kd`, its C++ CPU kernels
csrc/kd_topk_cpu_impl.h.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

KINDS = ("logits", "logprobs", "sampled")
EMPTY = -1  # the index of an empty slot
TAILS = ("bucket", "spread", "renormalize")


@dataclasses.dataclass(frozen=True)
class TopK:
    """A teacher's entries per row: ``values`` (*, K) float and ``indices`` (*, K) int64 or int32, distinct in
    [0, V), or −1 for an empty slot (a ragged teacher keeps n ≤ K entries a row, a row may keep none; the value of
    an empty slot is never read). ``kind``:

    - ``"logprobs"``: log-probabilities, which carry the mass outside the entries (see ``tail`` in
      :func:`fastkd.kd_loss`); on CPU a row whose probabilities sum to more than 1, beyond the rounding of their
      dtype, is refused;
    - ``"logits"``: only their differences mean anything;
    - ``"sampled"``: log(c_i/k) of the counts c_i of k tokens drawn with replacement from the teacher at
      ``temperature`` (:func:`sampled_teacher`): the loss takes them as the tempered target itself, at that
      temperature only.

    ``temperature``: for ``"sampled"``, the T the tokens were drawn at; for ``"logprobs"``, the T_c they were taken
    at (log softmax(t/T_c), as a :class:`fastkd.TeacherCache` written with ``temperature`` stores them; default 1):
    the loss at T then weighs them by T_c/T, so that the target is softmax(t/T) again.

    Rows whose label is ``ignore_index`` need no valid entries (:func:`counted_rows_only`)."""

    values: torch.Tensor
    indices: torch.Tensor
    kind: str = "logprobs"
    temperature: Optional[float] = None  # the T the entries were drawn ("sampled") or taken ("logprobs") at; 1 if None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"TopK kind must be one of {KINDS}, got {self.kind!r}")
        if self.temperature is not None:
            if self.kind == "logits":
                raise ValueError("TopK temperature applies to kind 'sampled' or 'logprobs', got kind='logits'")
            if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
                raise TypeError(f"TopK temperature must be a float, got {type(self.temperature).__name__}")
            if not (math.isfinite(self.temperature) and self.temperature > 0):
                raise ValueError(f"TopK temperature must be finite and > 0, got {self.temperature}")
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

    @classmethod
    def from_counts(cls, values, indices, counts, kind: str = "logprobs", temperature=None) -> "TopK":
        """A ragged teacher from its first ``counts`` (*,) entries per row (the slots past them made empty)."""
        if not isinstance(counts, torch.Tensor) or counts.shape != values.shape[:-1] or counts.is_floating_point():
            raise ValueError(f"counts must be an integer tensor of shape {tuple(values.shape[:-1])}")
        slots = torch.arange(values.shape[-1], device=indices.device)
        kept = slots < counts.to(indices.device).unsqueeze(-1)
        return cls(values, torch.where(kept, indices, EMPTY), kind, temperature)

    def to(self, device, non_blocking: bool = False) -> "TopK":
        """This teacher's tensors on ``device``."""
        return dataclasses.replace(
            self,
            values=self.values.to(device, non_blocking=non_blocking),
            indices=self.indices.to(device, non_blocking=non_blocking),
        )

    @property
    def counts(self) -> torch.Tensor:
        """The entries each row holds (*,), int64."""
        return (self.indices >= 0).sum(-1)

    @property
    def draw_temperature(self) -> float:
        """The temperature the entries were drawn (``"sampled"``) or taken (``"logprobs"``) at: 1 if not given."""
        return 1.0 if self.temperature is None else float(self.temperature)


def _check_k(k, teacher_logits: torch.Tensor) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must be an int in [1, V={teacher_logits.shape[-1]}], got {k!r}")


def topk_teacher(
    teacher_logits: torch.Tensor, k: int, *, kind: str = "logprobs", top_p: Optional[float] = None
) -> TopK:
    """The top-``k`` entries of full teacher logits (*, V) as a :class:`TopK`: their log-probabilities
    (log_softmax, ``kind="logprobs"``) or their logits, in descending order. With ``top_p`` in (0, 1] a row keeps
    only its smallest prefix whose probability reaches ``top_p`` (at least one entry, at most ``k``); the slots
    past it are empty (index −1): a ragged teacher."""
    if kind not in ("logits", "logprobs"):
        raise ValueError(f"kind must be 'logits' or 'logprobs', got {kind!r}")
    _check_k(k, teacher_logits)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a float in (0, 1], got {top_p!r}")
    if top_p is not None and k == teacher_logits.shape[-1]:
        raise ValueError(
            "top_p with k = V leaves no class outside the K slots for the tail of the cut entries: give k < V"
        )
    with torch.no_grad():
        log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
        values, indices = (log_p if kind == "logprobs" else teacher_logits).topk(k, dim=-1)
        if top_p is not None:
            top_log_p = log_p.gather(-1, indices) if kind == "logits" else values
            mass_before = top_log_p.double().exp().cumsum(-1) - top_log_p.double().exp()
            indices = torch.where(mass_before < top_p, indices, EMPTY)
    return TopK(values, indices, kind)


def sampled_teacher(
    teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0, generator: Optional[torch.Generator] = None
) -> TopK:
    r"""A sampled teacher (Anshumann et al., "Sparse Logit Sampling", ACL 2025, arXiv 2503.16870: random-sampling
    KD with the teacher itself as the proposal): per row, ``k`` tokens x_1..x_k drawn with replacement from
    p = softmax(t/T), kept as their distinct classes i and counts c_i, as a :class:`TopK` of kind ``"sampled"``
    with values log p̂_i, p̂_i = c_i/k, in descending count order; the slots past a row's distinct draws are empty.

    p̂ is an unbiased estimate of p (E[c_i] = k·p_i), so the loss T²·KL(p̂‖softmax(s/T)) of :func:`fastkd.kd_loss`
    has the gradient T·(softmax(s/T) − p̂), whose expectation over the draws is the full-logit KD gradient
    T·(softmax(s/T) − p); its value is that of full KD up to a constant in s (the entropies differ). The
    estimator holds at the temperature it was drawn at: kd_loss refuses a sampled teacher at another one.
    ``generator`` seeds the draws (a torch.Generator on the logits' device)."""
    _check_k(k, teacher_logits)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
    with torch.no_grad():
        rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        probs = torch.softmax(rows.float() / temperature, dim=-1)
        draws = torch.multinomial(probs, k, replacement=True, generator=generator) if rows.shape[0] else rows.long()
        counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
        top_counts, indices = counts.topk(k, dim=-1)
        values = torch.log(top_counts / k)
        indices = torch.where(top_counts > 0, indices, EMPTY)
        shape = (*teacher_logits.shape[:-1], k)
    return TopK(values.reshape(shape), indices.reshape(shape), "sampled", float(temperature))


def counted_rows_only(topk: TopK, labels, ignore_index: int) -> TopK:
    """``topk`` with the rows whose label is ``ignore_index`` emptied (every index −1), so that padded rows may
    hold anything (garbage indices and values) and reach no check or kernel as such. One (*, K) select, no host
    sync; ``topk`` itself when there are no labels or they do not fit its rows."""
    if labels is None or not isinstance(labels, torch.Tensor) or labels.shape != topk.values.shape[:-1]:
        return topk
    counted = (labels != ignore_index).unsqueeze(-1)
    return dataclasses.replace(topk, indices=torch.where(counted, topk.indices, EMPTY))
