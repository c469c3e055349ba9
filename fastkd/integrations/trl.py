r"""TRL's GKD divergence on fastkd's kernels: :func:`generalized_jsd_loss` has the signature and the conventions of
``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (TRL 1.x), so one line puts ``GKDTrainer`` on them::

    from trl.experimental.gkd import GKDTrainer
    from fastkd.integrations.trl import generalized_jsd_loss

    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

TRL's conventions, kept here (this module imports nothing from TRL):

- β is the teacher's weight in the mixture m = β·p_t + (1 − β)·p_s, and the loss is β·KL(p_t‖m) + (1 − β)·KL(p_s‖m)
  (fastkd's ``divergence="jsd"``); TRL special-cases the ends, β = 0 as KL(p_t‖p_s) and β = 1 as KL(p_s‖p_t)
  (fastkd's ``"kl"`` and ``"reverse_kl"``), which makes the loss jump there: so does this function.
- p = softmax(logits / T) with no T² factor.
- Rows whose label is −100 are skipped. The reduction: with ``num_items_in_batch``, Σ ÷ num_items_in_batch;
  ``"batchmean"`` Σ ÷ the counted rows (at least 1) with labels, Σ ÷ the first dim (the batch, not the tokens)
  without; ``"sum"`` Σ; ``"mean"`` Σ ÷ (counted rows · V), TRL's element mean. TRL's per-element ``"none"`` has
  no counterpart in a fused row kernel and is refused.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..kd import kd_loss

REDUCTIONS = ("batchmean", "sum", "mean")


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Union[int, torch.Tensor, None] = None,
) -> torch.Tensor:
    """TRL's generalized JSD of ``(B, L, V)`` (or any ``(*, V)``) logits through :func:`fastkd.kd_loss` (the module
    docstring gives the conventions). Returns a 0-d float32 tensor (float64 for float64 logits)."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {REDUCTIONS} (TRL's per-element 'none' has no fused counterpart), got "
            f"{reduction!r}"
        )
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta <= 1):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    divergence = "kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    options = dict(temperature=temperature, divergence=divergence, beta=float(beta), labels=labels, scale_by_t2=False)
    if num_items_in_batch is not None:
        return kd_loss(student_logits, teacher_logits, reduction="sum", **options) / num_items_in_batch
    if reduction == "sum":
        return kd_loss(student_logits, teacher_logits, reduction="sum", **options)
    if reduction == "batchmean" and labels is not None:
        return kd_loss(student_logits, teacher_logits, reduction="batchmean", **options)
    if reduction == "batchmean":
        return kd_loss(student_logits, teacher_logits, reduction="sum", **options) / max(student_logits.shape[0], 1)
    rows = student_logits[..., 0].numel() if labels is None else (labels != -100).sum()
    return kd_loss(student_logits, teacher_logits, reduction="sum", **options) / (rows * student_logits.shape[-1])
