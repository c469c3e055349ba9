r"""FitNets-style adapters (regressors) that map a student feature to the shape of a teacher feature.

:func:`adapter_for` builds one from the two shapes, as seen on an example batch:

- ``(N, C)`` vectors: ``Linear(C_s, C_t)``.
- ``(N, L, C)`` tokens (channels last): ``Linear(C_s, C_t)`` on the channels, then linear interpolation along the
  tokens when L_s ≠ L_t.
- ``(N, C, H, W)`` maps (channels first): a 1×1 ``Conv2d(C_s, C_t)`` + ``BatchNorm2d(C_t)`` (FitNets, OFD), then
  adaptive average pooling to (H_t, W_t) when the student map is larger in both dims, bilinear interpolation
  otherwise.

A projection is made only when the channel counts differ and a resize only when the lengths or sizes do; when the
shapes already agree the adapter is ``nn.Identity``. Adapters are ordinary modules, trained with the student.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FeatureAdapter(nn.Module):
    """``resize(project(x))``: a channel projection (or none) then a resize to ``size`` (or none)."""

    def __init__(self, project: nn.Module, size: Sequence[int] = ()):
        super().__init__()
        self.project = project
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        if not self.size:
            return x
        if x.dim() == 3:  # (N, L, C): interpolate along L
            return F.interpolate(x.transpose(1, 2), size=self.size, mode="linear", align_corners=False).transpose(1, 2)
        if all(s >= t for s, t in zip(x.shape[2:], self.size)):
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}" if self.size else ""


def adapter_for(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """The adapter taking features of ``student_shape`` to ``teacher_shape`` (see the module docstring)."""
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
        raise ValueError(
            f"an adapter maps (N, C), (N, L, C) or (N, C, H, W) features to the same layout; got "
            f"student {student_shape} and teacher {teacher_shape}"
        )
    if student_shape[0] != teacher_shape[0]:
        raise ValueError(
            f"student and teacher features must have the same batch size, got student "
            f"{student_shape} and teacher {teacher_shape}"
        )
    if len(student_shape) == 4:
        (c_s, *size_s), (c_t, *size_t) = student_shape[1:], teacher_shape[1:]
        project = (
            nn.Sequential(nn.Conv2d(c_s, c_t, kernel_size=1, bias=False), nn.BatchNorm2d(c_t))
            if c_s != c_t
            else nn.Identity()
        )
    else:
        (*size_s, c_s), (*size_t, c_t) = student_shape[1:], teacher_shape[1:]
        project = nn.Linear(c_s, c_t) if c_s != c_t else nn.Identity()
    return FeatureAdapter(project, size_t if size_s != size_t else ())
