r"""RCO's teacher route (Jin et al., "Knowledge Distillation via Route Constrained Optimization", ICCV 2019): the
student learns from a sequence of anchor checkpoints taken along the teacher's own training, easiest first, and
moves on to the next anchor at scheduled steps, the converged teacher last.

``TeacherRoute(model, anchors, switch)`` is the teacher to give a :class:`fastkd.Distiller`: ``model`` is the
teacher's architecture, ``anchors`` its state dicts or the paths of saved ones (``torch.load``), in route order,
and ``switch`` the schedule: a list of the steps at which the route moves to the next anchor (one fewer than the
anchors, increasing), or a callable step → anchor index. The step is the distiller's schedule step
(:meth:`fastkd.Distiller.advance_schedules`, checkpointed with the distiller), so a resumed run continues on the
anchor its step names. Anchors are loaded lazily into ``model`` one at a time (only the active one is in memory;
a path is read when the route reaches it). :meth:`TeacherRoute.equal_intervals` gives the paper's equal-interval
schedule.
"""

from __future__ import annotations

import bisect
import os
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import nn

Anchor = Union[Mapping[str, torch.Tensor], str, os.PathLike]


class TeacherRoute(nn.Module):
    """A teacher that follows a route of anchor checkpoints (module docstring). ``forward`` runs ``model`` with the
    active anchor's weights; :meth:`at_step` (called by the Distiller before each teacher forward) picks it."""

    def __init__(self, model: nn.Module, anchors: Sequence[Anchor], switch: Union[Sequence[int], Callable[[int], int]]):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the teacher's architecture), got {type(model).__name__}")
        anchors = list(anchors)
        if not anchors:
            raise ValueError("anchors must name at least one checkpoint")
        for anchor in anchors:
            if not isinstance(anchor, (Mapping, str, os.PathLike)):
                raise TypeError(f"each anchor must be a state dict or a path, got {type(anchor).__name__}")
        if not callable(switch):
            steps = list(switch)
            if len(steps) != len(anchors) - 1:
                raise ValueError(f"switch must list {len(anchors) - 1} steps (one per move), got {len(steps)}")
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps) or steps != sorted(steps):
                raise ValueError(f"switch steps must be increasing ints >= 0, got {steps}")
        self.model, self.anchors, self.switch = model, anchors, switch
        self.active = None  # the index of the anchor loaded into model (None: none yet)

    @staticmethod
    def equal_intervals(num_anchors: int, total_steps: int) -> list:
        """The steps at which to move on so that each of ``num_anchors`` anchors teaches an equal share of
        ``total_steps`` (RCO's equal-epoch-interval strategy)."""
        if num_anchors < 1 or total_steps < 1:
            raise ValueError(f"num_anchors and total_steps must be >= 1, got {num_anchors} and {total_steps}")
        return [round(total_steps * i / num_anchors) for i in range(1, num_anchors)]

    def anchor_at(self, step: int) -> int:
        """The index of the anchor that teaches at ``step``."""
        if callable(self.switch):
            index = int(self.switch(step))
            if not 0 <= index < len(self.anchors):
                raise ValueError(f"switch({step}) = {index} is not an anchor index in [0, {len(self.anchors)})")
            return index
        return bisect.bisect_right(self.switch, step)

    def at_step(self, step: int) -> None:
        """Load the anchor of ``step`` into the model if it is not the one loaded."""
        index = self.anchor_at(step)
        if index == self.active:
            return
        anchor = self.anchors[index]
        if not isinstance(anchor, Mapping):
            device = next(iter(self.model.parameters()), torch.empty(0)).device
            anchor = torch.load(anchor, map_location=device, weights_only=True)
        self.model.load_state_dict(anchor)
        self.active = index

    def forward(self, *args, **kwargs):
        if self.active is None:
            self.at_step(0)
        return self.model(*args, **kwargs)
