r"""Relational knowledge distillation: losses on the structure of a batch rather than on each sample's output.

RKD (Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019; the constants and reductions of the
authors' code), for (B, D_s) student and (B, D_t) teacher embeddings (any widths; the teacher gets no gradient)::

    distance:  d_ij = ‖x_i − x_j‖₂,  ψ_D = d/μ with μ the mean of the positive d_ij (1 if none),
               L_D = mean over all B² pairs of ℓ(ψ_D(s) − ψ_D(t))
    angle:     e_ij = (x_j − x_i)/‖x_j − x_i‖ (0 where x_j = x_i),  ψ_A(i, j, k) = ⟨e_ij, e_ik⟩,
               L_A = mean over all B³ triplets of ℓ(ψ_A(s) − ψ_A(t))
    rkd_loss = distance_weight·L_D + angle_weight·L_A      (25 and 50, as mdistiller and torchdistill use)

with ℓ the smooth L1 (Huber) loss, δ = 1.

Graph-based relational KD (Lassance, Bontonou, Hacene, Gripon, Tang, Ortega, "Deep geometric knowledge distillation
with graphs", ICASSP 2020; the graph and loss of the authors' code, cadurosar/graph_kd): per chosen layer ℓ, the
batch's similarity graph Â = D^{-1/2} A D^{-1/2} of each network (A the cosine similarities of the flattened
features with a zero diagonal, D its degrees: :func:`fastkd.reference.graph_adjacency`), and
``graph_kd_loss = mean over layers of mean over the B² entries of (Â_s − Â_t)²``. ``knn`` keeps each row's k
largest similarities before the normalisation (the paper's optional sparsification; the authors' released code
leaves it unused, so this is our reading). B×B matrices only: the matmul is the whole cost, nothing to fuse.

The specification of RKD is :func:`fastkd.reference.rkd_distance_loss` and
:func:`fastkd.reference.rkd_angle_loss`, which build the (B, B, D) differences and the (B, B, B) cosines as the
authors' code does: 134 MB and 67 MB per side at B = 256, D = 512.

Here neither is built. The cosines come from the pairwise distances alone (the law of cosines:
⟨x_j − x_i, x_k − x_i⟩ = (d_ij² + d_ik² − d_jk²)/2), which ``torch.cdist`` computes from the differences without
the matrix-product shortcut (exactly 0 for equal embeddings). The angle loss then runs over blocks of anchors i,
(b, B, B) at a time, and its gradient with respect to the distances is written out (no autograd graph of the
B³ terms): with c = (d_ij² + d_ik² − d_jk²)/(2 d_ij d_ik) and g = ∂ℓ/∂c,
∂c/∂d_ij = 1/d_ik − c/d_ij (likewise for d_ik) and ∂c/∂d_jk = −d_jk/(d_ij d_ik). Memory: O(B² + b·B²).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import reference

ANCHOR_BLOCK_ELEMENTS = 1 << 19  # b·B² elements per block of anchors: a few such float32 blocks live at once


def _check_embeddings(student, teacher) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} embeddings must be a floating-point torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] == 0:
            raise ValueError(f"{name} embeddings must have shape (B, D) with D >= 1, got {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher embeddings must hold the same batch, got {student.shape[0]} and "
            f"{teacher.shape[0]} rows"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student and teacher embeddings must share a device, got {student.device} and {teacher.device}"
        )


def _distances(x: torch.Tensor) -> torch.Tensor:
    """(B, B) pairwise distances from the differences (exactly 0 for equal rows; gradient 0 there), in the math
    dtype (float32, float64 for float64 input)."""
    x = x.to(reference._math_dtype(x))
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def _cosines(d: torch.Tensor, anchors: slice):
    """(cosines, valid) of the triplets whose anchor lies in ``anchors``: (b, B, B), 0 where a side is 0."""
    d_i = d[anchors]  # (b, B): d_ij
    valid = (d_i > 0).unsqueeze(2) & (d_i > 0).unsqueeze(1)
    squared = d_i * d_i
    numerator = squared.unsqueeze(2) + squared.unsqueeze(1) - (d * d).unsqueeze(0)
    denominator = 2 * d_i.unsqueeze(2) * d_i.unsqueeze(1)
    return torch.where(valid, numerator / torch.where(valid, denominator, 1), 0), valid


def _anchor_blocks(batch: int):
    step = max(1, ANCHOR_BLOCK_ELEMENTS // max(batch * batch, 1))
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


class _RKDAngle(torch.autograd.Function):
    """The angle loss from the two (B, B) distance matrices, block by block of anchors; gradient to the student's
    distances only."""

    @staticmethod
    def forward(ctx, d_s, d_t):
        batch = d_s.shape[0]
        total = d_s.new_zeros(())
        for anchors in _anchor_blocks(batch):
            c_s, _ = _cosines(d_s, anchors)
            c_t, _ = _cosines(d_t, anchors)
            diff = c_s - c_t
            absolute = diff.abs()
            total = total + torch.where(absolute < 1, 0.5 * diff * diff, absolute - 0.5).sum()
        ctx.save_for_backward(d_s, d_t)
        return total / max(batch, 1) ** 3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        d_s, d_t = ctx.saved_tensors
        batch = d_s.shape[0]
        grad_d = torch.zeros_like(d_s)
        scale = grad_loss / max(batch, 1) ** 3
        safe = torch.where(d_s > 0, d_s, 1)
        for anchors in _anchor_blocks(batch):
            c_s, valid = _cosines(d_s, anchors)
            c_t, _ = _cosines(d_t, anchors)
            g = torch.where(valid, (c_s - c_t).clamp(-1, 1) * scale, 0)  # (b, j, k)
            d_i = safe[anchors]  # (b, B)
            # ∂c/∂d_ij = 1/d_ik − c/d_ij, summed over k; the same for d_ik over j (c and g are symmetric in j, k)
            grad_d[anchors] += 2 * ((g / d_i.unsqueeze(1)).sum(2) - (g * c_s).sum(2) / d_i)
            # ∂c/∂d_jk = −d_jk/(d_ij d_ik), summed over the anchors
            grad_d -= d_s * (g / (d_i.unsqueeze(2) * d_i.unsqueeze(1))).sum(0)
        return grad_d, None


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD's distance-wise loss L_D of (B, D_s) and (B, D_t) embeddings (module docstring); a 0-dim float32 tensor
    (float64 for float64 inputs). The teacher gets no gradient."""
    _check_embeddings(student, teacher)
    parts = []
    for x in (student, teacher.detach()):
        d = _distances(x)
        positive = d > 0
        mean = torch.where(positive, d, 0).sum() / positive.sum().clamp_min(1)
        parts.append(d / torch.where(positive.any(), mean, 1))
    return torch.nn.functional.smooth_l1_loss(parts[0], parts[1], reduction="mean")


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD's angle-wise loss L_A of (B, D_s) and (B, D_t) embeddings (module docstring), without the (B, B, D) and
    (B, B, B) tensors. The teacher gets no gradient."""
    _check_embeddings(student, teacher)
    return _RKDAngle.apply(_distances(student), _distances(teacher.detach()))


def graph_kd_loss(student_features, teacher_features, *, knn: Optional[int] = None) -> torch.Tensor:
    """Graph-based relational KD (module docstring) of one layer's (B, ...) features or of lists of them (one
    graph per layer, any shapes and widths per side); the teacher gets no gradient."""
    single = isinstance(student_features, torch.Tensor)
    students = [student_features] if single else list(student_features)
    teachers = [teacher_features] if isinstance(teacher_features, torch.Tensor) else list(teacher_features)
    if not students or len(students) != len(teachers):
        raise ValueError(f"give as many student as teacher layers (≥ 1), got {len(students)} and {len(teachers)}")
    if knn is not None and (isinstance(knn, bool) or not isinstance(knn, int) or knn < 1):
        raise ValueError(f"knn must be an int >= 1 or None, got {knn!r}")
    total = 0
    for s, t in zip(students, teachers):
        _check_embeddings(s.flatten(1) if s.dim() > 1 else s, t.flatten(1) if t.dim() > 1 else t)
        a_s = reference.graph_adjacency(s, knn)
        a_t = reference.graph_adjacency(t.detach(), knn)
        total = total + torch.nn.functional.mse_loss(a_s, a_t.to(a_s.dtype))
    return total / len(students)


def rkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> torch.Tensor:
    """RKD (Park et al., CVPR 2019): distance_weight·L_D + angle_weight·L_A of (B, D_s) student and (B, D_t) teacher
    embeddings (module docstring; the teacher gets no gradient). A weight of 0 skips its part."""
    _check_embeddings(student, teacher)
    for name, weight in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {weight!r}")
    loss = student.new_zeros((), dtype=reference._math_dtype(student, teacher))
    if distance_weight:
        loss = loss + distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle_loss(student, teacher)
    return loss
