"""Triton kernel of the grouped power iteration: every matrix of a list in one launch per iteration.

One iteration on a matrix W (m × n) with unit vectors u (m), v (n) computes, reading W once,

    a = W v,    b = Wᵀ u,    σ = ‖a‖,    u ← a / σ,    v ← b / ‖b‖

(a vector whose new norm is ≤ eps is kept as it was, so a zero weight does not zero its state for good)

(both products from the previous vectors: u and v follow two interleaved power iterations of W Wᵀ and WᵀW).

:func:`power_step_kernel` runs one program per tile of BLOCK_R rows of one matrix (a flat list of tiles over all
matrices). It sweeps the tile's columns once, accumulating a for its rows and writing its partial Σ_rows W u per
column to a scratch row of its own. Then it counts itself done on its matrix's arrival counter (an atomic
add with acquire-release semantics at GPU scope, after a barrier over the program's own stores); the tile that
arrives last finishes the matrix (:func:`_finish_matrix`): it sums the partials into b in tile order (the sums do
not depend on scheduling), normalises a and b into the new u, v, writes σ and resets the counter for the next
launch. Finishing reads vectors only.

Weights are addressed through a table of data pointers (int64), so the list is read in place, without stacking.
All matrices of a launch share a dtype; math is float32; offsets are 64-bit.
"""

from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl


class Field(enum.IntEnum):
    """The columns of the per-matrix table (int64, one row per matrix) that the launcher builds."""

    ROWS = 0
    COLS = 1
    ROW_STRIDE = 2
    U_OFFSET = 3  # where the matrix's u (and a) start in the flat vectors
    V_OFFSET = 4  # where its v starts
    PARTIALS_OFFSET = 5  # where its tiles' partials of Wᵀ u start in the scratch
    TILES = 6  # its number of row tiles


FIELD_ROWS = tl.constexpr(int(Field.ROWS))
FIELD_COLS = tl.constexpr(int(Field.COLS))
FIELD_ROW_STRIDE = tl.constexpr(int(Field.ROW_STRIDE))
FIELD_U_OFFSET = tl.constexpr(int(Field.U_OFFSET))
FIELD_V_OFFSET = tl.constexpr(int(Field.V_OFFSET))
FIELD_PARTIALS_OFFSET = tl.constexpr(int(Field.PARTIALS_OFFSET))
FIELD_TILES = tl.constexpr(int(Field.TILES))

NUM_FIELDS = len(Field)


@triton.jit
def power_step_kernel(
    POINTERS,  # (L,) int64 data pointers of the matrices
    TABLE,  # (L, NUM_FIELDS) int64, the Field columns of each matrix
    TILE_MATRIX,
    TILE_INDEX,  # (tiles,) int32: the matrix of each program's tile and the tile's index in it
    U,
    V,  # the flat unit vectors (Σ rows), (Σ cols), float32
    A,  # scratch (Σ rows): W v of each matrix
    PARTIALS,  # scratch: each tile's Σ_rows W u per column
    ARRIVALS,  # (L,) int32 arrival counters, 0 before and after a launch
    U_OUT,
    V_OUT,
    SIGMA,  # outputs: the new vectors and σ (L,)
    eps,  # a vector whose new norm is ≤ eps is kept
    ELEMENT: tl.constexpr,  # the matrices' dtype
    NUM_FIELDS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # columns per step of the sweep
    FINISH_BLOCK: tl.constexpr,  # the vectors' block in _finish_matrix
):
    """One power iteration of a tile of BLOCK_R rows of one matrix: a = W v for its rows and its partial Wᵀ u,
    from one read of the tile; the last tile of the matrix to arrive finishes it (see the module docstring)."""
    tile = tl.program_id(0)
    matrix = tl.load(TILE_MATRIX + tile).to(tl.int64)
    tile_index = tl.load(TILE_INDEX + tile).to(tl.int64)
    weights = tl.load(POINTERS + matrix).to(tl.pointer_type(ELEMENT))
    info = TABLE + matrix * NUM_FIELDS
    num_rows, num_cols = tl.load(info + FIELD_ROWS), tl.load(info + FIELD_COLS)
    stride = tl.load(info + FIELD_ROW_STRIDE)
    u_offset, v_offset = tl.load(info + FIELD_U_OFFSET), tl.load(info + FIELD_V_OFFSET)
    partial_offset = tl.load(info + FIELD_PARTIALS_OFFSET)

    rows = tile_index * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    in_rows = rows < num_rows
    u = tl.load(U + u_offset + rows, mask=in_rows, other=0.0)
    a = tl.zeros((BLOCK_R,), dtype=tl.float32)
    partials = PARTIALS + partial_offset + tile_index * num_cols
    for start in range(0, num_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        in_cols = cols < num_cols
        w = tl.load(
            weights + rows[:, None] * stride + cols[None, :], mask=in_rows[:, None] & in_cols[None, :], other=0.0
        ).to(tl.float32)
        v = tl.load(V + v_offset + cols, mask=in_cols, other=0.0)
        a += tl.sum(w * v[None, :], axis=1)
        tl.store(partials + cols, tl.sum(w * u[:, None], axis=0), mask=in_cols)
    tl.store(A + u_offset + rows, a, mask=in_rows)
    tl.debug_barrier()  # every thread's stores above come before this program's release below
    arrived = tl.atomic_add(ARRIVALS + matrix, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.load(info + FIELD_TILES) - 1:  # the matrix's last tile: the others' stores are visible
        tl.debug_barrier()
        _finish_matrix(matrix, TABLE, A, PARTIALS, U, V, U_OUT, V_OUT, SIGMA, eps, NUM_FIELDS, FINISH_BLOCK)
        tl.store(ARRIVALS + matrix, 0)


@triton.jit
def _unit_or_kept(SOURCE, KEPT, OUT, count, norm, eps, BLOCK: tl.constexpr):
    """OUT ← SOURCE / norm where norm > eps, else KEPT (``count`` entries each; SOURCE may be OUT)."""
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    scale = 1.0 / tl.maximum(norm, eps)
    for start in range(0, count, BLOCK):
        inside = start + lanes < count
        x = tl.load(SOURCE + start + lanes, mask=inside, other=0.0)
        kept = tl.load(KEPT + start + lanes, mask=inside, other=0.0)
        tl.store(OUT + start + lanes, tl.where(norm > eps, x * scale, kept), mask=inside)


@triton.jit
def _finish_matrix(
    matrix, TABLE, A, PARTIALS, U_IN, V_IN, U_OUT, V_OUT, SIGMA, eps, NUM_FIELDS: tl.constexpr, BLOCK: tl.constexpr
):
    """σ, the new u and v of one matrix from a = W v and the tiles' partials of Wᵀ u."""
    info = TABLE + matrix * NUM_FIELDS
    num_rows, num_cols = tl.load(info + FIELD_ROWS), tl.load(info + FIELD_COLS)
    u_offset, v_offset = tl.load(info + FIELD_U_OFFSET), tl.load(info + FIELD_V_OFFSET)
    partial_offset, num_tiles = tl.load(info + FIELD_PARTIALS_OFFSET), tl.load(info + FIELD_TILES)
    lanes = tl.arange(0, BLOCK).to(tl.int64)

    squares = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num_rows, BLOCK):
        a = tl.load(A + u_offset + start + lanes, mask=start + lanes < num_rows, other=0.0)
        squares += a * a
    sigma = tl.sqrt(tl.sum(squares, axis=0))
    tl.store(SIGMA + matrix, sigma)
    _unit_or_kept(A + u_offset, U_IN + u_offset, U_OUT + u_offset, num_rows, sigma, eps, BLOCK)

    squares = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, num_cols, BLOCK):
        in_cols = start + lanes < num_cols
        b = tl.zeros((BLOCK,), dtype=tl.float32)
        for t in range(0, num_tiles):
            b += tl.load(PARTIALS + partial_offset + t * num_cols + start + lanes, mask=in_cols, other=0.0)
        squares += b * b
        tl.store(V_OUT + v_offset + start + lanes, b, mask=in_cols)
    _unit_or_kept(
        V_OUT + v_offset, V_IN + v_offset, V_OUT + v_offset, num_cols, tl.sqrt(tl.sum(squares, axis=0)), eps, BLOCK
    )


_ELEMENTS = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
BLOCK_R, BLOCK_C, FINISH_BLOCK = 16, 128, 256


def power_iteration(matrices, u, v, *, n_iter: int, eps: float):
    """``n_iter`` grouped iterations over ``matrices`` (2-D views, unit column stride, one dtype) from the flat
    float32 vectors u (Σ rows) and v (Σ cols). Returns σ (L,) of the last iteration, the new u and v, and the v
    that last iteration started from (σ = ‖W v_prev‖, so ∂σ/∂W = u vₚᵣₑᵥᵀ)."""
    device = u.device
    u, v = u.contiguous(), v.contiguous()
    tiles = [triton.cdiv(w.shape[0], BLOCK_R) for w in matrices]
    table, offsets = [], [0, 0, 0]
    for w, num_tiles in zip(matrices, tiles):
        row = [0] * NUM_FIELDS
        row[Field.ROWS], row[Field.COLS], row[Field.ROW_STRIDE], row[Field.TILES] = (*w.shape, w.stride(0), num_tiles)
        row[Field.U_OFFSET], row[Field.V_OFFSET], row[Field.PARTIALS_OFFSET] = offsets
        table.append(row)
        offsets = [offsets[0] + w.shape[0], offsets[1] + w.shape[1], offsets[2] + num_tiles * w.shape[1]]
    table = torch.tensor(table, dtype=torch.int64).to(device)
    pointers = torch.tensor([w.data_ptr() for w in matrices], dtype=torch.int64).to(device)
    tile_matrix = torch.repeat_interleave(torch.arange(len(matrices)), torch.tensor(tiles)).to(torch.int32)
    tile_index = torch.cat([torch.arange(n) for n in tiles]).to(torch.int32)
    tile_matrix, tile_index = tile_matrix.to(device), tile_index.to(device)
    a = torch.empty_like(u)
    partials = torch.empty(offsets[2], dtype=torch.float32, device=device)
    sigma = torch.empty(len(matrices), dtype=torch.float32, device=device)
    arrivals = torch.zeros(len(matrices), dtype=torch.int32, device=device)  # each launch leaves them at 0
    element = _ELEMENTS[matrices[0].dtype]
    for _ in range(n_iter):
        v_prev = v
        u_new, v_new = torch.empty_like(u), torch.empty_like(v)
        power_step_kernel[(len(tile_matrix),)](
            pointers,
            table,
            tile_matrix,
            tile_index,
            u,
            v,
            a,
            partials,
            arrivals,
            u_new,
            v_new,
            sigma,
            eps,
            ELEMENT=element,
            NUM_FIELDS=NUM_FIELDS,
            BLOCK_R=BLOCK_R,
            BLOCK_C=BLOCK_C,
            FINISH_BLOCK=FINISH_BLOCK,
        )
        u, v = u_new, v_new
    return sigma, u, v, v_prev
