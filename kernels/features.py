"""Triton kernels of fastkd.feature_loss: one program per normalisation group, forward and backward.

Features arrive as strided (N, C, S) views (channels in dim 1, the spatial/token dims flattened into S), with a
mask broadcast to the same shape (stride 0 where it is broadcast). A program owns one group, the elements its
statistics run over, and sweeps it a few times (a group is small: it stays in L1/L2 between sweeps):

- GROUP_CHANNEL, one (n, c): the S elements of a channel map ("channel" standardisation; also plain element-wise
  losses when S ≥ C);
- GROUP_POSITION, one (n, s): the C channels at one position ("l2", "cosine"; plain losses when C > S);
- GROUP_SAMPLE, one n: all C·S elements of a sample ("sample" standardisation).

Forward writes per group Σ mask·term and Σ mask (the caller adds them up and divides for "mean"); backward
reads ``scale`` (= incoming gradient ÷ divisor, on the device) and writes the gradient of the student (and of
the teacher when asked). Elements whose mask is 0 are absent: they enter no statistic and get zero gradient.
The math is fastkd.reference.feature_loss_terms; standardisation uses biased variance and eps 1e-5, "l2" eps
1e-12, "cosine" eps 1e-8 (as there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd.kernel_args import FeatureGroup, FeatureKind, FeatureNormalize, feature_groups
from fastkd.reference import FEATURE_COSINE_EPS, FEATURE_L2_EPS, FEATURE_NORM_EPS

# the codes of fastkd.kernel_args as constants of the kernels
MSE = tl.constexpr(int(FeatureKind.MSE))
L1 = tl.constexpr(int(FeatureKind.L1))
COSINE = tl.constexpr(int(FeatureKind.COSINE))
NO_NORMALIZE = tl.constexpr(int(FeatureNormalize.NONE))
STANDARDIZE = tl.constexpr(int(FeatureNormalize.STANDARDIZE))
L2 = tl.constexpr(int(FeatureNormalize.L2))
GROUP_CHANNEL = tl.constexpr(int(FeatureGroup.CHANNEL))
GROUP_POSITION = tl.constexpr(int(FeatureGroup.POSITION))

NORM_EPS = tl.constexpr(FEATURE_NORM_EPS)
L2_EPS = tl.constexpr(FEATURE_L2_EPS)
COSINE_EPS = tl.constexpr(FEATURE_COSINE_EPS)


@triton.jit
def _element_offsets(group, start, num_c, num_s, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """(n, c, s) of the elements start … start + BLOCK of ``group``, and which of them lie in it."""
    e = start + tl.arange(0, BLOCK).to(tl.int64)
    if GROUP == GROUP_CHANNEL:
        n = group // num_c
        c = group % num_c + e * 0
        s = e
        inside = e < num_s
    elif GROUP == GROUP_POSITION:
        n = group // num_s
        c = e
        s = group % num_s + e * 0
        inside = e < num_c
    else:
        n = group
        c = e // num_s
        s = e % num_s
        inside = e < num_c * num_s
    return n, c, s, inside


@triton.jit
def _load(ptr, n, c, s, strides, inside):
    """Elements (n, c, s) of a strided (N, C, S) view as float32, 0 outside the group."""
    return tl.load(ptr + n * strides[0] + c * strides[1] + s * strides[2], mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _mask(M, n, c, s, m_strides, inside, HAS_MASK: tl.constexpr):
    """The mask's weights of elements (n, c, s) as float32 (1 without a mask), 0 outside the group."""
    if HAS_MASK:
        return tl.load(M + n * m_strides[0] + c * m_strides[1] + s * m_strides[2], mask=inside, other=0).to(tl.float32)
    return tl.where(inside, 1.0, 0.0)


@triton.jit
def _group_size(num_c, num_s, GROUP: tl.constexpr):
    """The number of elements of one group."""
    if GROUP == GROUP_CHANNEL:
        return num_s
    elif GROUP == GROUP_POSITION:
        return num_c
    return num_c * num_s


@triton.jit
def _moments(
    STUDENT,
    TEACHER,
    M,
    group,
    num_c,
    num_s,
    s_strides,
    t_strides,
    m_strides,
    HAS_MASK: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per group: count of present elements, mean and 1/sqrt(var + eps) of student and teacher (two sweeps)."""
    size = _group_size(num_c, num_s, GROUP)
    count = tl.zeros((BLOCK,), tl.float32)
    sum_s = tl.zeros((BLOCK,), tl.float32)
    sum_t = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, size, BLOCK):
        n, c, s, inside = _element_offsets(group, start, num_c, num_s, BLOCK, GROUP)
        present = _mask(M, n, c, s, m_strides, inside, HAS_MASK) != 0
        count += tl.where(present, 1.0, 0.0)
        sum_s += tl.where(present, _load(STUDENT, n, c, s, s_strides, inside), 0.0)
        sum_t += tl.where(present, _load(TEACHER, n, c, s, t_strides, inside), 0.0)
    total = tl.sum(count, 0)
    safe = tl.maximum(total, 1.0)
    mean_s, mean_t = tl.sum(sum_s, 0) / safe, tl.sum(sum_t, 0) / safe
    var_s = tl.zeros((BLOCK,), tl.float32)
    var_t = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, size, BLOCK):
        n, c, s, inside = _element_offsets(group, start, num_c, num_s, BLOCK, GROUP)
        present = _mask(M, n, c, s, m_strides, inside, HAS_MASK) != 0
        ds = _load(STUDENT, n, c, s, s_strides, inside) - mean_s
        dt = _load(TEACHER, n, c, s, t_strides, inside) - mean_t
        var_s += tl.where(present, ds * ds, 0.0)
        var_t += tl.where(present, dt * dt, 0.0)
    inv_s = 1.0 / tl.sqrt(tl.sum(var_s, 0) / safe + NORM_EPS)
    inv_t = 1.0 / tl.sqrt(tl.sum(var_t, 0) / safe + NORM_EPS)
    return total, mean_s, mean_t, inv_s, inv_t


@triton.jit
def _sums_of_squares(
    STUDENT,
    TEACHER,
    M,
    group,
    num_c,
    num_s,
    s_strides,
    t_strides,
    m_strides,
    HAS_MASK: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per group: Σ s², Σ t², Σ s·t over the present elements (one sweep)."""
    size = _group_size(num_c, num_s, GROUP)
    ss = tl.zeros((BLOCK,), tl.float32)
    tt = tl.zeros((BLOCK,), tl.float32)
    st = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, size, BLOCK):
        n, c, s, inside = _element_offsets(group, start, num_c, num_s, BLOCK, GROUP)
        present = _mask(M, n, c, s, m_strides, inside, HAS_MASK) != 0
        xs = tl.where(present, _load(STUDENT, n, c, s, s_strides, inside), 0.0)
        xt = tl.where(present, _load(TEACHER, n, c, s, t_strides, inside), 0.0)
        ss += xs * xs
        tt += xt * xt
        st += xs * xt
    return tl.sum(ss, 0), tl.sum(tt, 0), tl.sum(st, 0)


@triton.jit
def _term_and_slope(diff, beta, KIND: tl.constexpr):
    """An element-wise term of diff = s − t and its derivative."""
    if KIND == MSE:
        return diff * diff, 2.0 * diff
    elif KIND == L1:
        return tl.abs(diff), tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    small = tl.abs(diff) < beta
    term = tl.where(small, 0.5 * diff * diff / beta, tl.abs(diff) - 0.5 * beta)
    slope = tl.where(small, diff / beta, tl.where(diff > 0, 1.0, -1.0))
    return term, slope


@triton.jit
def _loss_gradient(ys, yt, m, counted, scale, beta, KIND: tl.constexpr):
    """The gradient of scale·m·term w.r.t. the normalised student value of each element that counts."""
    term, slope = _term_and_slope(ys - yt, beta, KIND)
    return tl.where(counted, scale * m * slope, 0.0)


@triton.jit
def _normalized_pair(
    STUDENT,
    TEACHER,
    M,
    MARGIN,
    n,
    c,
    s,
    inside,
    s_strides,
    t_strides,
    m_strides,
    shift_s,
    shift_t,
    scale_s,
    scale_t,
    HAS_MASK: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
):
    """Mask weight, normalised student and teacher ((x − shift)·scale), and whether each element counts."""
    m = _mask(M, n, c, s, m_strides, inside, HAS_MASK)
    ys = (_load(STUDENT, n, c, s, s_strides, inside) - shift_s) * scale_s
    yt = (_load(TEACHER, n, c, s, t_strides, inside) - shift_t) * scale_t
    counted = m != 0
    clipped = counted & False
    if HAS_MARGIN:
        margin = tl.load(MARGIN + c, mask=inside, other=0.0).to(tl.float32)
        clipped = margin >= yt
        yt = tl.maximum(yt, margin)
        counted = counted & ((ys > yt) | (yt > 0))
    return m, ys, yt, counted, clipped


@triton.jit
def _group_normalizers(
    STUDENT,
    TEACHER,
    M,
    group,
    num_c,
    num_s,
    s_strides,
    t_strides,
    m_strides,
    HAS_MASK: tl.constexpr,
    GROUP: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(count, shift_s, shift_t, scale_s, scale_t, ‖s‖, ‖t‖): y = (x − shift)·scale for each side."""
    zero = tl.sum(tl.zeros((BLOCK,), tl.float32), 0)
    count, shift_s, shift_t, scale_s, scale_t, norm_s, norm_t = zero, zero, zero, zero + 1.0, zero + 1.0, zero, zero
    if NORMALIZE == STANDARDIZE:
        count, shift_s, shift_t, scale_s, scale_t = _moments(
            STUDENT, TEACHER, M, group, num_c, num_s, s_strides, t_strides, m_strides, HAS_MASK, GROUP, BLOCK
        )
    elif NORMALIZE == L2:
        ss, tt, _ = _sums_of_squares(
            STUDENT, TEACHER, M, group, num_c, num_s, s_strides, t_strides, m_strides, HAS_MASK, GROUP, BLOCK
        )
        norm_s, norm_t = tl.sqrt(ss), tl.sqrt(tt)
        scale_s, scale_t = 1.0 / tl.maximum(norm_s, L2_EPS), 1.0 / tl.maximum(norm_t, L2_EPS)
    return count, shift_s, shift_t, scale_s, scale_t, norm_s, norm_t


@triton.jit
def feature_forward_kernel(
    STUDENT,
    TEACHER,  # (N, C, S) features through their strides
    M,  # the mask broadcast to (N, C, S) (stride 0 where broadcast; unused without HAS_MASK)
    MARGIN,  # (C,) contiguous OFD margins (unused without HAS_MARGIN)
    TERMS,
    WEIGHTS,  # outputs, one per group: Σ mask·term and Σ mask
    num_c,
    num_s,
    s_n,
    s_c,
    s_s,  # the student's strides (elements)
    t_n,
    t_c,
    t_s,  # the teacher's
    m_n,
    m_c,
    m_s,  # the mask's
    beta,  # the smooth-L1 threshold
    KIND: tl.constexpr,  # FeatureKind
    NORMALIZE: tl.constexpr,  # FeatureNormalize
    GROUP: tl.constexpr,  # FeatureGroup: the elements this program owns
    HAS_MASK: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One group's Σ mask·term and Σ mask: its normalisation statistics first (sweeps of the group), then one sweep
    of the terms (fastkd.reference.feature_loss_terms)."""
    group = tl.program_id(0).to(tl.int64)
    s_strides, t_strides, m_strides = (s_n, s_c, s_s), (t_n, t_c, t_s), (m_n, m_c, m_s)
    if KIND == COSINE:  # cosine over the C channels of one position (GROUP_POSITION); the mask is constant along them
        ss, tt, st = _sums_of_squares(
            STUDENT, TEACHER, M, group, num_c, num_s, s_strides, t_strides, m_strides, HAS_MASK, GROUP, BLOCK
        )
        n, c, s, inside = _element_offsets(group, 0, num_c, num_s, BLOCK, GROUP)
        m = tl.sum(_mask(M, n, c, s, m_strides, inside & (c == 0), HAS_MASK), 0)  # the mask at c = 0
        cosine = st / (tl.maximum(tl.sqrt(ss), COSINE_EPS) * tl.maximum(tl.sqrt(tt), COSINE_EPS))
        tl.store(TERMS + group, tl.where(m != 0, m * (1.0 - cosine), 0.0))
        tl.store(WEIGHTS + group, m)
    else:
        normalizers = _group_normalizers(
            STUDENT, TEACHER, M, group, num_c, num_s, s_strides, t_strides, m_strides, HAS_MASK, GROUP, NORMALIZE, BLOCK
        )
        shift_s, shift_t, scale_s, scale_t = normalizers[1], normalizers[2], normalizers[3], normalizers[4]
        terms = tl.zeros((BLOCK,), tl.float32)
        weights = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, _group_size(num_c, num_s, GROUP), BLOCK):
            n, c, s, inside = _element_offsets(group, start, num_c, num_s, BLOCK, GROUP)
            m, ys, yt, counted, clipped = _normalized_pair(
                STUDENT,
                TEACHER,
                M,
                MARGIN,
                n,
                c,
                s,
                inside,
                s_strides,
                t_strides,
                m_strides,
                shift_s,
                shift_t,
                scale_s,
                scale_t,
                HAS_MASK,
                HAS_MARGIN,
            )
            term, slope = _term_and_slope(ys - yt, beta, KIND)
            terms += tl.where(counted, m * term, 0.0)
            weights += m
        tl.store(TERMS + group, tl.sum(terms, 0))
        tl.store(WEIGHTS + group, tl.sum(weights, 0))


@triton.jit
def feature_backward_kernel(
    STUDENT,
    TEACHER,
    M,
    MARGIN,  # as in feature_forward_kernel
    SCALE,  # one float32: the incoming gradient ÷ the divisor, read on the device
    GRAD_S,
    GRAD_T,  # outputs, laid out as the features (strides gs_*, gt_*; GRAD_T with TEACHER_GRAD only)
    num_c,
    num_s,
    s_n,
    s_c,
    s_s,
    t_n,
    t_c,
    t_s,
    m_n,
    m_c,
    m_s,
    gs_n,
    gs_c,
    gs_s,
    gt_n,
    gt_c,
    gt_s,
    beta,
    KIND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_MARGIN: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One group's gradients of scale·Σ mask·term: the statistics again, the gradient w.r.t. the normalised values,
    then back through the normalisation; 0 at absent elements."""
    group = tl.program_id(0).to(tl.int64)
    s_strides, t_strides, m_strides = (s_n, s_c, s_s), (t_n, t_c, t_s), (m_n, m_c, m_s)
    gs_strides, gt_strides = (gs_n, gs_c, gs_s), (gt_n, gt_c, gt_s)
    scale = tl.load(SCALE).to(tl.float32)
    size = _group_size(num_c, num_s, GROUP)
    if KIND == COSINE:
        ss, tt, st = _sums_of_squares(
            STUDENT, TEACHER, M, group, num_c, num_s, s_strides, t_strides, m_strides, HAS_MASK, GROUP, BLOCK
        )
        n, c, s, inside = _element_offsets(group, 0, num_c, num_s, BLOCK, GROUP)
        m = tl.sum(_mask(M, n, c, s, m_strides, inside & (c == 0), HAS_MASK), 0)  # the mask at c = 0
        norm_s, norm_t = tl.sqrt(ss), tl.sqrt(tt)
        a, b = tl.maximum(norm_s, COSINE_EPS), tl.maximum(norm_t, COSINE_EPS)
        weight = scale * m
        # ℓ = 1 − P/(A·B): ∂ℓ/∂s = −t/(A·B) + P·s/(A³·B)·[‖s‖ > eps], and the same with s and t swapped
        coef_s = tl.where(norm_s > COSINE_EPS, st / (a * a * a * b), 0.0)
        coef_t = tl.where(norm_t > COSINE_EPS, st / (a * b * b * b), 0.0)
        for start in range(0, size, BLOCK):
            n, c, s, inside = _element_offsets(group, start, num_c, num_s, BLOCK, GROUP)
            xs = _load(STUDENT, n, c, s, s_strides, inside)
            xt = _load(TEACHER, n, c, s, t_strides, inside)
            grad_s = tl.where(weight != 0, weight * (coef_s * xs - xt / (a * b)), 0.0)  # masked out: 0, even for NaN
            tl.store(
                GRAD_S + n * gs_strides[0] + c * gs_strides[1] + s * gs_strides[2],
                grad_s.to(GRAD_S.dtype.element_ty),
                mask=inside,
            )
            if TEACHER_GRAD:
                grad_t = tl.where(weight != 0, weight * (coef_t * xt - xs / (a * b)), 0.0)
                tl.store(
                    GRAD_T + n * gt_strides[0] + c * gt_strides[1] + s * gt_strides[2],
                    grad_t.to(GRAD_T.dtype.element_ty),
                    mask=inside,
                )
    else:
        count, shift_s, shift_t, scale_s, scale_t, norm_s, norm_t = _group_normalizers(
            STUDENT, TEACHER, M, group, num_c, num_s, s_strides, t_strides, m_strides, HAS_MASK, GROUP, NORMALIZE, BLOCK
        )
        # the gradient g_y of the loss w.r.t. the normalised values, then back through the normalisation:
        #   standardised y = (x − μ)·r:  ∂/∂x = r·(g_y − mean(g_y) − y·mean(g_y·y))   (over present elements)
        #   l2 y = x·r, r = 1/max(‖x‖, eps):  ∂/∂x = r·(g_y − y·⟨y, g_y⟩) where ‖x‖ > eps, else r·g_y
        sum_gs = tl.zeros((BLOCK,), tl.float32)
        sum_gys = tl.zeros((BLOCK,), tl.float32)
        sum_gt = tl.zeros((BLOCK,), tl.float32)
        sum_gyt = tl.zeros((BLOCK,), tl.float32)
        if NORMALIZE != NO_NORMALIZE:
            for start in range(0, size, BLOCK):
                n, c, s, inside = _element_offsets(group, start, num_c, num_s, BLOCK, GROUP)
                m, ys, yt, counted, clipped = _normalized_pair(
                    STUDENT,
                    TEACHER,
                    M,
                    MARGIN,
                    n,
                    c,
                    s,
                    inside,
                    s_strides,
                    t_strides,
                    m_strides,
                    shift_s,
                    shift_t,
                    scale_s,
                    scale_t,
                    HAS_MASK,
                    HAS_MARGIN,
                )
                g = _loss_gradient(ys, yt, m, counted, scale, beta, KIND)
                present = m != 0
                sum_gs += tl.where(present, g, 0.0)
                sum_gys += tl.where(present, g * ys, 0.0)
                sum_gt -= tl.where(present, g, 0.0)
                sum_gyt -= tl.where(present, g * yt, 0.0)
        safe = tl.maximum(count, 1.0)
        mean_gs, mean_gys = tl.sum(sum_gs, 0) / safe, tl.sum(sum_gys, 0) / safe
        mean_gt, mean_gyt = tl.sum(sum_gt, 0) / safe, tl.sum(sum_gyt, 0) / safe
        dot_s, dot_t = tl.sum(sum_gys, 0), tl.sum(sum_gyt, 0)
        for start in range(0, size, BLOCK):
            n, c, s, inside = _element_offsets(group, start, num_c, num_s, BLOCK, GROUP)
            m, ys, yt, counted, clipped = _normalized_pair(
                STUDENT,
                TEACHER,
                M,
                MARGIN,
                n,
                c,
                s,
                inside,
                s_strides,
                t_strides,
                m_strides,
                shift_s,
                shift_t,
                scale_s,
                scale_t,
                HAS_MASK,
                HAS_MARGIN,
            )
            g = _loss_gradient(ys, yt, m, counted, scale, beta, KIND)
            present = m != 0
            if NORMALIZE == STANDARDIZE:
                grad_s = scale_s * (g - mean_gs - ys * mean_gys)
                grad_t = scale_t * (-g - mean_gt - yt * mean_gyt)
            elif NORMALIZE == L2:
                grad_s = scale_s * (g - tl.where(norm_s > L2_EPS, ys * dot_s, 0.0))
                grad_t = scale_t * (-g - tl.where(norm_t > L2_EPS, yt * dot_t, 0.0))
            else:
                grad_s = g
                grad_t = tl.where(clipped, 0.0, -g)  # the margin, not t, sets the target there
            tl.store(
                GRAD_S + n * gs_strides[0] + c * gs_strides[1] + s * gs_strides[2],
                tl.where(present, grad_s, 0.0).to(GRAD_S.dtype.element_ty),
                mask=inside,
            )
            if TEACHER_GRAD:
                tl.store(
                    GRAD_T + n * gt_strides[0] + c * gt_strides[1] + s * gt_strides[2],
                    tl.where(present, grad_t, 0.0).to(GRAD_T.dtype.element_ty),
                    mask=inside,
                )


def _grid_and_block(num_n: int, num_c: int, num_s: int, group: int) -> tuple[int, int]:
    """(programs, block) for the groups of the (N, C, S) view: one program per group, blocks of up to 1024."""
    size = {FeatureGroup.CHANNEL: num_s, FeatureGroup.POSITION: num_c, FeatureGroup.SAMPLE: num_c * num_s}[group]
    return feature_groups(group, num_n, num_c, num_s), min(triton.next_power_of_2(max(size, 1)), 1024)


def _common(student, teacher, mask, margin, *, kind, normalize, group, beta):
    """The arguments both feature kernels take, and their grid and block."""
    num_n, num_c, num_s = student.shape
    mask_arg = mask if mask is not None else student
    return dict(
        args=(student, teacher, mask_arg, margin.contiguous() if margin is not None else student),
        sizes=(num_c, num_s),
        strides=(*student.stride(), *teacher.stride(), *(mask.stride() if mask is not None else (0, 0, 0))),
        beta=beta,
        constexprs=dict(
            KIND=int(FeatureKind.of(kind)),
            NORMALIZE=int(FeatureNormalize.of(normalize)),
            GROUP=group,
            HAS_MASK=mask is not None,
            HAS_MARGIN=margin is not None,
        ),
        grid_block=_grid_and_block(num_n, num_c, num_s, group),
    )


def feature_forward(student, teacher, mask, margin, *, kind, normalize, group, beta):
    """Per-group Σ mask·term and Σ mask (float32) of (N, C, S) features; ``mask`` (N, C, S) or None, ``margin``
    (C,) or None; ``group`` 0/1/2 as in the module docstring."""
    c = _common(student, teacher, mask, margin, kind=kind, normalize=normalize, group=group, beta=beta)
    groups, block = c["grid_block"]
    terms = torch.empty(groups, dtype=torch.float32, device=student.device)
    weights = torch.empty(groups, dtype=torch.float32, device=student.device)
    if groups:
        feature_forward_kernel[(groups,)](
            *c["args"], terms, weights, *c["sizes"], *c["strides"], c["beta"], BLOCK=block, **c["constexprs"]
        )
    return terms, weights


def feature_backward(scale, student, teacher, mask, margin, *, kind, normalize, group, beta, teacher_grad):
    """Gradients of scale·Σ terms w.r.t. student (and teacher if teacher_grad; else an empty tensor), laid out
    like their inputs; ``scale`` is a one-element float32 tensor."""
    c = _common(student, teacher, mask, margin, kind=kind, normalize=normalize, group=group, beta=beta)
    groups, block = c["grid_block"]
    grad_s = torch.empty_like(student)
    grad_t = torch.empty_like(teacher) if teacher_grad else torch.empty(0, dtype=teacher.dtype, device=teacher.device)
    grad_t_strides = grad_t.stride() if teacher_grad else (0, 0, 0)
    if groups:
        feature_backward_kernel[(groups,)](
            *c["args"],
            scale,
            grad_s,
            grad_t if teacher_grad else grad_s,
            *c["sizes"],
            *c["strides"],
            *grad_s.stride(),
            *grad_t_strides,
            c["beta"],
            TEACHER_GRAD=teacher_grad,
            BLOCK=block,
            **c["constexprs"],
        )
    return grad_s, grad_t
