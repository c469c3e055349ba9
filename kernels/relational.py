"""Triton kernels of RKD's angle loss (fastkd.relational): the B³ triplet cosines from the two (B, B) distance
matrices, tile by tile, never stored.

c(i, j, k) = (d_ij² + d_ik² − d_jk²)/(2·d_ij·d_ik) for the anchor i (0 where d_ij or d_ik is 0), on the student's
distances and on the teacher's; ℓ = smooth L1 (δ = 1) of their difference. The forward writes, per (anchor i, class
j), Σ_k ℓ: the caller sums the (B, B) partials (a fixed order: the same bits every run). The backward, with
g = clamp(c_s − c_t, −1, 1)·scale (scale = the incoming gradient ÷ B³, read on the device), writes ∂/∂d_s in two
kernels that own what they write (no atomics): one program per tile (j, k) sums −g·d_jk/(d_ij·d_ik) over the
anchors; then one program per (anchor i, block of j) adds 2·Σ_k g·(1/d_ik − c/d_ij) to row i.

For CRD's memory bank, two kernels read the contrast rows by index where they lie, never gathering the (B, C, d)
rows: the scores u[b, c] = ⟨bank[contrast_index[b, c]], anchors[b]⟩, and their gradient w.r.t. the anchors,
Σ_c grad[b, c]·bank[contrast_index[b, c]] (each program owns what it writes: no atomics, the same bits every run);
and both from one read of each row when the gradient is CRD's NCE gradient of the score itself (crd_score_grad).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cosines(d_ij, d_ik, d_jk):
    """(c, valid): the law of cosines at the anchor, 0 where a side from the anchor is 0."""
    valid = (d_ij > 0) & (d_ik > 0)
    numerator = d_ij * d_ij + d_ik * d_ik - d_jk * d_jk
    denominator = tl.where(valid, 2.0 * d_ij * d_ik, 1.0)
    return tl.where(valid, numerator / denominator, 0.0), valid


@triton.jit
def _tile(D, rows, cols, num, inside):
    return tl.load(D + rows[:, None].to(tl.int64) * num + cols[None, :], mask=inside, other=0.0)


@triton.jit
def rkd_angle_forward_kernel(D_S, D_T, PARTIAL, num, BLOCK: tl.constexpr):
    """PARTIAL[i, j] = Σ_k smooth_l1(c_s(i, j, k) − c_t(i, j, k)); one program per (anchor i, block of j)."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j_in = j < num
    d_ij_s = tl.load(D_S + i * num + j, mask=j_in, other=0.0)
    d_ij_t = tl.load(D_T + i * num + j, mask=j_in, other=0.0)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num, BLOCK):
        k = start + tl.arange(0, BLOCK)
        k_in = k < num
        inside = j_in[:, None] & k_in[None, :]
        d_ik_s = tl.load(D_S + i * num + k, mask=k_in, other=0.0)
        d_ik_t = tl.load(D_T + i * num + k, mask=k_in, other=0.0)
        c_s, _ = _cosines(d_ij_s[:, None], d_ik_s[None, :], _tile(D_S, j, k, num, inside))
        c_t, _ = _cosines(d_ij_t[:, None], d_ik_t[None, :], _tile(D_T, j, k, num, inside))
        diff = c_s - c_t
        size = tl.abs(diff)
        loss = tl.where(size < 1.0, 0.5 * diff * diff, size - 0.5)
        total += tl.sum(tl.where(inside, loss, 0.0), axis=1)
    tl.store(PARTIAL + i * num + j, total, mask=j_in)


@triton.jit
def rkd_angle_pair_grad_kernel(D_S, D_T, SCALE, GRAD, num, BLOCK: tl.constexpr):
    """GRAD[j, k] = −d_jk·Σ_i g(i, j, k)/(d_ij·d_ik); one program per (block of j, block of k)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j_in, k_in = j < num, k < num
    inside = j_in[:, None] & k_in[None, :]
    d_jk_s = _tile(D_S, j, k, num, inside)
    d_jk_t = _tile(D_T, j, k, num, inside)
    scale = tl.load(SCALE)
    total = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for i in range(0, num):
        d_ij_s = tl.load(D_S + i * num + j, mask=j_in, other=0.0)
        d_ik_s = tl.load(D_S + i * num + k, mask=k_in, other=0.0)
        d_ij_t = tl.load(D_T + i * num + j, mask=j_in, other=0.0)
        d_ik_t = tl.load(D_T + i * num + k, mask=k_in, other=0.0)
        c_s, valid = _cosines(d_ij_s[:, None], d_ik_s[None, :], d_jk_s)
        c_t, _ = _cosines(d_ij_t[:, None], d_ik_t[None, :], d_jk_t)
        g = tl.where(valid & inside, tl.minimum(tl.maximum(c_s - c_t, -1.0), 1.0), 0.0)
        total += g / tl.where(valid, d_ij_s[:, None] * d_ik_s[None, :], 1.0)
    grad = -scale * d_jk_s * total
    tl.store(GRAD + j[:, None].to(tl.int64) * num + k[None, :], grad, mask=inside)


@triton.jit
def rkd_angle_row_grad_kernel(D_S, D_T, SCALE, GRAD, num, BLOCK: tl.constexpr):
    """GRAD[i, j] += 2·Σ_k g(i, j, k)·(1/d_ik − c_s(i, j, k)/d_ij); one program per (anchor i, block of j), after
    rkd_angle_pair_grad_kernel."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j_in = j < num
    d_ij_s = tl.load(D_S + i * num + j, mask=j_in, other=0.0)
    d_ij_t = tl.load(D_T + i * num + j, mask=j_in, other=0.0)
    scale = tl.load(SCALE)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num, BLOCK):
        k = start + tl.arange(0, BLOCK)
        k_in = k < num
        inside = j_in[:, None] & k_in[None, :]
        d_ik_s = tl.load(D_S + i * num + k, mask=k_in, other=0.0)
        d_ik_t = tl.load(D_T + i * num + k, mask=k_in, other=0.0)
        c_s, valid = _cosines(d_ij_s[:, None], d_ik_s[None, :], _tile(D_S, j, k, num, inside))
        c_t, _ = _cosines(d_ij_t[:, None], d_ik_t[None, :], _tile(D_T, j, k, num, inside))
        g = tl.where(valid & inside, tl.minimum(tl.maximum(c_s - c_t, -1.0), 1.0), 0.0)
        safe_ik = tl.where(d_ik_s > 0, d_ik_s, 1.0)
        safe_ij = tl.where(d_ij_s > 0, d_ij_s, 1.0)
        total += tl.sum(g / safe_ik[None, :] - g * c_s / safe_ij[:, None], axis=1)
    row = GRAD + i * num + j
    tl.store(row, tl.load(row, mask=j_in, other=0.0) + 2.0 * scale * total, mask=j_in)


def _launch_config(num: int) -> dict:
    block = max(16, min(64, triton.next_power_of_2(max(num, 1))))
    return dict(BLOCK=block, num_warps=4)


def rkd_angle_forward(d_s: torch.Tensor, d_t: torch.Tensor) -> torch.Tensor:
    """The angle loss's sum of ℓ over the B³ triplets, float32 0-d (divide by B³ for the mean)."""
    num = d_s.shape[0]
    partial = torch.empty((num, num), dtype=torch.float32, device=d_s.device)
    if num == 0:
        return partial.sum()
    config = _launch_config(num)
    grid = (num, triton.cdiv(num, config["BLOCK"]))
    rkd_angle_forward_kernel[grid](d_s.contiguous(), d_t.contiguous(), partial, num, **config)
    return partial.sum()


def rkd_angle_backward(d_s: torch.Tensor, d_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """∂(scale·Σ ℓ)/∂d_s, (B, B) float32; ``scale`` a 0-d float32 tensor on the device."""
    num = d_s.shape[0]
    grad = torch.empty((num, num), dtype=torch.float32, device=d_s.device)
    if num == 0:
        return grad
    d_s, d_t = d_s.contiguous(), d_t.contiguous()
    config = _launch_config(num)
    blocks = triton.cdiv(num, config["BLOCK"])
    rkd_angle_pair_grad_kernel[(blocks, blocks)](d_s, d_t, scale, grad, num, **config)
    rkd_angle_row_grad_kernel[(num, blocks)](d_s, d_t, scale, grad, num, **config)
    return grad


@triton.jit
def crd_gather_dot_kernel(
    BANK, INDEX, ANCHORS, SCORES, num_c, dim, bank_stride, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr
):
    """SCORES[b, c] = Σ_k BANK[INDEX[b, c], k]·ANCHORS[b, k]; one program per (b, block of c)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < num_c
    rows = BANK + tl.load(INDEX + b * num_c + c, mask=c_in, other=0).to(tl.int64) * bank_stride
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        k = start + tl.arange(0, BLOCK_D)
        k_in = k < dim
        anchor = tl.load(ANCHORS + b * dim + k, mask=k_in, other=0.0).to(tl.float32)
        tile = tl.load(rows[:, None] + k[None, :], mask=c_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)
        total += tl.sum(tile * anchor[None, :], axis=1)
    tl.store(SCORES + b * num_c + c, total, mask=c_in)


@triton.jit
def crd_scatter_dot_kernel(
    BANK, INDEX, GRAD, OUT, num_b, num_c, dim, bank_stride, chunk, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr
):
    """OUT[s, b, k] = Σ_c GRAD[b, c]·BANK[INDEX[b, c], k] over the chunk s of c; one program per (b, block of k,
    chunk s): with few samples the chunks keep the GPU busy, and the caller sums the (S, B, d) partials."""
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    part = tl.program_id(2).to(tl.int64)
    k_in = k < dim
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(part * chunk, tl.minimum(part * chunk + chunk, num_c), BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_in = c < tl.minimum(part * chunk + chunk, num_c)
        rows = BANK + tl.load(INDEX + b * num_c + c, mask=c_in, other=0).to(tl.int64) * bank_stride
        grad = tl.load(GRAD + b * num_c + c, mask=c_in, other=0.0)
        tile = tl.load(rows[:, None] + k[None, :], mask=c_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)
        total += tl.sum(grad[:, None] * tile, axis=0)
    tl.store(OUT + (part * num_b + b) * dim + k, total, mask=k_in)


SCATTER_CHUNK = 1024  # contrast rows per program of the scatter-dot (a multiple of BLOCK_C)


def _crd_launch_config(num_c: int, dim: int) -> dict:
    """A (BLOCK_C, BLOCK_D) tile of at most 64 × 128 = 8192 bank elements."""
    block_c = max(16, min(64, triton.next_power_of_2(max(num_c, 1))))
    block_d = max(16, min(128, triton.next_power_of_2(max(dim, 1))))
    return dict(BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4)


def _unit_column_stride(bank: torch.Tensor) -> torch.Tensor:
    return bank if bank.stride(1) == 1 else bank.contiguous()


def crd_gather_dot(bank: torch.Tensor, contrast_index: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """scores[b, c] = ⟨bank[contrast_index[b, c]], anchors[b]⟩, (B, C) float32, without gathering the (B, C, d)
    rows; bank (N, d) with any row stride, anchors (B, d), each float32, float16 or bfloat16."""
    num_b, num_c = contrast_index.shape
    dim = bank.shape[1]
    scores = torch.empty((num_b, num_c), dtype=torch.float32, device=bank.device)
    if scores.numel() == 0:
        return scores
    bank = _unit_column_stride(bank)
    config = _crd_launch_config(num_c, dim)
    grid = (num_b, triton.cdiv(num_c, config["BLOCK_C"]))
    crd_gather_dot_kernel[grid](
        bank, contrast_index.contiguous(), anchors.contiguous(), scores, num_c, dim, bank.stride(0), **config
    )
    return scores


def crd_scatter_dot(bank: torch.Tensor, contrast_index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Σ_c grad[b, c]·bank[contrast_index[b, c]], (B, d) float32 (the scores' gradient w.r.t. the anchors); grad
    (B, C) float32."""
    num_b, num_c = contrast_index.shape
    dim = bank.shape[1]
    if num_b == 0 or num_c == 0 or dim == 0:
        return torch.zeros((num_b, dim), dtype=torch.float32, device=bank.device)
    bank = _unit_column_stride(bank)
    config = _crd_launch_config(num_c, dim)
    chunk = triton.cdiv(SCATTER_CHUNK, config["BLOCK_C"]) * config["BLOCK_C"]
    parts = torch.empty((triton.cdiv(num_c, chunk), num_b, dim), dtype=torch.float32, device=bank.device)
    grid = (num_b, triton.cdiv(dim, config["BLOCK_D"]), parts.shape[0])
    crd_scatter_dot_kernel[grid](
        bank, contrast_index.contiguous(), grad.contiguous(), parts, num_b, num_c, dim, bank.stride(0), chunk, **config
    )
    return parts.sum(0)  # in a fixed order: the same bits every run


@triton.jit
def crd_score_grad_kernel(
    BANK,
    INDEX,
    ANCHORS,
    Z,
    SCORES,
    OUT,
    num_b,
    num_c,
    dim,
    bank_stride,
    chunk,
    inv_temperature,
    noise,
    grad_scale,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """SCORES[b, c] = ⟨BANK[INDEX[b, c]], ANCHORS[b]⟩ and OUT[s, b] = Σ_c g(SCORES[b, c])·BANK[INDEX[b, c]] over the
    chunk s of c, each (BLOCK_C, d) tile of rows read once (BLOCK_D ≥ d); g is CRD's NCE gradient of the score:
    x = exp(u/τ)/Z, −noise·scale/(x + noise) at c = 0, x·scale/(x + noise) elsewhere."""
    b = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1).to(tl.int64)
    k = tl.arange(0, BLOCK_D)
    k_in = k < dim
    anchor = tl.load(ANCHORS + b * dim + k, mask=k_in, other=0.0).to(tl.float32)
    inv_z = 1.0 / tl.load(Z).to(tl.float32)
    end = tl.minimum(part * chunk + chunk, num_c)
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(part * chunk, end, BLOCK_C):
        c = start + tl.arange(0, BLOCK_C)
        c_in = c < end
        rows = BANK + tl.load(INDEX + b * num_c + c, mask=c_in, other=0).to(tl.int64) * bank_stride
        tile = tl.load(rows[:, None] + k[None, :], mask=c_in[:, None] & k_in[None, :], other=0.0).to(tl.float32)
        u = tl.sum(tile * anchor[None, :], axis=1)
        tl.store(SCORES + b * num_c + c, u, mask=c_in)
        x = tl.exp(u * inv_temperature) * inv_z
        g = tl.where(c == 0, -noise, x) * grad_scale / (x + noise)
        total += tl.sum(tl.where(c_in, g, 0.0)[:, None] * tile, axis=0)
    tl.store(OUT + (part * num_b + b) * dim + k, total, mask=k_in)


def crd_score_grad(bank, contrast_index, anchors, normalizer, *, temperature: float, noise: float, grad_scale: float):
    """(scores (B, C), Σ_c g(u_bc)·bank[contrast_index[b, c]] (B, d)), float32, each bank row read once: g is CRD's
    NCE gradient of the score (crd_score_grad_kernel), ``normalizer`` Z a 0-d tensor on the device (no host read).
    The whole width d goes in one tile: for very wide rows use crd_gather_dot and crd_scatter_dot."""
    num_b, num_c = contrast_index.shape
    dim = bank.shape[1]
    scores = torch.empty((num_b, num_c), dtype=torch.float32, device=bank.device)
    if num_b == 0 or num_c == 0:
        return scores, torch.zeros((num_b, dim), dtype=torch.float32, device=bank.device)
    bank = _unit_column_stride(bank)
    block_d = max(16, triton.next_power_of_2(dim))
    block_c = max(16, min(64, 8192 // block_d))
    chunk = triton.cdiv(SCATTER_CHUNK, block_c) * block_c
    parts = torch.empty((triton.cdiv(num_c, chunk), num_b, dim), dtype=torch.float32, device=bank.device)
    crd_score_grad_kernel[(num_b, parts.shape[0])](
        bank,
        contrast_index.contiguous(),
        anchors.contiguous(),
        normalizer.reshape(()),
        scores,
        parts,
        num_b,
        num_c,
        dim,
        bank.stride(0),
        chunk,
        1.0 / temperature,
        noise,
        grad_scale,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return scores, parts.sum(0)
