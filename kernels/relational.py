"""Triton kernels of RKD's angle loss (fastkd.relational): the B³ triplet cosines from the two (B, B) distance
matrices, tile by tile, never stored.

c(i, j, k) = (d_ij² + d_ik² − d_jk²)/(2·d_ij·d_ik) for the anchor i (0 where d_ij or d_ik is 0), on the student's
distances and on the teacher's; ℓ = smooth L1 (δ = 1) of their difference. The forward writes, per (anchor i, class
j), Σ_k ℓ: the caller sums the (B, B) partials (a fixed order: the same bits every run). The backward, with
g = clamp(c_s − c_t, −1, 1)·scale (scale = the incoming gradient ÷ B³, read on the device), writes ∂/∂d_s in two
kernels that own what they write (no atomics): one program per tile (j, k) sums −g·d_jk/(d_ij·d_ik) over the
anchors; then one program per (anchor i, block of j) adds 2·Σ_k g·(1/d_ik − c/d_ij) to row i.
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
