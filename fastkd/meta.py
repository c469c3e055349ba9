r"""MetaDistil's pilot update (Zhou, Xu, McAuley, "BERT Learns to Teach: Knowledge Distillation with Meta Learning",
ACL 2022) with ``torch.func``: the teacher learns from how well a student updated by its KD gradient does on a quiz.

One meta step, with student parameters θ, teacher φ, a training batch x and a quiz batch (x_q, y_q)::

    θ'(φ) = θ − lr·∇_θ kd_loss(f_θ(x), g_φ(x))          (pilot_update: a look-ahead copy, create_graph=True)
    L_quiz(φ) = CE(f_θ'(φ)(x_q), y_q)                    (quiz_loss)
    φ ← φ − lr_teacher·∇_φ L_quiz                          (the user's teacher optimizer, after L_quiz.backward())

after which the real student takes its usual KD step from the updated teacher (the paper's "pilot update" keeps
the inner and outer learners aligned). ∇_φ L_quiz differentiates the KD gradient with respect to the teacher's
logits: :func:`fastkd.kd_loss` supports that double backward on every backend (:mod:`fastkd.second_order`).
The paper's hyper-parameters (lr of the pilot = the student's, quiz batches from a held-out split) are the caller's.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .kd import kd_loss


def _call(model: nn.Module, params: Mapping[str, torch.Tensor], inputs: Any):
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(params), (), dict(inputs))
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, dict(params), tuple(inputs))
    return functional_call(model, dict(params), (inputs,))


def pilot_update(student: nn.Module, inputs: Any, teacher_logits: torch.Tensor, *, lr: float, **kd_options) -> dict:
    """θ' = θ − lr·∇_θ kd_loss(student(inputs), teacher_logits, **kd_options) for the student's trainable parameters
    (the others as they are) and copies of its buffers, a dict name → tensor for :func:`quiz_loss`;
    differentiable with respect to ``teacher_logits`` (and θ). The student module itself is not changed (not
    its BatchNorm statistics either)."""
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    params = dict(student.named_parameters())
    # copies of the buffers: the pilot's forward must not move BatchNorm's running statistics of the real student
    buffers = {name: b.clone() for name, b in student.named_buffers()}
    trainable = {name: p for name, p in params.items() if p.requires_grad}
    if not trainable:
        raise ValueError("the student has no parameter that requires grad")
    loss = kd_loss(_call(student, {**params, **buffers}, inputs), teacher_logits, **kd_options)
    grads = torch.autograd.grad(loss, tuple(trainable.values()), create_graph=True, allow_unused=True)
    updated = {name: p if g is None else p - lr * g for (name, p), g in zip(trainable.items(), grads)}
    return {**params, **buffers, **updated}


def quiz_loss(student: nn.Module, pilot_params: Mapping[str, torch.Tensor], inputs: Any, labels: torch.Tensor):
    """The cross-entropy of the pilot student (``student`` run with ``pilot_params``) on a quiz batch: its backward
    reaches the teacher through the pilot update."""
    return F.cross_entropy(_call(student, pilot_params, inputs), labels)
