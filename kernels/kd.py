"""Triton kernels of the kd_loss family: one program per row, forward and backward.

Forward reads each row of student and teacher logits once (online log-sum-exp with a running max; the
divergence accumulates in the same sweep) and writes the row loss plus NUM_STATS float32 statistics per row
(the slots of :class:`fastkd.kernel_args.Stat`). The generalized JSD needs both normalisers before its mixture is
known, so its forward sweeps the row twice. Backward reads the rows once more and writes the gradient(s), already
multiplied by the incoming gradient of the row loss, which it reads on the device.

Notation (per row): a = s/T, b = t/T, log p_s = (a − max a) − log Σ exp(a − max a), likewise log p_t, and the
cross-entropy term uses s at temperature 1. Keeping each max apart from its log-sum (instead of one
log-sum-exp) keeps log p exact to rounding of the small term even for logits of ±1e4. For "cosine" the log-sums
are replaced by log ‖exp(x − max)‖₂, so that the backward's "probabilities" are the unit vectors p/‖p‖.

Several teachers (ENSEMBLE PROB, LOGIT) are read as (TEACHERS, BLOCK) tiles of a (K, N, V) tensor and mixed per
block into one teacher row (:func:`_teacher_block`); everything after that is the one-teacher code. A sparse
teacher (TopK) has kernels of its own (``kd_topk_*``) that share the helpers, and its own use of the statistics
slots (:class:`fastkd.kernel_args.TopKStat`).

Each kernel reads top to bottom as: the row's state, a sweep whose block updates are named helpers
(:func:`_kd_block`, :func:`_metrics_block`), the row's result (:func:`_kd_result`), the stores. Modes are the
``tl.constexpr`` aliases below of the codes in :mod:`fastkd.kernel_args`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastkd.kernel_args import (
    NUM_METRICS,
    NUM_STATS,
    Divergence,
    Ensemble,
    KDOptions,
    Metric,
    Stat,
    TopKOptions,
    TopKStat,
    kd_scalars,
    stats_rows,
)

# the codes and slots of fastkd.kernel_args, as constants of the kernels
KL = tl.constexpr(int(Divergence.KL))
REVERSE_KL = tl.constexpr(int(Divergence.REVERSE_KL))
JSD = tl.constexpr(int(Divergence.JSD))
COSINE = tl.constexpr(int(Divergence.COSINE))
DKD = tl.constexpr(int(Divergence.DKD))
TVD = tl.constexpr(int(Divergence.TVD))
ONE_TEACHER = tl.constexpr(int(Ensemble.NONE))
PROB = tl.constexpr(int(Ensemble.PROB))
LOGIT = tl.constexpr(int(Ensemble.LOGIT))
STAT_MAX_A = tl.constexpr(int(Stat.MAX_A))
STAT_LOG_SUM_A = tl.constexpr(int(Stat.LOG_SUM_A))
STAT_MAX_B = tl.constexpr(int(Stat.MAX_B))
STAT_LOG_SUM_B = tl.constexpr(int(Stat.LOG_SUM_B))
STAT_D0 = tl.constexpr(int(Stat.D0))
STAT_D1 = tl.constexpr(int(Stat.D1))
STAT_MAX_S = tl.constexpr(int(Stat.MAX_S))
STAT_LOG_SUM_S = tl.constexpr(int(Stat.LOG_SUM_S))
TOPK_MAX_A = tl.constexpr(int(TopKStat.MAX_A))
TOPK_LOG_SUM_A = tl.constexpr(int(TopKStat.LOG_SUM_A))
TOPK_LOG_P_TAIL = tl.constexpr(int(TopKStat.LOG_P_TAIL))
TOPK_KL = tl.constexpr(int(TopKStat.KL))
TOPK_MAX_S = tl.constexpr(int(TopKStat.MAX_S))
TOPK_LOG_SUM_S = tl.constexpr(int(TopKStat.LOG_SUM_S))
TOPK_MAX_REST = tl.constexpr(int(TopKStat.MAX_REST))
TOPK_LOG_SUM_REST = tl.constexpr(int(TopKStat.LOG_SUM_REST))
METRIC_TOP1_AGREEMENT = tl.constexpr(int(Metric.TOP1_AGREEMENT))
METRIC_PREDICTIVE_KL = tl.constexpr(int(Metric.PREDICTIVE_KL))
METRIC_TEACHER_ENTROPY = tl.constexpr(int(Metric.TEACHER_ENTROPY))
METRIC_STUDENT_ENTROPY = tl.constexpr(int(Metric.STUDENT_ENTROPY))
_NUM_STATS = tl.constexpr(NUM_STATS)


@triton.jit
def _finite_or_zero(m):
    """A running max that may still be −inf (nothing finite seen yet), as a safe shift for exp."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rebased(m, x):
    """Block x of a row against the running max m: (the new max, the finite shift it gives, exp(m − shift) to
    rescale the sums so far, exp(x − shift))."""
    new_m = tl.maximum(m, tl.max(x, axis=0))
    shift = _finite_or_zero(new_m)
    return new_m, shift, tl.exp(m - shift), tl.exp(x - shift)


@triton.jit
def _weighted(p, x):
    """p·x element-wise, 0 where p = 0 (0·log 0 = 0, never 0·inf); NaN where p is NaN."""
    return tl.where(p == 0, 0.0, p * x)


@triton.jit
def _log1p(y):
    """log(1 + y) for y > −1, exact to rounding also for tiny y (Kahan's trick: no libdevice needed)."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _expm1(x):
    """eˣ − 1, exact to rounding also for tiny x (Kahan's trick)."""
    u = tl.exp(x)
    return tl.where(
        u == 1.0, x, tl.where((u - 1.0 == -1.0) | (u == float("inf")), u - 1.0, (u - 1.0) * (x / tl.log(u)))
    )


@triton.jit
def _log_mixture_ratio(x, w, one_minus_w, log_w, log_one_minus_w):
    """log(1 − w + w·eˣ) for 0 < w < 1, accurate where it is tiny; see fastkd.reference.log_mixture_ratio."""
    y = w * _expm1(x)
    tiny = _log1p(y)
    low = tl.log(one_minus_w + w * tl.exp(tl.minimum(x, 0.0)))
    high_arg = log_w + x
    high = tl.maximum(log_one_minus_w, high_arg) + tl.log(1.0 + tl.exp(-tl.abs(log_one_minus_w - high_arg)))
    high = tl.where(x == float("inf"), x, high)
    return tl.where(y <= -0.5, low, tl.where(y <= 1.0, tiny, high))


@triton.jit
def _jsd_log_ratios(log_p_s, log_p_t, beta, one_minus_beta, log_beta, log_one_minus_beta, INTERIOR_BETA: tl.constexpr):
    """(log p_t/m, log p_s/m) for m = β p_t + (1−β) p_s. At β = 0 or 1 (INTERIOR_BETA false) m equals the
    distribution whose term keeps a non-zero weight, and both come back as 0."""
    d = log_p_t - log_p_s
    if INTERIOR_BETA:
        r_t = -_log_mixture_ratio(-d, one_minus_beta, beta, log_one_minus_beta, log_beta)
        r_s = -_log_mixture_ratio(d, beta, one_minus_beta, log_beta, log_one_minus_beta)
    else:
        r_t = tl.zeros_like(d)
        r_s = tl.zeros_like(d)
    return r_t, r_s


@triton.jit
def _softplus(x):
    """log(1 + eˣ), accurate for every x (log1p of the small term)."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _recentred(w, scale, delta, total):
    """A running Σ e·[bracket] after its exponentials are rescaled by `scale` and each bracket moves by −delta."""
    return tl.where(scale == 0, 0.0, scale * (w - delta * total))


@triton.jit
def _first_argmax(x, start, best, best_index):
    """(max, index of its first occurrence) over the row so far, given this block x starting at column start."""
    block_best = tl.max(x, axis=0)
    block_index = (tl.argmax(x, axis=0) + start).to(tl.int32)
    better = block_best > best
    return tl.where(better, block_best, best), tl.where(better, block_index, best_index)


@triton.jit
def _log_probs(x, inv_temperature, row_max, log_sum):
    """log softmax(x/T) from the row's max and log-sum at T (kept apart: exact for logits of ±1e4)."""
    return (x * inv_temperature - row_max) - log_sum


@triton.jit
def _load_block(row_ptr, cols, stride_col, in_row):
    """One block of a row as float32, −inf past its end (so it adds nothing to max or sum)."""
    return tl.load(row_ptr + cols.to(tl.int64) * stride_col, mask=in_row, other=float("-inf")).to(tl.float32)


@triton.jit
def _load_teachers(teacher_row, stride_t_teacher, teachers, teacher_ok, cols, stride_t_col, in_row):
    """One block of every teacher's row, (TEACHERS, BLOCK) float32, −inf past the row's end and on padding rows."""
    offsets = teachers[:, None].to(tl.int64) * stride_t_teacher + cols[None, :].to(tl.int64) * stride_t_col
    return tl.load(teacher_row + offsets, mask=teacher_ok[:, None] & in_row[None, :], other=float("-inf")).to(
        tl.float32
    )


@triton.jit
def _teacher_block(
    teacher_row,
    stride_t_teacher,
    cols,
    stride_t_col,
    in_row,
    teachers,
    teacher_ok,
    shift,
    coef,
    scale,
    ENSEMBLE: tl.constexpr,
):
    """One block of the teacher's logits times ``scale``, −inf past the row's end. One teacher (ONE_TEACHER): its
    logits. The logit ensemble (LOGIT, coef_k = w_k): Σ_k w_k t_k over the teachers that are ok. The prob
    ensemble (PROB, from the pre-pass: shift_k = max of scale·t_k, coef_k = log Σ exp(scale·t_k − shift_k) − log w_k,
    kept apart as for one teacher so that logits of ±1e4 lose nothing): log Σ_k w_k softmax(scale·t_k), the log of
    the mean distribution itself."""
    if ENSEMBLE == ONE_TEACHER:
        return _load_block(teacher_row, cols, stride_t_col, in_row) * scale
    x = _load_teachers(teacher_row, stride_t_teacher, teachers, teacher_ok, cols, stride_t_col, in_row)
    if ENSEMBLE == LOGIT:
        mean = tl.sum(tl.where(teacher_ok[:, None], coef[:, None] * x, 0.0), axis=0)
        return tl.where(in_row, mean * scale, float("-inf"))
    c = tl.where(teacher_ok[:, None], (x * scale - shift[:, None]) - coef[:, None], float("-inf"))
    shift = _finite_or_zero(tl.max(c, axis=0))
    return shift + tl.log(tl.sum(tl.exp(c - shift[None, :]), axis=0))


@triton.jit
def _online_row_logsumexp(m, total, x):
    """(max, Σ exp(x − max)) per row of the (R, BLOCK) blocks seen so far, after adding block x."""
    new_m = tl.maximum(m, tl.max(x, axis=1))
    shift = _finite_or_zero(new_m)
    return new_m, total * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)


@triton.jit
def _ensemble_coefficients(
    TEACHER,
    WEIGHTS,
    row,
    stride_t_row,
    stride_t_teacher,
    stride_t_col,
    n_cols,
    num_teachers,
    inv_temperature,
    STATS,
    num_rows,
    FORWARD: tl.constexpr,
    HAS_METRICS: tl.constexpr,
    ENSEMBLE: tl.constexpr,
    TEACHERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(teachers, teacher_ok, shift and coef at T, shift and coef at T = 1) of :func:`_teacher_block` for one row.
    A teacher of weight 0 is not ok, like the padding lanes: it enters no computation (its row may be all −inf).
    The prob ensemble needs each teacher's max and log-sum: the forward sweeps the K rows once for them (also at
    T = 1 for the metrics) and stores those at T in the statistics rows NUM_STATS + k and NUM_STATS + K + k; the
    backward reads them there."""
    teachers = tl.arange(0, TEACHERS)
    teacher_ok = teachers < num_teachers
    unused = tl.zeros((TEACHERS,), dtype=tl.float32)
    if ENSEMBLE == ONE_TEACHER:
        return teachers, teacher_ok, unused, unused, unused, unused
    weights = tl.load(WEIGHTS + teachers, mask=teacher_ok, other=0.0).to(tl.float32)
    teacher_ok = teacher_ok & (weights > 0)
    if ENSEMBLE == LOGIT:
        return teachers, teacher_ok, unused, weights, unused, weights
    log_weights = tl.log(weights)
    max_stats = STATS + (_NUM_STATS + teachers.to(tl.int64)) * num_rows + row
    log_sum_stats = max_stats + num_teachers * num_rows
    if not FORWARD:
        shift = tl.load(max_stats, mask=teacher_ok, other=0.0)
        return (
            teachers,
            teacher_ok,
            shift,
            tl.load(log_sum_stats, mask=teacher_ok, other=0.0) - log_weights,
            unused,
            unused,
        )
    teacher_row = TEACHER + row * stride_t_row
    m = tl.full((TEACHERS,), float("-inf"), tl.float32)
    total = tl.zeros((TEACHERS,), dtype=tl.float32)
    m_1 = tl.full((TEACHERS,), float("-inf"), tl.float32)
    total_1 = tl.zeros((TEACHERS,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = _load_teachers(teacher_row, stride_t_teacher, teachers, teacher_ok, cols, stride_t_col, cols < n_cols)
        m, total = _online_row_logsumexp(m, total, x * inv_temperature)
        if HAS_METRICS:
            m_1, total_1 = _online_row_logsumexp(m_1, total_1, x)
    shift, shift_1 = _finite_or_zero(m), _finite_or_zero(m_1)  # the sums were taken against these
    log_sum = tl.log(total)
    tl.store(max_stats, tl.where(n_cols > 0, shift, 0.0), mask=teacher_ok)
    tl.store(log_sum_stats, tl.where(n_cols > 0, log_sum, 0.0), mask=teacher_ok)
    return teachers, teacher_ok, shift, log_sum - log_weights, shift_1, tl.log(total_1) - log_weights


@triton.jit
def _target_logit(row_ptr, label, stride_col, valid):
    """The logit at the label's column as float32 (0 where the row has no valid label)."""
    return tl.load(row_ptr + label * stride_col, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _store_loss(LOSS, row, counted, bad, loss):
    """The row loss: 0 at an ignored row, NaN at a counted bad one (an invalid label or invalid TopK indices)."""
    tl.store(LOSS + row, tl.where(counted, tl.where(bad, float("nan"), loss), 0.0))


@triton.jit
def _store_slot(OUT, SLOT: tl.constexpr, row, num_rows, counted, value):
    """Slot SLOT of the row's statistics or metrics (column ``row`` of a (slots, N) tensor), 0 at an ignored row."""
    tl.store(OUT + SLOT * num_rows + row, tl.where(counted, value, 0.0))


@triton.jit
def _load_slot(STATS, SLOT: tl.constexpr, row, num_rows):
    """Slot SLOT of the statistics the forward stored for the row."""
    return tl.load(STATS + SLOT * num_rows + row)


@triton.jit
def _gradient_factors(GRAD_LOSS, row, stride_grad_loss, bad, kd_scale, inv_temperature, ce_weight):
    """(∂/∂s factor of the divergence, of the CE term) from the row loss's incoming gradient: d/ds = (1/T)·d/da.
    A bad row (a counted row with an invalid label or indices) gets NaN."""
    grad_loss = tl.where(bad, float("nan"), tl.load(GRAD_LOSS + row * stride_grad_loss).to(tl.float32))
    return grad_loss * kd_scale * inv_temperature, grad_loss * ce_weight


@triton.jit
def _ce_gradient(x_s, is_label, m_1, log_sum_1, ce_factor):
    """∂(ce_factor·CE)/∂s = ce_factor·(softmax(s) − onehot(label))."""
    return ce_factor * (tl.exp(_log_probs(x_s, 1.0, m_1, log_sum_1)) - tl.where(is_label, 1.0, 0.0))


@triton.jit
def _row_state(LABELS, row, stride_labels, V, ignore_index, HAS_LABELS: tl.constexpr):
    """(counted, label_ok, label) of a row: ignored rows are not counted; a counted row with a label
    outside [0, V) is not ok (its loss and gradient become NaN). The labels may be any 1-d view (stride 0 for an
    expanded scalar)."""
    if HAS_LABELS:
        label = tl.load(LABELS + row * stride_labels).to(tl.int64)
        counted = label != ignore_index
        label_ok = (label >= 0) & (label < V)
    else:
        label = row * 0
        counted = row >= 0
        label_ok = counted
    return counted, label_ok, label


# ------------------------------------------------------------------------------------------------------------------
# block updates of the forward sweep, one helper per state
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _kd_block(m_a, m_b, sum_a, sum_b, w, s_ab, s_aa, s_bb, a, b, DIVERGENCE: tl.constexpr):
    """Folds block (a, b) at T into the divergence's running state: the maxima m_a, m_b and the sums of
    exponentials re-centred on them, and what the divergence accumulates beside them: for kl, reverse_kl and dkd
    the weighted log ratio w = Σ e_p·[(x_p − m_p) − (x_q − m_q)] (p the distribution the KL averages over), for
    cosine ⟨e_a, e_b⟩, ‖e_a‖², ‖e_b‖² (the normalisers cancel). Returns the new state, in the order taken."""
    new_m_a, shift_a, scale_a, e_a = _rebased(m_a, a)
    new_m_b, shift_b, scale_b, e_b = _rebased(m_b, b)
    if DIVERGENCE == COSINE:
        s_ab = s_ab * (scale_a * scale_b) + tl.sum(e_a * e_b, axis=0)
        s_aa = s_aa * (scale_a * scale_a) + tl.sum(e_a * e_a, axis=0)
        s_bb = s_bb * (scale_b * scale_b) + tl.sum(e_b * e_b, axis=0)
    if DIVERGENCE == KL or DIVERGENCE == REVERSE_KL or DIVERGENCE == DKD:
        # re-centre w on the new maxima: every old bracket moves by ∓delta
        delta = (shift_b - _finite_or_zero(m_b)) - (shift_a - _finite_or_zero(m_a))
        if DIVERGENCE == REVERSE_KL:  # KL(p_s‖p_t): average over p_s
            w = _recentred(w, scale_a, -delta, sum_a) + tl.sum(_weighted(e_a, (a - shift_a) - (b - shift_b)), axis=0)
        else:  # KL(p_t‖p_s) (dkd: over the non-target classes): average over p_t
            w = _recentred(w, scale_b, delta, sum_b) + tl.sum(_weighted(e_b, (b - shift_b) - (a - shift_a)), axis=0)
    sum_a = sum_a * scale_a + tl.sum(e_a, axis=0)
    sum_b = sum_b * scale_b + tl.sum(e_b, axis=0)
    return new_m_a, new_m_b, sum_a, sum_b, w, s_ab, s_aa, s_bb


@triton.jit
def _metrics_block(
    m_t1, sum_t1, w_1, u_s, u_t, best_s, best_t, argmax_s, argmax_t, x_s, x_t, start, m_1, sum_1, shift_1, scale_1, e_1
):
    """Folds block (x_s, x_t) at T = 1 into the fidelity metrics' running state: the teacher's max and sum, the
    KL(p_t‖p_s) bracket sum w_1, Σ e·(x − m) of each (the entropies) and the first argmaxes. m_1, sum_1: the
    student's max and sum before this block; shift_1, scale_1, e_1: its rebasing for this block (_rebased)."""
    new_m_t1, shift_t1, scale_t1, e_t1 = _rebased(m_t1, x_t)
    moved_1 = shift_1 - _finite_or_zero(m_1)
    moved_t1 = shift_t1 - _finite_or_zero(m_t1)
    w_1 = _recentred(w_1, scale_t1, moved_t1 - moved_1, sum_t1) + tl.sum(
        _weighted(e_t1, (x_t - shift_t1) - (x_s - shift_1)), axis=0
    )
    u_s = _recentred(u_s, scale_1, moved_1, sum_1) + tl.sum(_weighted(e_1, x_s - shift_1), axis=0)
    u_t = _recentred(u_t, scale_t1, moved_t1, sum_t1) + tl.sum(_weighted(e_t1, x_t - shift_t1), axis=0)
    sum_t1 = sum_t1 * scale_t1 + tl.sum(e_t1, axis=0)
    best_s, argmax_s = _first_argmax(x_s, start, best_s, argmax_s)
    best_t, argmax_t = _first_argmax(x_t, start, best_t, argmax_t)
    return new_m_t1, sum_t1, w_1, u_s, u_t, best_s, best_t, argmax_s, argmax_t


@triton.jit
def _sign_of_difference(p_s, p_t):
    """sign(p_s − p_t): 0 where they are equal (the subgradient of |x| at 0 that autograd takes), NaN where either
    is NaN (a NaN row's gradients stay NaN)."""
    return tl.where(p_s > p_t, 1.0, tl.where(p_s < p_t, -1.0, tl.where(p_s == p_t, 0.0, float("nan"))))


@triton.jit
def _normalized_sweep(
    student_row,
    stride_s_col,
    teacher_row,
    stride_t_col,
    stride_t_teacher,
    teachers,
    teacher_ok,
    t_shift,
    t_coef,
    n_cols,
    V,
    inv_temperature,
    m_a,
    log_sum_a,
    m_b,
    log_sum_b,
    beta,
    one_minus_beta,
    log_beta,
    log_one_minus_beta,
    DIVERGENCE: tl.constexpr,
    INTERIOR_BETA: tl.constexpr,
    ENSEMBLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The second sweep of the divergences whose terms need both normalisers first, over log p_s and log p_t:
    (d0, d1, value). The generalized JSD (m = β p_t + (1 − β) p_s): d0 = KL(p_t‖m), d1 = KL(p_s‖m), value 0; TVD:
    d0 = Σ p_s·σ, d1 = Σ p_t·σ with σ = sign(p_s − p_t), value ½ Σ |p_s − p_t|."""
    d0 = 0.0
    d1 = 0.0
    value = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_s = _load_block(student_row, cols, stride_s_col, in_row)
        b = _teacher_block(
            teacher_row,
            stride_t_teacher,
            cols,
            stride_t_col,
            in_row,
            teachers,
            teacher_ok,
            t_shift,
            t_coef,
            inv_temperature,
            ENSEMBLE,
        )
        log_p_s = _log_probs(x_s, inv_temperature, m_a, log_sum_a)
        log_p_t = _log_probs(b, 1.0, m_b, log_sum_b)
        if DIVERGENCE == JSD:
            r_t, r_s = _jsd_log_ratios(
                log_p_s, log_p_t, beta, one_minus_beta, log_beta, log_one_minus_beta, INTERIOR_BETA
            )
            d0 += tl.sum(_weighted(tl.exp(log_p_t), r_t), axis=0)
            d1 += tl.sum(_weighted(tl.exp(log_p_s), r_s), axis=0)
        elif DIVERGENCE == TVD:
            p_s = tl.exp(log_p_s)
            p_t = tl.exp(log_p_t)
            sign = _sign_of_difference(p_s, p_t)
            d0 += tl.sum(p_s * sign, axis=0)
            d1 += tl.sum(p_t * sign, axis=0)
            value += tl.sum(tl.abs(p_s - p_t), axis=0)
        else:
            tl.static_assert(False, "_normalized_sweep: jsd or tvd")
    return d0, d1, 0.5 * value


@triton.jit
def _dkd_result(
    student_row,
    stride_s_col,
    teacher_row,
    stride_t_col,
    label,
    label_valid,
    inv_temperature,
    m_a,
    log_sum_a,
    m_b,
    log_sum_b,
    w,
    sum_b,
    alpha,
    beta,
):
    """(NCKD, p_t,gt − p_s,gt, α·TCKD + β·NCKD) of a row from the non-target sums, with b = [p_gt, 1 − p_gt] from
    the target logit and the non-target log-sum-exp (log p_gt = −softplus(−gap), never a log of a difference)."""
    nckd = w / sum_b - log_sum_b + log_sum_a
    gap_s = _target_logit(student_row, label, stride_s_col, label_valid) * inv_temperature - (m_a + log_sum_a)
    gap_t = _target_logit(teacher_row, label, stride_t_col, label_valid) * inv_temperature - (m_b + log_sum_b)
    log_p_s = -_softplus(-gap_s)
    log_q_s = -_softplus(gap_s)
    log_p_t = -_softplus(-gap_t)
    log_q_t = -_softplus(gap_t)
    tckd = _weighted(tl.exp(log_p_t), log_p_t - log_p_s) + _weighted(tl.exp(log_q_t), log_q_t - log_q_s)
    return nckd, tl.exp(log_p_t) - tl.exp(log_p_s), alpha * tckd + beta * nckd


# ------------------------------------------------------------------------------------------------------------------
# one teacher, or an ensemble read in place
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def kd_forward_kernel(
    STUDENT,
    TEACHER,  # logits (N, V); the teacher (N, V), or (K, N, V) with an ensemble
    WEIGHTS,  # (K,) float32 ensemble weights summing to 1 (unused with one teacher)
    LABELS,  # (N,) int labels through stride_labels (unused without HAS_LABELS)
    LOSS,
    STATS,
    METRICS,  # outputs: (N,) row losses, (stats_rows, N) statistics (Stat), (NUM_METRICS, N) metrics
    V,
    stride_s_row,
    stride_s_col,
    stride_t_teacher,
    stride_t_row,
    stride_t_col,
    stride_labels,
    num_rows,
    num_teachers,
    inv_temperature,
    beta,
    one_minus_beta,
    log_beta,
    log_one_minus_beta,  # 1/T; the JSD's (or DKD's NCKD) weight
    ignore_index,
    ce_weight,
    kd_scale,
    alpha,  # kd_scale: the divergence's factor; alpha: DKD's TCKD weight
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_KD: tl.constexpr,
    INTERIOR_BETA: tl.constexpr,  # 0 < beta < 1 (the JSD's log ratios are 0 at its ends)
    HAS_METRICS: tl.constexpr,
    ENSEMBLE: tl.constexpr,
    TEACHERS: tl.constexpr,  # num_teachers rounded up to a power of 2
    BLOCK: tl.constexpr,
):
    """One row's loss, statistics and (HAS_METRICS) fidelity metrics: one sweep folding the sums at T
    (:func:`_kd_block`) and at T = 1 (the CE term's log-sum-exp, :func:`_metrics_block`), a second one for JSD."""
    row = tl.program_id(0).to(tl.int64)
    counted, label_ok, label = _row_state(LABELS, row, stride_labels, V, ignore_index, HAS_LABELS)
    student_row = STUDENT + row * stride_s_row
    teacher_row = TEACHER + row * stride_t_row
    n_cols = tl.where(counted, V, 0)  # ignored rows skip the sweep entirely
    teachers, teacher_ok, t_shift, t_coef, t_shift_1, t_coef_1 = _ensemble_coefficients(
        TEACHER,
        WEIGHTS,
        row,
        stride_t_row,
        stride_t_teacher,
        stride_t_col,
        n_cols,
        num_teachers,
        inv_temperature,
        STATS,
        num_rows,
        True,
        HAS_METRICS,
        ENSEMBLE,
        TEACHERS,
        BLOCK,
    )
    # at T: maxima, sums of exponentials and the divergence's accumulators (see _kd_block)
    m_a = float("-inf")
    m_b = float("-inf")
    sum_a = 0.0
    sum_b = 0.0
    w = 0.0
    s_ab = 0.0
    s_aa = 0.0
    s_bb = 0.0
    # at T = 1: the student's max and sum (CE), and the metrics' state (see _metrics_block)
    m_1 = float("-inf")
    sum_1 = 0.0
    m_t1 = float("-inf")
    sum_t1 = 0.0
    w_1 = 0.0
    u_s = 0.0
    u_t = 0.0
    best_s = float("-inf")
    best_t = float("-inf")
    argmax_s = tl.zeros((), dtype=tl.int32)
    argmax_t = tl.zeros((), dtype=tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_s = _load_block(student_row, cols, stride_s_col, in_row)
        if ENSEMBLE == PROB:  # the mean distribution's logits at T and at T = 1 are not proportional
            if HAS_METRICS:
                x_t = _teacher_block(
                    teacher_row,
                    stride_t_teacher,
                    cols,
                    stride_t_col,
                    in_row,
                    teachers,
                    teacher_ok,
                    t_shift_1,
                    t_coef_1,
                    1.0,
                    ENSEMBLE,
                )
            if HAS_KD:
                b = _teacher_block(
                    teacher_row,
                    stride_t_teacher,
                    cols,
                    stride_t_col,
                    in_row,
                    teachers,
                    teacher_ok,
                    t_shift,
                    t_coef,
                    inv_temperature,
                    ENSEMBLE,
                )
        elif HAS_KD or HAS_METRICS:
            x_t = _teacher_block(
                teacher_row,
                stride_t_teacher,
                cols,
                stride_t_col,
                in_row,
                teachers,
                teacher_ok,
                t_shift,
                t_coef,
                1.0,
                ENSEMBLE,
            )
            b = x_t * inv_temperature
        if HAS_KD:
            a = x_s * inv_temperature
            if DIVERGENCE == DKD:  # the sums and w cover the non-target classes only
                a = tl.where(cols == label, float("-inf"), a)
                b = tl.where(cols == label, float("-inf"), b)
            m_a, m_b, sum_a, sum_b, w, s_ab, s_aa, s_bb = _kd_block(
                m_a, m_b, sum_a, sum_b, w, s_ab, s_aa, s_bb, a, b, DIVERGENCE
            )
        if HAS_CE or HAS_METRICS:
            new_m_1, shift_1, scale_1, e_1 = _rebased(m_1, x_s)
            if HAS_METRICS:
                m_t1, sum_t1, w_1, u_s, u_t, best_s, best_t, argmax_s, argmax_t = _metrics_block(
                    m_t1,
                    sum_t1,
                    w_1,
                    u_s,
                    u_t,
                    best_s,
                    best_t,
                    argmax_s,
                    argmax_t,
                    x_s,
                    x_t,
                    start,
                    m_1,
                    sum_1,
                    shift_1,
                    scale_1,
                    e_1,
                )
            sum_1 = sum_1 * scale_1 + tl.sum(e_1, axis=0)
            m_1 = new_m_1

    log_sum_a = tl.log(sum_a)
    log_sum_b = tl.log(sum_b)
    log_sum_1 = tl.log(sum_1)
    d0 = 0.0
    d1 = 0.0
    kd_loss = 0.0
    if HAS_KD:
        if DIVERGENCE == KL:
            d0 = w / sum_b - log_sum_b + log_sum_a
            kd_loss = d0
        elif DIVERGENCE == REVERSE_KL:
            d0 = w / sum_a - log_sum_a + log_sum_b
            kd_loss = d0
        elif DIVERGENCE == JSD or DIVERGENCE == TVD:
            d0, d1, tvd = _normalized_sweep(
                student_row,
                stride_s_col,
                teacher_row,
                stride_t_col,
                stride_t_teacher,
                teachers,
                teacher_ok,
                t_shift,
                t_coef,
                n_cols,
                V,
                inv_temperature,
                m_a,
                log_sum_a,
                m_b,
                log_sum_b,
                beta,
                one_minus_beta,
                log_beta,
                log_one_minus_beta,
                DIVERGENCE,
                INTERIOR_BETA,
                ENSEMBLE,
                BLOCK,
            )
            if DIVERGENCE == JSD:
                kd_loss = beta * d0 + one_minus_beta * d1
            else:
                kd_loss = tvd
        elif DIVERGENCE == COSINE:
            log_sum_a = 0.5 * tl.log(s_aa)  # stored in place of the log-sums: the backward needs ‖p‖, not Σp
            log_sum_b = 0.5 * tl.log(s_bb)
            d0 = s_ab / tl.sqrt(s_aa * s_bb)
            kd_loss = 1.0 - d0
        elif DIVERGENCE == DKD:
            d0, d1, kd_loss = _dkd_result(
                student_row,
                stride_s_col,
                teacher_row,
                stride_t_col,
                label,
                counted & label_ok,
                inv_temperature,
                m_a,
                log_sum_a,
                m_b,
                log_sum_b,
                w,
                sum_b,
                alpha,
                beta,
            )
        else:
            tl.static_assert(False, "unknown divergence code")
    loss = kd_scale * kd_loss
    if HAS_CE:
        loss += ce_weight * ((m_1 - _target_logit(student_row, label, stride_s_col, counted & label_ok)) + log_sum_1)
    _store_loss(LOSS, row, counted, ~label_ok, loss)
    _store_slot(STATS, STAT_MAX_A, row, num_rows, counted, m_a)
    _store_slot(STATS, STAT_LOG_SUM_A, row, num_rows, counted, log_sum_a)
    _store_slot(STATS, STAT_MAX_B, row, num_rows, counted, m_b)
    _store_slot(STATS, STAT_LOG_SUM_B, row, num_rows, counted, log_sum_b)
    _store_slot(STATS, STAT_D0, row, num_rows, counted, d0)
    _store_slot(STATS, STAT_D1, row, num_rows, counted, d1)
    _store_slot(STATS, STAT_MAX_S, row, num_rows, counted, m_1)
    _store_slot(STATS, STAT_LOG_SUM_S, row, num_rows, counted, log_sum_1)
    if HAS_METRICS:  # at T = 1
        log_sum_t1 = tl.log(sum_t1)
        _store_slot(METRICS, METRIC_TOP1_AGREEMENT, row, num_rows, counted, tl.where(argmax_s == argmax_t, 1.0, 0.0))
        _store_slot(METRICS, METRIC_PREDICTIVE_KL, row, num_rows, counted, w_1 / sum_t1 - log_sum_t1 + log_sum_1)
        _store_slot(METRICS, METRIC_TEACHER_ENTROPY, row, num_rows, counted, log_sum_t1 - u_t / sum_t1)
        _store_slot(METRICS, METRIC_STUDENT_ENTROPY, row, num_rows, counted, log_sum_1 - u_s / sum_1)


@triton.jit
def _kd_gradients(
    log_p_s,
    log_p_t,
    is_target,
    d0,
    d1,
    kd_factor,
    beta,
    one_minus_beta,
    log_beta,
    log_one_minus_beta,
    alpha,
    DIVERGENCE: tl.constexpr,
    INTERIOR_BETA: tl.constexpr,
):
    """(∂/∂s, ∂/∂t) of kd_factor·D for one block, from the row's log-probabilities at T and its statistics d0, d1
    (Stat slots). For dkd the probabilities are p̂ (−inf at the target) and there is no teacher gradient; for
    cosine they are the unit vectors p/‖p‖."""
    p_s = tl.exp(log_p_s)
    p_t = tl.exp(log_p_t)
    if DIVERGENCE == KL:  # ∂KL(p_t‖p_s)/∂a = p_s − p_t, ∂/∂b = p_t (log p_t/p_s − KL)
        grad_s = kd_factor * (p_s - p_t)
        grad_t = kd_factor * _weighted(p_t, (log_p_t - log_p_s) - d0)
    elif DIVERGENCE == REVERSE_KL:  # ∂KL(p_s‖p_t)/∂a = p_s (log p_s/p_t − KL), ∂/∂b = p_t − p_s
        grad_s = kd_factor * _weighted(p_s, (log_p_s - log_p_t) - d0)
        grad_t = kd_factor * (p_t - p_s)
    elif DIVERGENCE == JSD:  # ∂JSD/∂a = (1−β) p_s (log p_s/m − KL(p_s‖m)), ∂/∂b = β p_t (log p_t/m − KL(p_t‖m))
        r_t, r_s = _jsd_log_ratios(log_p_s, log_p_t, beta, one_minus_beta, log_beta, log_one_minus_beta, INTERIOR_BETA)
        grad_s = (kd_factor * one_minus_beta) * _weighted(p_s, r_s - d1)
        grad_t = (kd_factor * beta) * _weighted(p_t, r_t - d0)
    elif DIVERGENCE == COSINE:  # ∂(1 − cos)/∂a = −p_s (p_t − cos·p_s), likewise ∂/∂b
        grad_s = -kd_factor * (p_s * (p_t - d0 * p_s))
        grad_t = -kd_factor * (p_t * (p_s - d0 * p_t))
    elif DIVERGENCE == DKD:  # d1 = p_t,gt − p_s,gt
        grad_s = kd_factor * tl.where(is_target, -alpha * d1, beta * (p_s - p_t) + alpha * d1 * p_s)
        grad_t = tl.zeros_like(grad_s)
    elif DIVERGENCE == TVD:  # ∂TVD/∂a = ½ p_s (σ − Σ p_s σ), ∂/∂b = ½ p_t (Σ p_t σ − σ), σ = sign(p_s − p_t)
        sign = _sign_of_difference(p_s, p_t)
        grad_s = (0.5 * kd_factor) * (p_s * (sign - d0))
        grad_t = (0.5 * kd_factor) * (p_t * (d1 - sign))
    else:
        tl.static_assert(False, "unknown divergence code")
    return grad_s, grad_t


@triton.jit
def kd_backward_kernel(
    STUDENT,
    TEACHER,
    WEIGHTS,
    LABELS,  # as in kd_forward_kernel
    STATS,  # the forward's statistics
    GRAD_LOSS,  # (N,) incoming gradient of the row losses, through stride_grad_loss (0: an expanded scalar)
    GRAD_S,
    GRAD_T,  # outputs: contiguous (N, V) gradients in the inputs' dtypes (GRAD_T with TEACHER_GRAD only)
    V,
    stride_s_row,
    stride_s_col,
    stride_t_teacher,
    stride_t_row,
    stride_t_col,
    stride_labels,
    stride_grad_loss,
    num_rows,
    num_teachers,
    inv_temperature,
    beta,
    one_minus_beta,
    log_beta,
    log_one_minus_beta,
    ignore_index,
    ce_weight,
    kd_scale,
    alpha,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_KD: tl.constexpr,
    INTERIOR_BETA: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    ENSEMBLE: tl.constexpr,
    TEACHERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row's gradients of grad_loss·row_loss: one sweep recomputing the log-probabilities from the stored
    statistics (:func:`_kd_gradients`, plus the CE term's softmax − onehot); 0 at an ignored row."""
    row = tl.program_id(0).to(tl.int64)
    counted, label_ok, label = _row_state(LABELS, row, stride_labels, V, ignore_index, HAS_LABELS)
    teachers, teacher_ok, t_shift, t_coef, _, _ = _ensemble_coefficients(
        TEACHER,
        WEIGHTS,
        row,
        stride_t_row,
        stride_t_teacher,
        stride_t_col,
        V,
        num_teachers,
        inv_temperature,
        STATS,
        num_rows,
        False,
        False,
        ENSEMBLE,
        TEACHERS,
        BLOCK,
    )
    kd_factor, ce_factor = _gradient_factors(
        GRAD_LOSS, row, stride_grad_loss, counted & ~label_ok, kd_scale, inv_temperature, ce_weight
    )
    m_a = _load_slot(STATS, STAT_MAX_A, row, num_rows)
    log_sum_a = _load_slot(STATS, STAT_LOG_SUM_A, row, num_rows)
    m_b = _load_slot(STATS, STAT_MAX_B, row, num_rows)
    log_sum_b = _load_slot(STATS, STAT_LOG_SUM_B, row, num_rows)
    d0 = _load_slot(STATS, STAT_D0, row, num_rows)
    d1 = _load_slot(STATS, STAT_D1, row, num_rows)
    m_1 = _load_slot(STATS, STAT_MAX_S, row, num_rows)
    log_sum_1 = _load_slot(STATS, STAT_LOG_SUM_S, row, num_rows)
    student_row = STUDENT + row * stride_s_row
    teacher_row = TEACHER + row * stride_t_row
    grad_s_row = GRAD_S + row * V
    grad_t_row = GRAD_T + row * V
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_s = _load_block(student_row, cols, stride_s_col, in_row)
        grad_s = tl.zeros([BLOCK], dtype=tl.float32)
        grad_t = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_KD:
            b = _teacher_block(
                teacher_row,
                stride_t_teacher,
                cols,
                stride_t_col,
                in_row,
                teachers,
                teacher_ok,
                t_shift,
                t_coef,
                inv_temperature,
                ENSEMBLE,
            )
            log_p_s = _log_probs(x_s, inv_temperature, m_a, log_sum_a)
            log_p_t = _log_probs(b, 1.0, m_b, log_sum_b)
            if DIVERGENCE == DKD:  # p̂: 0 at the target
                log_p_s = tl.where(cols == label, float("-inf"), log_p_s)
                log_p_t = tl.where(cols == label, float("-inf"), log_p_t)
            grad_s, grad_t = _kd_gradients(
                log_p_s,
                log_p_t,
                cols == label,
                d0,
                d1,
                kd_factor,
                beta,
                one_minus_beta,
                log_beta,
                log_one_minus_beta,
                alpha,
                DIVERGENCE,
                INTERIOR_BETA,
            )
        if HAS_CE:
            grad_s += _ce_gradient(x_s, cols == label, m_1, log_sum_1, ce_factor)
        grad_s = tl.where(counted, grad_s, 0.0)
        tl.store(grad_s_row + cols, grad_s.to(GRAD_S.dtype.element_ty), mask=in_row)
        if TEACHER_GRAD:
            grad_t = tl.where(counted, grad_t, 0.0)
            tl.store(grad_t_row + cols, grad_t.to(GRAD_T.dtype.element_ty), mask=in_row)


@triton.jit
def _online_logsumexp(m, total, x):
    """(max, Σ exp(x − max)) of a row's blocks so far after adding block x (−inf entries add nothing)."""
    new_m, _, scale, e = _rebased(m, x)
    return new_m, total * scale + tl.sum(e, axis=0)


# ------------------------------------------------------------------------------------------------------------------
# a sparse (TopK) teacher
# ------------------------------------------------------------------------------------------------------------------


@triton.jit
def _topk_slots(VALUES, INDICES, row, K, V, stride_v_row, stride_v_col, stride_i_row, stride_i_col, TOPK: tl.constexpr):
    """A sparse teacher's row: (which slots hold an entry (index ≠ −1, the empty slot), values as float32 (−inf
    where none), indices clamped into [0, V), whether the entries are valid (each in [0, V), no two equal), and
    the count of entries n)."""
    slots = tl.arange(0, TOPK)
    in_k = slots < K
    indices = tl.load(INDICES + row * stride_i_row + slots * stride_i_col, mask=in_k, other=-1).to(tl.int64)
    slot_ok = in_k & (indices != -1)
    values = tl.load(VALUES + row * stride_v_row + slots * stride_v_col, mask=slot_ok, other=float("-inf"))
    in_range = (indices >= 0) & (indices < V)
    repeats = tl.zeros((TOPK,), dtype=tl.int32)
    for k in range(0, K):
        index_k = tl.load(INDICES + row * stride_i_row + k * stride_i_col).to(tl.int64)
        repeats += (slot_ok & (indices == index_k)).to(tl.int32)
    valid = tl.sum((slot_ok & (~in_range | (repeats > 1))).to(tl.int32), axis=0) == 0
    num_entries = tl.sum(slot_ok.to(tl.int32), axis=0)
    return slot_ok, values.to(tl.float32), tl.where(slot_ok & in_range, indices, 0), valid, num_entries


@triton.jit
def _spread_shift(V, num_entries, inv_temperature, SPREAD: tl.constexpr):
    """(1 − 1/T)·log(V − n) with SPREAD (the rest's V − n classes each hold 1/(V − n) of its mass, tempered one
    by one), else 0: see _sparse_teacher_log_probs."""
    if SPREAD:
        return (1.0 - inv_temperature) * tl.log((V - num_entries).to(tl.float32))
    return 0.0


@triton.jit
def _sparse_teacher_log_probs(values, slot_ok, inv_temperature, tail_shift, BUCKET: tl.constexpr):
    """(log p_t on the K slots, log p_t of the tail bucket) of a sparse teacher: the softmax of v_k/T over the
    slots holding an entry (and, with BUCKET, of log(1 − Σ_k exp v_k)/T + tail_shift, the remaining mass of
    log-probabilities v; tail_shift is _spread_shift for the "spread" tail); without BUCKET the tail is −inf, and
    a row without an entry of finite weight has no p_t (−inf throughout: it adds no KD term). The tail's mass
    1 − Σ_k exp v_k is computed in float64 (K values per row: free): in float32 a tail of 1e-3 would carry the
    rounding of Σ ≈ 1, 6e-5 of
    itself."""
    w = tl.where(slot_ok, values * inv_temperature, float("-inf"))
    top = tl.max(w, axis=0)
    if BUCKET:
        values_64 = values.to(tl.float64)
        top_v = _finite_or_zero(tl.max(values_64, axis=0))  # no entries: Σ exp v = 0, the tail holds all
        log_mass = top_v + tl.log(tl.sum(tl.exp(values_64 - top_v), axis=0))  # log Σ exp v, ≤ 0 up to rounding
        w_tail = tl.log(-_expm1(tl.minimum(log_mass, 0.0))).to(tl.float32) * inv_temperature + tail_shift
        top = tl.maximum(top, w_tail)
        log_norm = top + tl.log(tl.sum(tl.exp(w - top), axis=0) + tl.exp(w_tail - top))
        return w - log_norm, w_tail - log_norm
    has_teacher = top > float("-inf")  # some entry of finite weight: else no p_t (the row adds no KD term)
    shift = tl.where(has_teacher, top, 0.0)
    log_norm = shift + tl.log(tl.sum(tl.exp(w - shift), axis=0))
    return tl.where(has_teacher, w - log_norm, float("-inf")), tl.zeros_like(log_norm) + float("-inf")


@triton.jit
def kd_topk_forward_kernel(
    STUDENT,  # logits (N, V)
    VALUES,
    INDICES,  # the sparse teacher: (N, K) values and int indices, through their strides
    LABELS,  # (N,) int labels through stride_labels (unused without HAS_LABELS)
    LOSS,
    STATS,
    METRICS,  # outputs: (N,) row losses, (NUM_STATS, N) statistics (TopKStat), (NUM_METRICS, N) metrics
    V,
    K,
    stride_s_row,
    stride_s_col,
    stride_v_row,
    stride_v_col,
    stride_i_row,
    stride_i_col,
    stride_labels,
    num_rows,
    inv_temperature,
    inv_teacher_temperature,  # 1/T_t of the teacher's log-weights v/T_t (1 for a sampled teacher)
    ignore_index,
    ce_weight,
    kd_scale,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_KD: tl.constexpr,
    SPREAD: tl.constexpr,  # "spread" tail: the rest's mass evenly over its V − n classes, the KL over all V
    BUCKET: tl.constexpr,  # the teacher's mass outside the K is one more class ("bucket" or "spread" tail, K < V)
    HAS_METRICS: tl.constexpr,
    TOPK: tl.constexpr,  # K rounded up to a power of 2
    BLOCK: tl.constexpr,
):
    """KL(p_t‖p_s) against a sparse teacher (K values and indices per row), see fastkd.reference.kd_topk_rows.
    One sweep over the student row: its log-sum-exp at T, with BUCKET also over the columns outside the K (each
    column compared with the K indices: exact, no subtraction of nearly equal sums), and at T = 1 for CE and the
    metrics (fastkd.reference.kd_topk_fidelity_rows: also the entropy bracket, the first argmax, and the rest's
    log-sum-exp at T = 1)."""
    row = tl.program_id(0).to(tl.int64)
    counted, label_ok, label = _row_state(LABELS, row, stride_labels, V, ignore_index, HAS_LABELS)
    student_row = STUDENT + row * stride_s_row
    n_cols = tl.where(counted, V, 0)
    slot_ok, values, indices, indices_ok, num_entries = _topk_slots(
        VALUES, INDICES, row, K, V, stride_v_row, stride_v_col, stride_i_row, stride_i_col, TOPK
    )
    tail_shift = _spread_shift(V, num_entries, inv_teacher_temperature, SPREAD)
    m_a = float("-inf")
    sum_a = 0.0
    m_rest = float("-inf")
    sum_rest = 0.0
    sum_a_rest = 0.0  # Σ s/T over the columns outside the K (SPREAD)
    m_1 = float("-inf")
    sum_1 = 0.0
    u_s = 0.0  # Σ e·(s − max s) at T = 1: the student's entropy
    m_rest_1 = float("-inf")
    sum_rest_1 = 0.0
    best_s = float("-inf")
    argmax_s = tl.zeros((), dtype=tl.int32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x_s = _load_block(student_row, cols, stride_s_col, cols < V)
        if BUCKET and (HAS_KD or HAS_METRICS):
            in_topk = tl.zeros((BLOCK,), dtype=tl.int1)
            for k in range(0, K):
                in_topk |= cols == tl.load(INDICES + row * stride_i_row + k * stride_i_col)
        if HAS_KD:
            a = x_s * inv_temperature
            m_a, sum_a = _online_logsumexp(m_a, sum_a, a)
            if BUCKET:
                m_rest, sum_rest = _online_logsumexp(m_rest, sum_rest, tl.where(in_topk, float("-inf"), a))
            if SPREAD:
                sum_a_rest += tl.sum(tl.where(in_topk | (cols >= V), 0.0, a), axis=0)
        if HAS_CE or HAS_METRICS:
            new_m_1, shift_1, scale_1, e_1 = _rebased(m_1, x_s)
            if HAS_METRICS:
                u_s = _recentred(u_s, scale_1, shift_1 - _finite_or_zero(m_1), sum_1) + tl.sum(
                    _weighted(e_1, x_s - shift_1), axis=0
                )
                best_s, argmax_s = _first_argmax(x_s, start, best_s, argmax_s)
                if BUCKET:
                    m_rest_1, sum_rest_1 = _online_logsumexp(
                        m_rest_1, sum_rest_1, tl.where(in_topk, float("-inf"), x_s)
                    )
            sum_1 = sum_1 * scale_1 + tl.sum(e_1, axis=0)
            m_1 = new_m_1
    log_sum_a = tl.log(sum_a)
    log_sum_1 = tl.log(sum_1)
    kl = 0.0
    log_p_t_tail = float("-inf")
    loss = 0.0
    x_k = tl.load(student_row + indices * stride_s_col, mask=slot_ok, other=0.0).to(tl.float32)  # s at the K
    if HAS_KD:
        log_p_s = _log_probs(x_k, inv_temperature, m_a, log_sum_a)
        log_p_t, log_p_t_tail = _sparse_teacher_log_probs(values, slot_ok, inv_teacher_temperature, tail_shift, BUCKET)
        kl = tl.sum(tl.where(slot_ok, _weighted(tl.exp(log_p_t), log_p_t - log_p_s), 0.0), axis=0)
        if SPREAD:  # p_tail·(log p_each − the mean of log p_s over the rest's V − n classes)
            rest_classes = (V - num_entries).to(tl.float32)
            mean_log_p_s_rest = sum_a_rest / rest_classes - (m_a + log_sum_a)
            kl += _weighted(tl.exp(log_p_t_tail), log_p_t_tail - tl.log(rest_classes) - mean_log_p_s_rest)
        elif BUCKET:  # the student's bucket: its mass outside the K
            kl += _weighted(tl.exp(log_p_t_tail), log_p_t_tail - ((m_rest + tl.log(sum_rest)) - (m_a + log_sum_a)))
        loss = kd_scale * kl
    if HAS_CE:
        loss += ce_weight * ((m_1 - _target_logit(student_row, label, stride_s_col, counted & label_ok)) + log_sum_1)
    _store_loss(LOSS, row, counted, ~label_ok | ~indices_ok, loss)
    _store_slot(STATS, TOPK_MAX_A, row, num_rows, counted, m_a)
    _store_slot(STATS, TOPK_LOG_SUM_A, row, num_rows, counted, log_sum_a)
    _store_slot(STATS, TOPK_LOG_P_TAIL, row, num_rows, counted, log_p_t_tail)
    _store_slot(STATS, TOPK_KL, row, num_rows, counted, kl)
    _store_slot(STATS, TOPK_MAX_S, row, num_rows, counted, m_1)
    _store_slot(STATS, TOPK_LOG_SUM_S, row, num_rows, counted, log_sum_1)
    _store_slot(STATS, TOPK_MAX_REST, row, num_rows, counted, m_rest)
    _store_slot(STATS, TOPK_LOG_SUM_REST, row, num_rows, counted, tl.log(sum_rest))
    if HAS_METRICS:  # agreement, KL(p_t‖p_s), H(p_t) of the sparse teacher, H(p_s), all at T = 1
        log_q_t, log_q_t_tail = _sparse_teacher_log_probs(values, slot_ok, 1.0, 0.0, BUCKET)  # T = 1: no shift
        log_q_s = _log_probs(x_k, 1.0, m_1, log_sum_1)
        kl_1 = tl.sum(tl.where(slot_ok, _weighted(tl.exp(log_q_t), log_q_t - log_q_s), 0.0), axis=0)
        entropy_t = -tl.sum(tl.where(slot_ok, _weighted(tl.exp(log_q_t), log_q_t), 0.0), axis=0)
        if BUCKET:
            log_q_s_tail = (m_rest_1 + tl.log(sum_rest_1)) - (m_1 + log_sum_1)
            kl_1 += _weighted(tl.exp(log_q_t_tail), log_q_t_tail - log_q_s_tail)
            entropy_t -= _weighted(tl.exp(log_q_t_tail), log_q_t_tail)
        top_value = tl.max(values, axis=0)
        top_class = tl.min(tl.where(slot_ok & (values == top_value), indices, V), axis=0)
        agree = argmax_s.to(tl.int64) == top_class
        _store_slot(METRICS, METRIC_TOP1_AGREEMENT, row, num_rows, counted, tl.where(agree, 1.0, 0.0))
        _store_slot(METRICS, METRIC_PREDICTIVE_KL, row, num_rows, counted, kl_1)
        _store_slot(METRICS, METRIC_TEACHER_ENTROPY, row, num_rows, counted, entropy_t)
        _store_slot(METRICS, METRIC_STUDENT_ENTROPY, row, num_rows, counted, log_sum_1 - u_s / sum_1)


@triton.jit
def kd_topk_backward_kernel(
    STUDENT,
    VALUES,
    INDICES,
    LABELS,  # as in kd_topk_forward_kernel
    STATS,  # the forward's statistics (TopKStat)
    GRAD_LOSS,  # (N,) incoming gradient of the row losses, through stride_grad_loss
    GRAD_S,  # output: contiguous (N, V) gradient in the student's dtype
    V,
    K,
    stride_s_row,
    stride_s_col,
    stride_v_row,
    stride_v_col,
    stride_i_row,
    stride_i_col,
    stride_labels,
    stride_grad_loss,
    num_rows,
    inv_temperature,
    inv_teacher_temperature,  # 1/T_t of the teacher's log-weights v/T_t (1 for a sampled teacher)
    ignore_index,
    ce_weight,
    kd_scale,
    HAS_LABELS: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_KD: tl.constexpr,
    SPREAD: tl.constexpr,  # "spread" tail: the rest's mass evenly over its V − n classes, the KL over all V
    BUCKET: tl.constexpr,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The student gradient against a sparse teacher: p_s,j − p_t,tail·exp(a_j − logsumexp of a outside the K)
    (KD; the bucket's share, never a ratio that can overflow) + softmax − onehot (CE) on every column, then the K
    teacher columns rewritten with p_s,k − p_t,k (after a barrier: the same program stored them in the sweep)."""
    row = tl.program_id(0).to(tl.int64)
    counted, label_ok, label = _row_state(LABELS, row, stride_labels, V, ignore_index, HAS_LABELS)
    slot_ok, values, indices, indices_ok, num_entries = _topk_slots(
        VALUES, INDICES, row, K, V, stride_v_row, stride_v_col, stride_i_row, stride_i_col, TOPK
    )
    tail_shift = _spread_shift(V, num_entries, inv_teacher_temperature, SPREAD)
    kd_factor, ce_factor = _gradient_factors(
        GRAD_LOSS, row, stride_grad_loss, counted & (~label_ok | ~indices_ok), kd_scale, inv_temperature, ce_weight
    )
    if not BUCKET:  # a row without entries (or only −inf ones) has no teacher: no KD gradient (NaN stays NaN)
        has_teacher = tl.max(tl.where(slot_ok, values, float("-inf")), axis=0) > float("-inf")
        kd_factor *= tl.where(has_teacher, 1.0, 0.0)
    m_a = _load_slot(STATS, TOPK_MAX_A, row, num_rows)
    log_sum_a = _load_slot(STATS, TOPK_LOG_SUM_A, row, num_rows)
    log_p_t_tail = _load_slot(STATS, TOPK_LOG_P_TAIL, row, num_rows)
    m_1 = _load_slot(STATS, TOPK_MAX_S, row, num_rows)
    log_sum_1 = _load_slot(STATS, TOPK_LOG_SUM_S, row, num_rows)
    m_rest = _load_slot(STATS, TOPK_MAX_REST, row, num_rows)
    log_sum_rest = _load_slot(STATS, TOPK_LOG_SUM_REST, row, num_rows)
    student_row = STUDENT + row * stride_s_row
    grad_row = GRAD_S + row * V
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        x_s = _load_block(student_row, cols, stride_s_col, in_row)
        grad = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_KD:
            grad = kd_factor * tl.exp(_log_probs(x_s, inv_temperature, m_a, log_sum_a))
            if SPREAD:  # each class of the rest has the teacher's p_tail/(V − n)
                grad -= kd_factor * tl.exp(log_p_t_tail - tl.log((V - num_entries).to(tl.float32)))
            elif BUCKET:
                grad -= kd_factor * tl.exp(log_p_t_tail + _log_probs(x_s, inv_temperature, m_rest, log_sum_rest))
        if HAS_CE:
            grad += _ce_gradient(x_s, cols == label, m_1, log_sum_1, ce_factor)
        tl.store(grad_row + cols, tl.where(counted, grad, 0.0).to(GRAD_S.dtype.element_ty), mask=in_row)
    if HAS_KD:
        tl.debug_barrier()
        x_k = tl.load(student_row + indices * stride_s_col, mask=slot_ok, other=0.0).to(tl.float32)
        log_p_t, _ = _sparse_teacher_log_probs(values, slot_ok, inv_teacher_temperature, tail_shift, BUCKET)
        grad = kd_factor * (tl.exp(_log_probs(x_k, inv_temperature, m_a, log_sum_a)) - tl.exp(log_p_t))
        if HAS_CE:
            grad += _ce_gradient(x_k, indices == label, m_1, log_sum_1, ce_factor)
        tl.store(grad_row + indices, tl.where(counted, grad, 0.0).to(GRAD_S.dtype.element_ty), mask=slot_ok)


# ------------------------------------------------------------------------------------------------------------------
# launchers
# ------------------------------------------------------------------------------------------------------------------


def launch_config(num_cols: int, kernel: str, divergence: str, num_teachers: int = 1) -> dict:
    """Block size and warps for rows of num_cols entries, from bench/tune_kd.py on an H100 (bench/RESULTS.md):
    the KL forward streams best with small single-warp programs (many rows in flight per SM), the backward
    with wide blocks of 32 elements per thread; the JSD forward, heavy in arithmetic, with 16 per thread.
    An ensemble reads (K, BLOCK) tiles: its blocks shrink by K (rounded up to a power of 2, down to 16 columns,
    with more warps past that) so a program holds as many elements as with one teacher (not tuned on a GPU yet)."""
    block = triton.next_power_of_2(max(num_cols, 1))
    teachers = triton.next_power_of_2(num_teachers)
    if kernel == "forward" and divergence != "jsd":
        block = max(min(block, 512) // teachers, 16)  # one warp, unless K > 32 teachers make the tile larger
        return dict(BLOCK=block, num_warps=max(1, min(block * teachers // 512, 32)))
    block = max(min(block, 4096) // teachers, 16)
    per_warp = 512 if kernel == "forward" else 128
    return dict(BLOCK=block, num_warps=max(1, min(block * teachers // per_warp, 32)))


def _row_args(student, labels) -> dict:
    """The student's strides and the labels' (0 without labels: the kernels do not read them)."""
    return dict(
        stride_s_row=student.stride(0),
        stride_s_col=student.stride(1),
        stride_labels=0 if labels is None else labels.stride(0),
        HAS_LABELS=labels is not None,
    )


def _option_args(options: KDOptions) -> dict:
    """The kernels' option arguments (scalars and modes) from the launch's options."""
    return dict(
        **kd_scalars(options),
        ignore_index=options.ignore_index,
        ce_weight=options.ce_weight,
        kd_scale=options.kd_scale,
        alpha=options.alpha,
        DIVERGENCE=int(Divergence.of(options.divergence)),
        HAS_CE=options.ce_weight != 0,
        HAS_KD=options.kd_scale != 0,
        INTERIOR_BETA=0 < options.beta < 1,
    )


def _teacher_args(teacher, ensemble: str) -> dict:
    """The teacher's strides and ensemble arguments: ``teacher`` is (N, V), or (K, N, V) with ``ensemble`` "prob"
    or "logit" (its weights, (K,) float32 summing to 1, go to the kernel apart)."""
    mode = Ensemble.of(ensemble)
    if mode == Ensemble.NONE:
        return dict(
            stride_t_teacher=0,
            stride_t_row=teacher.stride(0),
            stride_t_col=teacher.stride(1),
            num_teachers=1,
            ENSEMBLE=int(mode),
            TEACHERS=1,
        )
    return dict(
        stride_t_teacher=teacher.stride(0),
        stride_t_row=teacher.stride(1),
        stride_t_col=teacher.stride(2),
        num_teachers=teacher.shape[0],
        ENSEMBLE=int(mode),
        TEACHERS=triton.next_power_of_2(teacher.shape[0]),
    )


def kd_forward(
    student,
    teacher,
    labels,
    options: KDOptions,
    *,
    with_metrics=False,
    teacher_weights=None,
    ensemble="none",
    config=None,
):
    """Row losses (N,) float32, statistics (:func:`fastkd.kernel_args.stats_rows`, N) float32 and metrics
    (NUM_METRICS, N) float32 (or an empty tensor without ``with_metrics``) of (N, V) student logits against (N, V)
    teacher logits, or against the ensemble of (K, N, V) teachers (see :func:`_teacher_args`). ``config``
    overrides :func:`launch_config` (for tuning)."""
    num_rows, num_cols = student.shape
    loss = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    stats = torch.empty(stats_rows(teacher, ensemble), num_rows, dtype=torch.float32, device=student.device)
    metrics = torch.empty((NUM_METRICS, num_rows) if with_metrics else (0,), dtype=torch.float32, device=student.device)
    if num_rows == 0:
        return loss, stats, metrics
    teacher_args = _teacher_args(teacher, ensemble)
    kd_forward_kernel[(num_rows,)](
        STUDENT=student,
        TEACHER=teacher,
        WEIGHTS=teacher_weights if teacher_weights is not None else loss,
        LABELS=labels if labels is not None else loss,
        LOSS=loss,
        STATS=stats,
        METRICS=metrics if with_metrics else loss,
        V=num_cols,
        num_rows=num_rows,
        HAS_METRICS=with_metrics,
        **_row_args(student, labels),
        **teacher_args,
        **_option_args(options),
        **(config or launch_config(num_cols, "forward", options.divergence, teacher_args["num_teachers"])),
    )
    return loss, stats, metrics


def kd_backward(
    grad_loss,
    student,
    teacher,
    labels,
    stats,
    options: KDOptions,
    *,
    teacher_grad,
    teacher_weights=None,
    ensemble="none",
    config=None,
):
    """Gradients of Σ grad_loss·row_loss w.r.t. student (and teacher if teacher_grad, one teacher only; else an
    empty tensor).

    ``grad_loss`` is (N,) and may have stride 0 (an expanded scalar). Gradients are contiguous (N, V) in the
    dtype of their input.
    """
    if teacher_grad and ensemble != "none":
        raise ValueError("the ensemble kernels give no gradient to the teachers")
    num_rows, num_cols = student.shape
    grad_s = torch.empty((num_rows, num_cols), dtype=student.dtype, device=student.device)
    grad_t = (
        torch.empty((num_rows, num_cols), dtype=teacher.dtype, device=teacher.device)
        if teacher_grad
        else torch.empty(0, dtype=teacher.dtype, device=teacher.device)
    )
    if num_rows == 0:
        return grad_s, grad_t
    teacher_args = _teacher_args(teacher, ensemble)
    stats = stats.contiguous()  # read as (rows, N) blocks
    kd_backward_kernel[(num_rows,)](
        STUDENT=student,
        TEACHER=teacher,
        WEIGHTS=teacher_weights if teacher_weights is not None else stats,
        LABELS=labels if labels is not None else stats,
        STATS=stats,
        GRAD_LOSS=grad_loss,
        GRAD_S=grad_s,
        GRAD_T=grad_t if teacher_grad else grad_s,
        V=num_cols,
        stride_grad_loss=grad_loss.stride(0),
        num_rows=num_rows,
        TEACHER_GRAD=teacher_grad,
        **_row_args(student, labels),
        **teacher_args,
        **_option_args(options),
        **(config or launch_config(num_cols, "backward", options.divergence, teacher_args["num_teachers"])),
    )
    return grad_s, grad_t


def _topk_args(values, indices, labels, options: TopKOptions, student) -> dict:
    """The sparse teacher's arguments and the launch's options."""
    num_slots = values.shape[1]
    return dict(
        K=num_slots,
        stride_v_row=values.stride(0),
        stride_v_col=values.stride(1),
        stride_i_row=indices.stride(0),
        stride_i_col=indices.stride(1),
        BUCKET=options.tail in ("bucket", "spread") and num_slots < student.shape[1],
        SPREAD=options.tail == "spread" and num_slots < student.shape[1],
        TOPK=triton.next_power_of_2(num_slots),
        inv_temperature=1.0 / options.temperature,
        inv_teacher_temperature=1.0 / options.teacher_temperature,
        ignore_index=options.ignore_index,
        ce_weight=options.ce_weight,
        kd_scale=options.kd_scale,
        HAS_CE=options.ce_weight != 0,
        HAS_KD=options.kd_scale != 0,
        **_row_args(student, labels),
    )


def kd_topk_forward(student, values, indices, labels, options: TopKOptions, *, with_metrics=False):
    """Row losses (N,), statistics (NUM_STATS, N; the TopKStat slots) and metrics (NUM_METRICS, N, or empty
    without ``with_metrics``), float32, of (N, V) student logits against a sparse teacher: (N, K) ``values`` and
    int ``indices`` (see :class:`fastkd.TopK`)."""
    num_rows, num_cols = student.shape
    loss = torch.empty(num_rows, dtype=torch.float32, device=student.device)
    stats = torch.zeros(NUM_STATS, num_rows, dtype=torch.float32, device=student.device)
    metrics = torch.empty((NUM_METRICS, num_rows) if with_metrics else (0,), dtype=torch.float32, device=student.device)
    if num_rows == 0:
        return loss, stats, metrics
    kd_topk_forward_kernel[(num_rows,)](
        STUDENT=student,
        VALUES=values,
        INDICES=indices,
        LABELS=labels if labels is not None else indices,
        LOSS=loss,
        STATS=stats,
        METRICS=metrics if with_metrics else loss,
        V=num_cols,
        num_rows=num_rows,
        HAS_METRICS=with_metrics,
        **_topk_args(values, indices, labels, options, student),
        **launch_config(num_cols, "forward", "kl"),
    )
    return loss, stats, metrics


def kd_topk_backward(grad_loss, student, values, indices, labels, stats, options: TopKOptions):
    """Gradient of Σ grad_loss·row_loss w.r.t. the student logits, contiguous (N, V) in their dtype."""
    num_rows, num_cols = student.shape
    grad_s = torch.empty((num_rows, num_cols), dtype=student.dtype, device=student.device)
    if num_rows == 0:
        return grad_s
    stats = stats.contiguous()  # read as (NUM_STATS, N) blocks
    kd_topk_backward_kernel[(num_rows,)](
        STUDENT=student,
        VALUES=values,
        INDICES=indices,
        LABELS=labels if labels is not None else indices,
        STATS=stats,
        GRAD_LOSS=grad_loss,
        GRAD_S=grad_s,
        V=num_cols,
        stride_grad_loss=grad_loss.stride(0),
        num_rows=num_rows,
        **_topk_args(values, indices, labels, options, student),
        **launch_config(num_cols, "backward", "kl"),
    )
    return grad_s
