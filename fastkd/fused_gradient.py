"""Autograd for a 0-d loss whose forward kernel writes the loss's gradient too (the C++ backend's one-call paths:
``kd_loss``'s reduced kl/reverse_kl, ``feature_loss`` of plain features): each input is read once per step, and
the backward only hands the gradient on, times the incoming gradient.

An ``autograd.Function`` calls :func:`keep` in its forward and :func:`take` in its backward:

- eager: the gradients are kept on ``ctx``; the first backward returns them, scaled in place when the incoming
  gradient is not 1 (a CPU scalar: reading it costs no sync), and a second backward through a retained graph calls
  the kernel again (the first one's gradient may now be a ``.grad``);
- under ``torch.compile``: the gradients are saved tensors and scaled out of place, so the graph stays functional.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def keep(ctx, grads: Sequence[torch.Tensor], recompute_inputs: Sequence) -> None:
    """Keep the forward's ``grads`` for the backward; ``recompute_inputs`` (tensors or None) are what
    :func:`take`'s ``recompute`` needs for a second backward."""
    if torch.compiler.is_compiling():
        ctx.fused_grads = None
        ctx.save_for_backward(*grads)
    else:
        ctx.fused_grads = tuple(grads)
        ctx.save_for_backward(*recompute_inputs)


def take(ctx, grad_loss: torch.Tensor, recompute: Callable[..., Sequence[torch.Tensor]]) -> tuple:
    """The kept gradients times ``grad_loss``; ``recompute(*recompute_inputs)`` returns them afresh for a second
    backward."""
    if torch.compiler.is_compiling():
        return tuple(g * grad_loss for g in ctx.saved_tensors)
    grads, ctx.fused_grads = ctx.fused_grads, None
    if grads is None:
        grads = recompute(*ctx.saved_tensors)
    if float(grad_loss) != 1.0:
        for g in grads:
            g.mul_(grad_loss)
    return tuple(grads)
