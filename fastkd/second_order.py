"""Double backward for the kernel paths of :func:`fastkd.kd_loss` and :func:`fastkd.dkd_loss`.

The kernels' gradient is a number, not a graph. When a backward runs with ``create_graph=True`` (MetaDistil's pilot
update differentiates the KD gradient with respect to the teacher's logits), the autograd Functions in
:mod:`fastkd.kd` call :func:`row_gradients` instead of the backward kernel: the reference row losses
(:func:`fastkd.reference.kd_loss_rows`, :func:`fastkd.reference.dkd_loss_rows`, ensembles through
:func:`fastkd.reference.ensemble_teacher_logits`) are built from the saved inputs and differentiated with
``create_graph=True``, so the gradient returned is itself differentiable with respect to the student's and the
teacher's logits, to any order. A plain backward (no graph wanted) never comes here: its speed is unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .kernel_args import KDOptions


def reference_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    options: KDOptions,
    teacher_weights: Optional[torch.Tensor] = None,
    ensemble: str = "none",
) -> torch.Tensor:
    """The row losses the kernels compute for ``options``, by the reference (differentiable)."""
    if ensemble != "none":  # (K, N, V) teachers read in place by the fused kernels
        teachers = reference.counted_rows_only(teacher, labels, options.ignore_index)
        teacher = reference.ensemble_teacher_logits(
            teachers, teacher_weights, ensemble=ensemble, temperature=options.temperature
        )
    if options.divergence == "dkd":  # kd_scale is T², which dkd_loss_rows applies itself
        return reference.dkd_loss_rows(
            student,
            teacher,
            labels,
            temperature=options.temperature,
            alpha=options.alpha,
            beta=options.beta,
            ignore_index=options.ignore_index,
            ce_weight=options.ce_weight,
        )
    return reference.kd_loss_rows(
        student,
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


def row_gradients(grad_output: torch.Tensor, rows: torch.Tensor, inputs: tuple, wanted: tuple) -> tuple:
    """∂(Σ grad_output·rows)/∂inputs with ``create_graph=True``, None for the inputs not ``wanted`` (or unused)."""
    chosen = [x for x, want in zip(inputs, wanted) if want and x.requires_grad]
    grads = iter(torch.autograd.grad(rows, chosen, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(grads) if want and x.requires_grad else None for x, want in zip(inputs, wanted))
