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
B³ terms; the Triton kernels of :mod:`fastkd.kernels.relational` and the C++ ones of csrc/relational_cpu.h do
the same without the blocks, tile by tile or a class j per thread): with
c = (d_ij² + d_ik² − d_jk²)/(2 d_ij d_ik) and g = ∂ℓ/∂c,
∂c/∂d_ij = 1/d_ik − c/d_ij (likewise for d_ik) and ∂c/∂d_jk = −d_jk/(d_ij d_ik). Memory: O(B² + b·B²).

The kernels are the custom ops ``fastkd::rkd_angle_sum``, ``rkd_angle_grad``, ``crd_gather_dot``,
``crd_scatter_dot`` and ``crd_score_grad``: ``torch.compile(fullgraph=True)`` traces :func:`rkd_loss` and
:class:`CRDLoss` (no host read: Z is set on the device).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import reference
from .dispatch import check_backend_name, kernel_op, launchers, select_backend

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


@kernel_op("rkd_angle_sum")
def _rkd_angle_sum_op(d_s: torch.Tensor, d_t: torch.Tensor, backend: str) -> torch.Tensor:
    """The kernels' forward: Σ ℓ over the B³ triplets of the (B, B) distances, float32 0-d."""
    return launchers(backend, "relational").rkd_angle_forward(d_s, d_t)


@_rkd_angle_sum_op.register_fake
def _(d_s, d_t, backend):
    return d_s.new_empty((), dtype=torch.float32)


@kernel_op("rkd_angle_grad")
def _rkd_angle_grad_op(d_s: torch.Tensor, d_t: torch.Tensor, scale: torch.Tensor, backend: str) -> torch.Tensor:
    """The kernels' backward: ∂(scale·Σ ℓ)/∂d_s, (B, B) float32; ``scale`` float32 0-d."""
    return launchers(backend, "relational").rkd_angle_backward(d_s, d_t, scale)


@_rkd_angle_grad_op.register_fake
def _(d_s, d_t, scale, backend):
    return d_s.new_empty(d_s.shape, dtype=torch.float32)


class _RKDAngle(torch.autograd.Function):
    """The angle loss from the two (B, B) distance matrices: block by block of anchors in PyTorch operations, or the
    kernels (Triton: fastkd.kernels.relational, tile by tile; C++: csrc/relational_cpu.h, a class per thread;
    nothing of B³ stored); gradient to the student's distances only."""

    @staticmethod
    def forward(ctx, d_s, d_t, backend):
        batch = d_s.shape[0]
        ctx.save_for_backward(d_s, d_t)
        ctx.backend = backend
        if backend in ("triton", "cpu"):
            return _rkd_angle_sum_op(d_s, d_t, backend) / max(batch, 1) ** 3
        total = d_s.new_zeros(())
        for anchors in _anchor_blocks(batch):
            c_s, _ = _cosines(d_s, anchors)
            c_t, _ = _cosines(d_t, anchors)
            diff = c_s - c_t
            absolute = diff.abs()
            total = total + torch.where(absolute < 1, 0.5 * diff * diff, absolute - 0.5).sum()
        return total / max(batch, 1) ** 3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        d_s, d_t = ctx.saved_tensors
        batch = d_s.shape[0]
        scale = grad_loss / max(batch, 1) ** 3
        if ctx.backend in ("triton", "cpu"):  # the scale stays on the device: no host sync on CUDA
            return _rkd_angle_grad_op(d_s, d_t, scale.float().reshape(()), ctx.backend).to(d_s.dtype), None, None
        grad_d = torch.zeros_like(d_s)
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
        return grad_d, None, None


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


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """RKD's angle-wise loss L_A of (B, D_s) and (B, D_t) embeddings (module docstring), without the (B, B, D) and
    (B, B, B) tensors. The teacher gets no gradient. ``backend``: ``"triton"`` (chosen by ``"auto"`` for CUDA
    tensors; on CPU ones under the interpreter) runs the kernels of :mod:`fastkd.kernels.relational`, ``"cpu"``
    (chosen by ``"auto"`` for CPU tensors when the extension is built) the C++ kernels of csrc/relational_cpu.h;
    float64 (or no kernel) runs the blocks of anchors in PyTorch operations; ``"reference"`` the authors'
    (B, B, D) formulation (also when ``FASTKD_BACKEND=reference`` stands for ``"auto"``)."""
    _check_embeddings(student, teacher)
    if backend == "reference" or (backend == "auto" and os.environ.get("FASTKD_BACKEND") == "reference"):
        return reference.rkd_angle_loss(student, teacher)
    d_s, d_t = _distances(student), _distances(teacher.detach())
    chosen = select_backend(backend, d_s, d_t, op="rkd_angle_loss", kernels=("triton", "cpu"))
    return _RKDAngle.apply(d_s, d_t, chosen)


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
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    backend: str = "auto",
) -> torch.Tensor:
    """RKD (Park et al., CVPR 2019): distance_weight·L_D + angle_weight·L_A of (B, D_s) student and (B, D_t) teacher
    embeddings (module docstring; the teacher gets no gradient). A weight of 0 skips its part; ``backend`` as in
    :func:`rkd_angle_loss`."""
    _check_embeddings(student, teacher)
    for name, weight in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {weight!r}")
    loss = student.new_zeros((), dtype=reference._math_dtype(student, teacher))
    if distance_weight:
        loss = loss + distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle_loss(student, teacher, backend=backend)
    return loss


@kernel_op("crd_gather_dot")
def _crd_gather_dot_op(
    bank: torch.Tensor, contrast_index: torch.Tensor, anchors: torch.Tensor, backend: str
) -> torch.Tensor:
    """scores[b, c] = ⟨bank[contrast_index[b, c]], anchors[b]⟩, (B, C) float32, the bank rows read in place."""
    return launchers(backend, "relational").crd_gather_dot(bank, contrast_index, anchors)


@_crd_gather_dot_op.register_fake
def _(bank, contrast_index, anchors, backend):
    return bank.new_empty(contrast_index.shape, dtype=torch.float32)


@kernel_op("crd_scatter_dot")
def _crd_scatter_dot_op(
    bank: torch.Tensor, contrast_index: torch.Tensor, grad: torch.Tensor, backend: str
) -> torch.Tensor:
    """Σ_c grad[b, c]·bank[contrast_index[b, c]], (B, d) float32; ``grad`` (B, C) float32."""
    return launchers(backend, "relational").crd_scatter_dot(bank, contrast_index, grad)


@_crd_scatter_dot_op.register_fake
def _(bank, contrast_index, grad, backend):
    return bank.new_empty((contrast_index.shape[0], bank.shape[1]), dtype=torch.float32)


@kernel_op("crd_score_grad")
def _crd_score_grad_op(
    bank: torch.Tensor,
    contrast_index: torch.Tensor,
    anchors: torch.Tensor,
    normalizer: torch.Tensor,
    temperature: float,
    noise: float,
    grad_scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B, C), their NCE gradient summed over the bank rows (B, d)), float32, each row read once."""
    return launchers(backend, "relational").crd_score_grad(
        bank, contrast_index, anchors, normalizer, temperature=temperature, noise=noise, grad_scale=grad_scale
    )


@_crd_score_grad_op.register_fake
def _(bank, contrast_index, anchors, normalizer, temperature, noise, grad_scale, backend):
    return (
        bank.new_empty(contrast_index.shape, dtype=torch.float32),
        bank.new_empty((contrast_index.shape[0], bank.shape[1]), dtype=torch.float32),
    )


FUSED_MAX_DIM = 1024  # widest rows whose scores and gradient come from one read (Triton keeps a row in one tile)


class _CRDSide(torch.autograd.Function):
    """One side of CRD: the NCE loss of anchors v (B, d) against a bank, (loss, Z). Scores
    u[b, k] = ⟨bank[contrast_index[b, k]], v_b⟩ (B, K+1); Z = ``normalizer``, or mean(exp(u/τ))·N where it is
    still unset (< 0: the first batch); the loss is :func:`fastkd.reference.crd_nce_loss`. Then the bank's rows
    ``index`` move in place to normalize(momentum·row + (1 − momentum)·update_rows), as CRD's memory does.

    The gradient w.r.t. v is taken in the forward, from the bank rows as they were scored, before the update:
    with x = exp(u/τ)/Z and c = K/N + ε, ∂L/∂u_b0 = −c/(τB(x_b0 + c)) and ∂L/∂u_bk = x_bk/(τB(x_bk + c)) (k ≥ 1; Z
    is a constant, as in the authors' code), then Σ_k ∂L/∂u_bk·bank[contrast_index[b, k]]. Once Z is set (every
    batch after the first), the kernels take the score and the gradient term of a row from one read of it
    (``fastkd::crd_score_grad``; rows up to FUSED_MAX_DIM wide). The backward only scales
    those B·d numbers: it never reads the bank, so another forward in between (gradient accumulation) or
    torch.compile reusing the bank's memory cannot change it.

    The (B, K+1, d) rows are never gathered: with N ≤ DENSE_FACTOR·(K+1) all N scores come from one matrix product
    (B·N floats; faster than reading K+1 random rows per sample there, on this CPU too: bench/RESULTS.md), else the
    gather-dot and scatter-dot kernels read each bank row by index in place (``backend`` "triton" or "cpu"), or, on
    the reference backend, blocks of CONTRAST_BLOCK gathered rows."""

    @staticmethod
    def forward(ctx, bank, contrast_index, anchors, index, update_rows, normalizer, options):
        momentum, temperature, num_samples, backend, normalizer_set, grad_enabled = options
        noise = (contrast_index.shape[1] - 1) / num_samples + reference.CRD_EPS
        scale = 1 / (temperature * contrast_index.shape[0])
        math_dtype = reference._math_dtype(bank)  # fp16 overflows exp(u/τ) from u ≈ 0.78: the loss in float32
        ctx.anchor_dtype = anchors.dtype
        wants_grad = ctx.needs_input_grad[2] and grad_enabled  # the forward itself runs without grad mode
        one_read = (
            wants_grad
            and normalizer_set
            and backend != "reference"
            and not _dense(bank, contrast_index)
            and bank.shape[1] <= FUSED_MAX_DIM
        )
        if one_read:  # Z is known: each row's score and gradient term from one read
            scores, grad_anchors = _crd_score_grad_op(
                bank, contrast_index, anchors.detach(), normalizer.float(), temperature, noise, scale, backend
            )
            z = normalizer
        else:
            scores = _gather_dot(bank, contrast_index, anchors, backend).to(math_dtype)
            z = torch.where(normalizer >= 0, normalizer, torch.exp(scores / temperature).mean() * num_samples)
        loss = reference.crd_nce_loss(scores, z, temperature=temperature, num_samples=num_samples)
        ctx.mark_non_differentiable(z)
        if wants_grad and not one_read:
            x = torch.exp(scores / temperature) / z
            grad_scores = torch.cat([-noise * scale / (x[:, :1] + noise), x[:, 1:] * scale / (x[:, 1:] + noise)], 1)
            grad_anchors = _scatter_dot(bank, contrast_index, grad_scores.to(bank.dtype), backend)
        ctx.save_for_backward(grad_anchors if wants_grad else None)
        old_rows = bank[index]
        moved = old_rows * momentum + update_rows.detach().to(bank.dtype) * (1 - momentum)
        bank.index_copy_(0, index, torch.nn.functional.normalize(moved, dim=1, eps=1e-12))
        return loss, z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_z):
        (grad_anchors,) = ctx.saved_tensors
        if grad_anchors is None:
            raise RuntimeError("CRDLoss: this loss was computed without grad mode; its gradient was not taken")
        return None, None, (grad_anchors * grad_loss).to(ctx.anchor_dtype), None, None, None, None


DENSE_FACTOR = 8  # all N scores by one matrix product when N ≤ DENSE_FACTOR·(K+1)
CONTRAST_BLOCK = 1024  # contrast rows per block of the gathered scores


def _dense(bank, contrast_index) -> bool:
    return bank.shape[0] <= DENSE_FACTOR * contrast_index.shape[1]


def _gather_dot(bank, contrast_index, anchors, backend):
    """(B, K+1) scores without the (B, K+1, d) rows."""
    anchors = anchors.detach()
    if _dense(bank, contrast_index):
        return (anchors.to(bank.dtype) @ bank.T).gather(1, contrast_index)
    if backend != "reference":
        return _crd_gather_dot_op(bank, contrast_index, anchors, backend).to(bank.dtype)
    anchors = anchors.to(bank.dtype)
    return torch.cat(
        [
            torch.bmm(bank[contrast_index[:, k : k + CONTRAST_BLOCK]], anchors.unsqueeze(-1)).squeeze(-1)
            for k in range(0, contrast_index.shape[1], CONTRAST_BLOCK)
        ],
        dim=1,
    )


def _scatter_dot(bank, contrast_index, grad, backend):
    """Σ_k grad[b, k]·bank[contrast_index[b, k]], (B, d), without the (B, K+1, d) rows."""
    if _dense(bank, contrast_index):
        dense = torch.zeros(grad.shape[0], bank.shape[0], dtype=grad.dtype, device=grad.device)
        return dense.scatter_add_(1, contrast_index, grad) @ bank
    if backend != "reference":
        return _crd_scatter_dot_op(bank, contrast_index, grad.float(), backend).to(grad.dtype)
    total = torch.zeros(grad.shape[0], bank.shape[1], dtype=grad.dtype, device=grad.device)
    for k in range(0, contrast_index.shape[1], CONTRAST_BLOCK):
        rows = bank[contrast_index[:, k : k + CONTRAST_BLOCK]]
        total += torch.bmm(grad[:, k : k + CONTRAST_BLOCK].unsqueeze(1), rows).squeeze(1)
    return total


class CRDLoss(torch.nn.Module):
    r"""Contrastive representation distillation (Tian, Krishnan, Isola, ICLR 2020; the defaults and the algorithm of
    the authors' code, HobbitLong/RepDistiller ``crd/``): both sides' features are embedded (a linear head each,
    ``feat_dim`` outputs, L2-normalised), each sample is contrasted with the other side's memory bank row of itself
    (the positive) and ``num_negatives`` rows drawn uniformly from the ``num_samples`` of the dataset::

        u_bk = ⟨bank[c_bk], v_b⟩,  x = exp(u/τ)/Z,
        L = −(Σ_b log(x_b0/(x_b0 + K/N + ε)) + Σ_{b,k≥1} log((K/N)/(x_bk + K/N + ε)))/B

    for the student's embedding against the teacher's bank plus the teacher's against the student's (ε = 1e-7; Z of
    each side is set once, from the first batch, to mean(exp(u/τ))·N, and checkpointed). After scoring, each bank's
    rows of the batch move to normalize(momentum·row + (1 − momentum)·v) of their side's embedding. The teacher's
    features get no gradient; both heads train (give ``CRDLoss.parameters()`` to the optimizer). Each forward takes
    its gradient from the bank as it scored it, so several forwards may run before their backwards (gradient
    accumulation over micro-batches) and each loss keeps its own gradient.

    ``forward(student_features, teacher_features, index, contrast_index=None)``: features (B, ...) flattened to
    (B, student_dim) and (B, teacher_dim); ``index`` (B,) the samples' dataset indices (distinct within a batch);
    ``contrast_index`` (B, K+1) with ``index`` in column 0 (e.g. negatives from other classes, as the authors' CIFAR
    datasets give them), else drawn on the banks' device from a generator seeded by ``seed`` (its state is
    checkpointed with the module). The (B, K+1, d) block the authors' code gathers per side (537 MB at B = 64,
    K = 16384, d = 128) is never built (:class:`_CRDSide`; ``backend`` as in :func:`fastkd.kd_loss`, "auto":
    Triton on CUDA, C++ on CPU, PyTorch operations for float64, chooses its gather-dot kernels); their formulation
    is :func:`fastkd.reference.crd_scores` and :func:`fastkd.reference.crd_nce_loss`.
    """

    def __init__(
        self,
        num_samples: int,
        student_dim: int,
        teacher_dim: int,
        *,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
        backend: str = "auto",
    ):
        super().__init__()
        check_backend_name(backend)
        for name, value in (
            ("num_samples", num_samples),
            ("student_dim", student_dim),
            ("teacher_dim", teacher_dim),
            ("feat_dim", feat_dim),
            ("num_negatives", num_negatives),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        self.num_samples, self.num_negatives = num_samples, num_negatives
        self.temperature, self.momentum, self.seed, self.backend = float(temperature), float(momentum), seed, backend
        self.embed_student = torch.nn.Linear(student_dim, feat_dim)
        self.embed_teacher = torch.nn.Linear(teacher_dim, feat_dim)
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / (feat_dim / 3) ** 0.5
        for name in ("student_bank", "teacher_bank"):
            self.register_buffer(name, torch.rand(num_samples, feat_dim, generator=generator) * (2 * bound) - bound)
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z of the student's and the teacher's scores
        self._normalizers_set = False  # True once a forward ran since construction or loading: Z is then ≥ 0
        self._generator = None  # drawing the negatives, on the banks' device, made on first use
        self._saved_generator = None  # (device type, state) from a checkpoint, applied when the generator is made

    def _draw(self, count: int, device) -> torch.Tensor:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            saved = self._saved_generator
            if saved is not None:
                if saved[0] == device.type:
                    self._generator.set_state(saved[1])
                else:
                    warnings.warn(
                        f"CRDLoss: the checkpointed state of the negatives' generator is a {saved[0]} one; on "
                        f"{device.type} the draws start again from seed {self.seed}",
                        stacklevel=3,
                    )
                self._saved_generator = None
        return torch.randint(self.num_samples, (count, self.num_negatives), generator=self._generator, device=device)

    def forward(self, student_features, teacher_features, index, contrast_index=None):
        v_s = torch.nn.functional.normalize(self.embed_student(student_features.flatten(1)), dim=1, eps=1e-12)
        v_t = torch.nn.functional.normalize(self.embed_teacher(teacher_features.detach().flatten(1)), dim=1, eps=1e-12)
        contrast_index = self._contrast_index(index, contrast_index, v_s.shape[0], v_s.device)
        index = contrast_index[:, 0]
        backend = select_backend(self.backend, self.teacher_bank, v_s, op="CRDLoss", kernels=("triton", "cpu"))
        grad_enabled = torch.is_grad_enabled()
        options = (self.momentum, self.temperature, self.num_samples, backend, self._normalizers_set, grad_enabled)
        z = self.normalizers
        loss_s, z_s = _CRDSide.apply(self.teacher_bank, contrast_index, v_s, index, v_t, z[0], options)
        loss_t, z_t = _CRDSide.apply(self.student_bank, contrast_index, v_t, index, v_s, z[1], options)
        with torch.no_grad():  # Z of each side is set by the first batch, on the device (no host sync)
            self.normalizers.copy_(torch.stack([z_s, z_t]))
        self._normalizers_set = True  # known without reading the device: after a forward, Z is set
        return loss_s + loss_t

    def _contrast_index(self, index, contrast_index, batch: int, device) -> torch.Tensor:
        if (
            not isinstance(index, torch.Tensor)
            or index.dtype not in (torch.int64, torch.int32)
            or index.shape != (batch,)
        ):
            raise ValueError(f"index must be an int tensor of shape ({batch},) (the samples' dataset indices)")
        if batch == 0:
            raise ValueError("CRDLoss needs a batch of at least one sample (an empty one would set Z to NaN)")
        index = index.to(device=device, dtype=torch.int64)
        if contrast_index is None:
            contrast_index = torch.cat([index.unsqueeze(1), self._draw(batch, device)], dim=1)
        elif (
            not isinstance(contrast_index, torch.Tensor)
            or contrast_index.dtype not in (torch.int64, torch.int32)
            or contrast_index.dim() != 2
            or contrast_index.shape[0] != batch
        ):
            raise ValueError(f"contrast_index must be an int tensor of shape ({batch}, K + 1), index in column 0")
        contrast_index = contrast_index.to(device=device, dtype=torch.int64)
        in_range = f"index and contrast_index must lie in [0, num_samples={self.num_samples})"
        positives = "contrast_index must hold index in its column 0 (the positives)"
        if not contrast_index.numel():
            return contrast_index
        if contrast_index.device.type == "cpu" and not torch.compiler.is_compiling():
            if int(contrast_index.min()) < 0 or int(contrast_index.max()) >= self.num_samples:
                raise ValueError(in_range)
            if not torch.equal(contrast_index[:, 0], index):
                raise ValueError(positives)
        else:  # asserted on the device (no host sync, no graph break): the kernels after a failure do not run
            torch._assert_async(((contrast_index >= 0) & (contrast_index < self.num_samples)).all(), in_range)
            torch._assert_async((contrast_index[:, 0] == index).all(), positives)
        return contrast_index

    def _apply(self, fn, recurse=True):
        # Z stays float32 when the module goes to half precision: it is about exp(1/τ)·N (10⁶ and more), past fp16
        z = self.normalizers
        super()._apply(fn, recurse)
        if self.normalizers.dtype in (torch.float16, torch.bfloat16):
            self.normalizers = z.to(device=self.normalizers.device, dtype=torch.float32)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._normalizers_set = False  # a checkpoint may hold an unset Z (−1)

    def get_extra_state(self):
        if self._generator is None:
            return {"generator": None if self._saved_generator is None else self._saved_generator}
        return {"generator": (self._generator.device.type, self._generator.get_state())}

    def set_extra_state(self, state):
        # applied when the negatives are next drawn, on whatever device the banks are by then
        self._generator, self._saved_generator = None, state["generator"]
