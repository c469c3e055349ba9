"""fastkd.dkd_loss: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), computed from log-sum-exp
statistics with and without the target class, so it stays finite and accurate when p_gt → 1.

This module holds the validation, the dispatch call and the reduction. The kernels are those of kd_loss with
divergence code "dkd" (the target column masked out of the sums, the target logits read apart); their
specification is :func:`fastkd.reference.dkd_loss_rows`. They give no gradient to the teacher: with
``teacher_logits.requires_grad`` ``"auto"`` runs the reference.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import reference
from .dispatch import kernel_or_reference, select_backend
from .kd import _check_options, _check_tensors, _divisor, _dtensor, _finite_number, _KDLossRows, _reduce
from .kernel_args import KDOptions


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    normalizer: Union[float, torch.Tensor, None] = None,
    backend: str = "auto",
    group=None,
    vocab_start: Optional[int] = None,
) -> torch.Tensor:
    r"""Decoupled KD loss of ``(*, V)`` logits (V ≥ 2) against integer ``labels`` of shape ``*``.

    With b = [p_gt, 1 − p_gt] (the probability of the target class at temperature T, and of the rest) and p̂ the
    softmax over the non-target classes only, per row::

        row_loss = α·T²·KL(b_t‖b_s) + β·T²·KL(p̂_t‖p̂_s) + ce_weight·CE(softmax(s), label)
                 =        TCKD     +        NCKD

    (mdistiller's defaults α = 1, β = 8, T = 4; its warm-up factor min(epoch/warmup, 1) belongs to the training
    loop). KD = TCKD + (1 − p_gt^t)·NCKD. Everything is computed from the target logit z_gt and the log-sum-exp r
    of the non-target logits (at T): log p_gt = −softplus(r − z_gt), log(1 − p_gt) = −softplus(z_gt − r),
    log p̂_j = z_j − r, never the log of a sum of probabilities, which in mdistiller's code gives inf or NaN when
    p_gt → 1.

    Args:
        student_logits (Tensor): ``(*, V)``, V ≥ 2, float32, float16 or bfloat16 (float64 runs the reference).
        teacher_logits (Tensor): ``(*, V)``; the kernels give it no gradient (if it requires grad, ``"auto"`` runs
            the reference, a kernel backend named is an error).
        labels (Tensor): ``*``, int64 or int32, required: the target class of each row; ``ignore_index`` rows
            contribute 0, get zero gradient and are not counted; another label outside [0, V) is an error on CPU
            and makes its row NaN on CUDA.
        alpha (float, default 1.0): the TCKD weight α.
        beta (float, default 8.0): the NCKD weight β.
        temperature (float, default 4.0): T, in the range of :func:`fastkd.kd_loss`.
        reduction (str, default ``"batchmean"``), ignore_index (int, default -100), ce_weight (float, default 0.0),
            normalizer (float or 0-d Tensor, optional), backend (str, default ``"auto"``): as in
            :func:`fastkd.kd_loss`.
        group, vocab_start: vocabulary-parallel logits, as in :func:`fastkd.kd_loss` (one all-gather of 9 numbers
            a row in the forward, none in the backward; the teacher gets no gradient).

    Returns:
        Tensor: float32 (float64 for float64 inputs), 0-d, or ``*`` with ``reduction="none"``.

    Example::

        >>> loss = fastkd.dkd_loss(student(x), teacher(x), y, alpha=1.0, beta=8.0, temperature=4.0)
    """
    options = _check_options(
        temperature=temperature,
        divergence="kl",
        beta=0.5,
        reduction=reduction,
        ignore_index=ignore_index,
        ce_weight=ce_weight,
        kd_weight=1.0,
        scale_by_t2=True,
        normalizer=normalizer,
    )
    alpha = _finite_number("alpha", alpha)
    beta = _finite_number("beta", beta)
    if labels is None:
        raise ValueError("dkd_loss needs labels: the target class splits each distribution")
    if group is not None or vocab_start is not None or _dtensor(student_logits):
        from .distributed import vocab_parallel_kd_loss

        return vocab_parallel_kd_loss(
            student_logits,
            teacher_logits,
            group=group,
            vocab_start=vocab_start,
            labels=labels,
            options=dict(options, divergence="dkd", alpha=alpha, beta=beta),
            return_stats=False,
            teacher_weights=None,
            ensemble="prob",
            tail=None,
        )
    _check_tensors(
        student_logits,
        teacher_logits,
        labels,
        ce_weight=options["ce_weight"],
        ignore_index=options["ignore_index"],
        temperature=options["temperature"],
    )
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes (a target and a non-target), got V={num_classes}")
    student = student_logits.reshape(-1, num_classes)
    teacher = teacher_logits.reshape(-1, num_classes)
    flat_labels = labels.reshape(-1)
    chosen = select_backend(backend, student, teacher, op="dkd_loss", kernels=("triton", "cpu"))
    chosen = kernel_or_reference(
        chosen, backend, "dkd_loss", "teacher_logits", torch.is_grad_enabled() and teacher.requires_grad
    )
    temperature = options["temperature"]
    if chosen == "reference":
        row_loss = reference.dkd_loss_rows(
            student,
            teacher,
            flat_labels,
            temperature=temperature,
            alpha=alpha,
            beta=beta,
            ignore_index=options["ignore_index"],
            ce_weight=options["ce_weight"],
        )
    else:  # the kd_loss kernels with divergence "dkd": β weighs NCKD, α TCKD, kd_scale is T²
        kernel_options = KDOptions(
            temperature=temperature,
            divergence="dkd",
            beta=beta,
            ignore_index=options["ignore_index"],
            ce_weight=options["ce_weight"],
            kd_scale=temperature * temperature,
            alpha=alpha,
        )
        row_loss, _ = _KDLossRows.apply(
            student, teacher, flat_labels, None, chosen, False, None, "none", kernel_options
        )
    return _reduce(row_loss, labels.shape, options["reduction"], _divisor(options, flat_labels, student.shape[0]))
