// kd_loss row kernels for one instruction set: included by kd_cpu_<isa>.cpp with FASTKD_ISA and FASTKD_VEC_BYTES
// defined. The algorithm is the Triton kernels' (kernels/kd.py), with the same statistics layout, so either
// backend's forward can feed the other's backward:
//
//   forward, one sweep per row in blocks of kBlock columns: the block's maxima (read from memory), then the
//   exponentials re-centred on the running maxima (re-read from L1), merged into the row's running sums and,
//   for kl/reverse_kl, the weighted log ratio w = Σ e_p·[(x_p − m_p) − (x_q − m_q)]. JSD sweeps the row a
//   second time once both normalisers are known.
//   backward, one sweep per row writing ∂s (and ∂t when wanted), scaled by the incoming gradient of the row.
//
// Rows are split across OpenMP threads; each row is computed by one thread in a fixed order, so results do not
// depend on the thread count.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "kd_cpu.h"
#include "simd.h"
#include "static_switch.h"

namespace fastkd {
namespace FASTKD_ISA {
namespace {

constexpr int64_t kBlock = 1024;  // columns per block: the block of student and teacher stays in L1
// The exponentials keep the core too busy for the hardware prefetchers to keep enough reads in flight: each
// vector step asks for the line kPrefetch columns ahead (past a row's end: the start of the next row).
constexpr int64_t kPrefetch = 2 * kBlock;

inline float finite_or_zero(float m) { return m == -kInf ? 0.0f : m; }
inline float softplus(float x) { return (x > 0 ? x : 0.0f) + std::log1p(std::exp(-std::fabs(x))); }
inline float fmax_(float a, float b) { return a > b ? a : b; }
inline int64_t min_(int64_t a, int64_t b) { return a < b ? a : b; }

// p·x, 0 where p = 0 (0·log 0 = 0, never 0·inf)
inline vf weighted(vf p, vf x) { return p == 0.0f ? splat(0.0f) : p * x; }

inline vi column_indices(int64_t start) {
    vi cols;
    for (int i = 0; i < kLanes; ++i) cols[i] = static_cast<int32_t>(start) + i;
    return cols;
}

// log(1 − w + w·eˣ) for 0 < w < 1, accurate where it is tiny; see fastkd.reference.log_mixture_ratio.
inline vf log_mixture_ratio(vf x, float w, float one_minus_w, float log_w, float log_one_minus_w) {
    const vf y = w * vexpm1(x);
    const vf tiny = vlog1p(y);
    const vf low = vlog(one_minus_w + w * vexp(vmin(x, splat(0.0f))));
    const vf high_arg = log_w + x;
    vf high = vmax(high_arg, splat(log_one_minus_w)) + vlog(1.0f + vexp(-vabs(log_one_minus_w - high_arg)));
    high = x == kInf ? x : high;
    return y <= -0.5f ? low : (y <= 1.0f ? tiny : high);
}

struct Row {
    const void* student;
    const void* teacher;
    bool counted, label_ok;
    int64_t label;
};

inline const void* row_pointer(const Rows& rows, int64_t row) {
    return static_cast<const char*>(rows.data) + row * rows.row_stride * element_size(rows.dtype);
}

inline Row row_state(const KDArgs& args, int64_t row) {
    Row r{row_pointer(args.student, row), row_pointer(args.teacher, row), true, true, 0};
    if (args.labels != nullptr) {
        r.label = args.labels[row];
        r.counted = r.label != args.ignore_index;
        r.label_ok = r.label >= 0 && r.label < args.num_cols;
    }
    return r;
}

// The logit at the row's label as float32 (0 where the row has no valid label).
inline float target_logit(const Row& r, const void* row, int dtype) {
    return r.counted && r.label_ok ? load_lanes(row, dtype, r.label, 1, 0.0f)[0] : 0.0f;
}

struct JSDRatios {
    vf teacher, student;  // log p_t/m, log p_s/m
};

inline JSDRatios jsd_log_ratios(const KDArgs& args, vf log_p_s, vf log_p_t) {
    if (!(args.beta > 0.0f && args.beta < 1.0f)) return {splat(0.0f), splat(0.0f)};
    const vf d = log_p_t - log_p_s;
    return {-log_mixture_ratio(-d, args.one_minus_beta, args.beta, args.log_one_minus_beta, args.log_beta),
            -log_mixture_ratio(d, args.beta, args.one_minus_beta, args.log_beta, args.log_one_minus_beta)};
}

// Per-thread scratch of the fused forward: the row's exponentials (kept in L2 between the two sweeps) and the
// shifts they were taken against, block by block.
thread_local std::vector<float> t_scratch;

template <bool kTeacherGrad>
void store_zero_gradients(const KDArgs& args, void* grad_s_row, void* grad_t_row) {
    for (int64_t c = 0; c < args.num_cols; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, args.num_cols - c));
        store_lanes(grad_s_row, args.student.dtype, c, n, splat(0.0f));
        if (kTeacherGrad) store_lanes(grad_t_row, args.teacher.dtype, c, n, splat(0.0f));
    }
}

inline void* gradient_row(void* grad, int dtype, int64_t row, int64_t num_cols) {
    return static_cast<char*>(grad) + row * num_cols * element_size(dtype);
}

// A running Σ e·[bracket] after its exponentials are rescaled by `scale` and each bracket moves by −delta.
inline float recentred(float w, float scale, float delta, float total) {
    return scale == 0 ? 0.0f : scale * (w - delta * total);
}

// Column of the first entry equal to `value` in [start, end) (value is the maximum of that range).
inline int64_t first_index_of(const void* row, int dtype, int64_t start, int64_t end, float value) {
    for (int64_t c = start; c < end; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, end - c));
        const vf x = load_lanes(row, dtype, c, n, -kInf);
        for (int i = 0; i < n; ++i) {
            if (x[i] == value) return c + i;
        }
    }
    return start;
}

// The helpers of forward_row below are always inlined into it: as separate functions they made the forward up to
// 25% slower (measured with gcc 12 on AVX2 and AVX-512), though each is called once per block of kBlock columns.

// The running state of a row's forward sweep at T (a = s/T, b = t/T): maxima and sums of exponentials re-centred on
// them, and what the divergence accumulates beside them.
struct KDSums {
    float m_a = -kInf, m_b = -kInf, sum_a = 0, sum_b = 0;
    float w = 0;                         // kl, reverse_kl, dkd: Σ e_p·[(x_p − m_p) − (x_q − m_q)]
    float s_ab = 0, s_aa = 0, s_bb = 0;  // cosine: ⟨e_a, e_b⟩, ‖e_a‖², ‖e_b‖² (the normalisers cancel)
};

// The running state at T = 1: the student's log-sum-exp (the CE term), and for the fidelity metrics the teacher's,
// the KL(p_t‖p_s) bracket sum, Σ e·(x − m) of each (the entropies) and the first argmaxes.
struct T1Sums {
    float m_1 = -kInf, sum_1 = 0;
    float m_t1 = -kInf, sum_t1 = 0, w_1 = 0, u_s = 0, u_t = 0, best_s = -kInf, best_t = -kInf;
    int64_t argmax_s = 0, argmax_t = 0;
};

// A block's maxima of s and t, and the maxima the divergence takes at T (dkd: over the non-target classes).
struct BlockMaxima {
    float s, t, kd_s, kd_t;
};

// Where the fused forward keeps the row's exponentials (e_a, e_b, e_1) and the shifts they were taken against
// (3 per block); all null without kFused.
struct FusedScratch {
    float *e_a = nullptr, *e_b = nullptr, *e_1 = nullptr, *shifts = nullptr;
};

inline FusedScratch fused_scratch(int64_t num_cols) {
    const int64_t padded = (num_cols + kLanes - 1) / kLanes * kLanes;
    const size_t need = static_cast<size_t>(3 * padded + 3 * (num_cols / kBlock + 1));
    if (t_scratch.size() < need) t_scratch.resize(need);
    FusedScratch f;
    f.e_a = t_scratch.data();
    f.e_b = f.e_a + padded;
    f.e_1 = f.e_b + padded;
    f.shifts = f.e_1 + padded;
    return f;
}

// The maxima of columns [start, end) of the row (read from memory; the sweeps that follow re-read them from L1).
// A NaN entry is recorded in nan_seen: the exponentials drop NaN, so such a row is marked as a whole.
template <int kDivergence, bool kReadTeacher>
[[gnu::always_inline]] inline BlockMaxima block_maxima(const Row& r, const KDArgs& args, int64_t start, int64_t end,
                                                       vi label, vi& nan_seen) {
    const void *student = r.student, *teacher = r.teacher;  // loop invariants in registers, as in every sweep here
    const int s_dtype = args.student.dtype, t_dtype = args.teacher.dtype;
    vf max_s = splat(-kInf), max_t = splat(-kInf), max_rest_s = splat(-kInf), max_rest_t = splat(-kInf);
    for (int64_t c = start; c < end; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, end - c));
        const vf x_s = load_lanes(student, s_dtype, c, n, -kInf);
        max_s = vmax(x_s, max_s);
        nan_seen |= x_s != x_s;
        if (kReadTeacher) {
            const vf x_t = load_lanes(teacher, t_dtype, c, n, -kInf);
            max_t = vmax(x_t, max_t);
            nan_seen |= x_t != x_t;
            if (kDivergence == kDKD) {  // the non-target maxima
                const vi target = column_indices(c) == label;
                max_rest_s = vmax(target ? splat(-kInf) : x_s, max_rest_s);
                max_rest_t = vmax(target ? splat(-kInf) : x_t, max_rest_t);
            }
        }
    }
    const float block_s = hmax(max_s), block_t = hmax(max_t);
    return {block_s, block_t, kDivergence == kDKD ? hmax(max_rest_s) : block_s,
            kDivergence == kDKD ? hmax(max_rest_t) : block_t};
}

// Folds columns [start, end) into the sums at T; kFused also keeps the exponentials and their shifts.
template <int kDivergence, bool kFused>
[[gnu::always_inline]] inline void fold_kd_block(KDSums& k, const Row& r, const KDArgs& args, int64_t start,
                                                int64_t end, const BlockMaxima& mx, vi label,
                                                const FusedScratch& scratch) {
    const void *student = r.student, *teacher = r.teacher;
    const int s_dtype = args.student.dtype, t_dtype = args.teacher.dtype;
    float *const e_a = scratch.e_a, *const e_b = scratch.e_b;
    const float inv_t = args.inv_temperature;
    const float new_m_a = fmax_(k.m_a, mx.kd_s * inv_t), new_m_b = fmax_(k.m_b, mx.kd_t * inv_t);
    const float shift_a = finite_or_zero(new_m_a), shift_b = finite_or_zero(new_m_b);
    vf acc_a = splat(0.0f), acc_b = splat(0.0f), acc_w = splat(0.0f);
    vf acc_ab = splat(0.0f), acc_aa = splat(0.0f), acc_bb = splat(0.0f);
    for (int64_t c = start; c < end; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, end - c));
        prefetch(student, s_dtype, c + kPrefetch);
        prefetch(teacher, t_dtype, c + kPrefetch);
        vf a = load_lanes(student, s_dtype, c, n, -kInf) * inv_t - shift_a;
        vf b = load_lanes(teacher, t_dtype, c, n, -kInf) * inv_t - shift_b;
        if (kDivergence == kDKD) {  // dkd: sums and w over the non-target classes only
            const vi target = column_indices(c) == label;
            a = target ? splat(-kInf) : a;
            b = target ? splat(-kInf) : b;
        }
        const vf exp_a = vexp_nonpositive(a), exp_b = vexp_nonpositive(b);
        acc_a += exp_a;
        acc_b += exp_b;
        if (kDivergence == kKL || kDivergence == kDKD) acc_w += weighted(exp_b, b - a);
        if (kDivergence == kReverseKL) acc_w += weighted(exp_a, a - b);
        if (kDivergence == kCosine) {
            acc_ab += exp_a * exp_b;
            acc_aa += exp_a * exp_a;
            acc_bb += exp_b * exp_b;
        }
        if (kFused) {
            vstore(e_a + c, exp_a);
            vstore(e_b + c, exp_b);
        }
    }
    const float scale_a = std::exp(k.m_a - shift_a), scale_b = std::exp(k.m_b - shift_b);
    if (kDivergence == kCosine) {
        k.s_ab = k.s_ab * (scale_a * scale_b) + hsum(acc_ab);
        k.s_aa = k.s_aa * (scale_a * scale_a) + hsum(acc_aa);
        k.s_bb = k.s_bb * (scale_b * scale_b) + hsum(acc_bb);
    }
    if (kDivergence == kKL || kDivergence == kReverseKL || kDivergence == kDKD) {  // re-centre w
        const float delta = (shift_b - finite_or_zero(k.m_b)) - (shift_a - finite_or_zero(k.m_a));
        k.w = kDivergence == kReverseKL ? recentred(k.w, scale_a, -delta, k.sum_a) + hsum(acc_w)
                                        : recentred(k.w, scale_b, delta, k.sum_b) + hsum(acc_w);
    }
    k.sum_a = k.sum_a * scale_a + hsum(acc_a);
    k.sum_b = k.sum_b * scale_b + hsum(acc_b);
    k.m_a = new_m_a;
    k.m_b = new_m_b;
    if (kFused) {
        scratch.shifts[3 * (start / kBlock)] = shift_a;
        scratch.shifts[3 * (start / kBlock) + 1] = shift_b;
    }
}

// Folds columns [start, end) into the sums at T = 1; kMetrics: the metrics' sums too; kKeep: the student's
// exponentials and shift into the fused scratch.
template <bool kMetrics, bool kKeep>
[[gnu::always_inline]] inline void fold_t1_block(T1Sums& u, const Row& r, const KDArgs& args, int64_t start,
                                                int64_t end, const BlockMaxima& mx, const FusedScratch& scratch) {
    const void *student = r.student, *teacher = r.teacher;
    const int s_dtype = args.student.dtype, t_dtype = args.teacher.dtype;
    float* const e_1 = scratch.e_1;
    if (kMetrics) {
        if (mx.s > u.best_s) {
            u.best_s = mx.s;
            u.argmax_s = first_index_of(student, s_dtype, start, end, mx.s);
        }
        if (mx.t > u.best_t) {
            u.best_t = mx.t;
            u.argmax_t = first_index_of(teacher, t_dtype, start, end, mx.t);
        }
    }
    const float new_m_1 = fmax_(u.m_1, mx.s), shift_1 = finite_or_zero(new_m_1);
    const float new_m_t1 = fmax_(u.m_t1, mx.t), shift_t1 = finite_or_zero(new_m_t1);
    vf acc_1 = splat(0.0f), acc_t1 = splat(0.0f), acc_w1 = splat(0.0f), acc_us = splat(0.0f);
    vf acc_ut = splat(0.0f);
    for (int64_t c = start; c < end; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, end - c));
        const vf x_1 = load_lanes(student, s_dtype, c, n, -kInf) - shift_1;
        const vf exp_1 = vexp_nonpositive(x_1);
        acc_1 += exp_1;
        if (kKeep) vstore(e_1 + c, exp_1);
        if (kMetrics) {
            const vf x_t1 = load_lanes(teacher, t_dtype, c, n, -kInf) - shift_t1;
            const vf exp_t1 = vexp_nonpositive(x_t1);
            acc_t1 += exp_t1;
            acc_w1 += weighted(exp_t1, x_t1 - x_1);
            acc_us += weighted(exp_1, x_1);
            acc_ut += weighted(exp_t1, x_t1);
        }
    }
    const float scale_1 = std::exp(u.m_1 - shift_1);
    if (kMetrics) {
        const float scale_t1 = std::exp(u.m_t1 - shift_t1);
        const float moved_1 = shift_1 - finite_or_zero(u.m_1), moved_t1 = shift_t1 - finite_or_zero(u.m_t1);
        u.w_1 = recentred(u.w_1, scale_t1, moved_t1 - moved_1, u.sum_t1) + hsum(acc_w1);
        u.u_s = recentred(u.u_s, scale_1, moved_1, u.sum_1) + hsum(acc_us);
        u.u_t = recentred(u.u_t, scale_t1, moved_t1, u.sum_t1) + hsum(acc_ut);
        u.sum_t1 = u.sum_t1 * scale_t1 + hsum(acc_t1);
        u.m_t1 = new_m_t1;
    }
    u.sum_1 = u.sum_1 * scale_1 + hsum(acc_1);
    u.m_1 = new_m_1;
    if (kKeep) scratch.shifts[3 * (start / kBlock) + 2] = shift_1;
}

// What the forward stores of the divergence: the row's KD loss, d0 and d1 (the Stat slots), and the log-sums of a
// and b as the backward reads them.
struct KDResult {
    float loss = 0, d0 = 0, d1 = 0, log_sum_a = 0, log_sum_b = 0;
};

// sign(p_s − p_t) per lane: 0 where they are equal (the subgradient of |x| at 0 that autograd takes), NaN where
// either is NaN (a NaN row's gradients stay NaN)
inline vf sign_of_difference(vf p_s, vf p_t) {
    const vf equal_or_nan = p_s == p_t ? splat(0.0f) : splat(__builtin_nanf(""));
    return p_s > p_t ? splat(1.0f) : (p_s < p_t ? splat(-1.0f) : equal_or_nan);
}

// The second sweep of the divergences whose terms need both normalisers first, over log p_s and log p_t: the
// generalized JSD (m = β p_t + (1 − β) p_s): d0 = KL(p_t‖m), d1 = KL(p_s‖m); TVD: d0 = Σ p_s·σ, d1 = Σ p_t·σ with
// σ = sign(p_s − p_t), and its value ½ Σ |p_s − p_t| (returned; 0 for JSD).
template <int kDivergence>
[[gnu::always_inline]] inline float normalized_sweep(const Row& r, const KDArgs& args, int64_t num_cols,
                                                     const KDSums& k, KDResult& result) {
    const void *student = r.student, *teacher = r.teacher;
    const int s_dtype = args.student.dtype, t_dtype = args.teacher.dtype;
    const float inv_t = args.inv_temperature, m_a = k.m_a, m_b = k.m_b;
    const float log_sum_a = result.log_sum_a, log_sum_b = result.log_sum_b;
    vf acc_0 = splat(0.0f), acc_1 = splat(0.0f), acc_2 = splat(0.0f);
    for (int64_t c = 0; c < num_cols; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, num_cols - c));
        const vf log_p_s = (load_lanes(student, s_dtype, c, n, -kInf) * inv_t - m_a) - log_sum_a;
        const vf log_p_t = (load_lanes(teacher, t_dtype, c, n, -kInf) * inv_t - m_b) - log_sum_b;
        if constexpr (kDivergence == kJSD) {
            const JSDRatios ratio = jsd_log_ratios(args, log_p_s, log_p_t);
            acc_0 += weighted(vexp_nonpositive(log_p_t), ratio.teacher);
            acc_1 += weighted(vexp_nonpositive(log_p_s), ratio.student);
        } else {
            static_assert(kDivergence == kTVD, "normalized_sweep: jsd or tvd");
            const vf p_s = vexp_nonpositive(log_p_s), p_t = vexp_nonpositive(log_p_t);
            const vf sign = sign_of_difference(p_s, p_t);
            acc_0 += p_s * sign;
            acc_1 += p_t * sign;
            acc_2 += vabs(p_s - p_t);
        }
    }
    result.d0 = hsum(acc_0);
    result.d1 = hsum(acc_1);
    return 0.5f * hsum(acc_2);
}

// The divergence of a row from its sums (see Stat in kd_args.h for d0 and d1); without kHasKD only the log-sums.
template <int kDivergence, bool kHasKD>
[[gnu::always_inline]] inline KDResult kd_result(const KDSums& k, const Row& r, const KDArgs& args, int64_t num_cols) {
    KDResult result;
    // cosine: log ‖e‖₂ in place of the log-sums (the backward's "probabilities" are then p/‖p‖)
    result.log_sum_a = kDivergence == kCosine ? 0.5f * std::log(k.s_aa) : std::log(k.sum_a);
    result.log_sum_b = kDivergence == kCosine ? 0.5f * std::log(k.s_bb) : std::log(k.sum_b);
    if (!kHasKD) return result;
    if constexpr (kDivergence == kKL) {
        result.d0 = k.w / k.sum_b - result.log_sum_b + result.log_sum_a;
        result.loss = args.kd_scale * result.d0;
    } else if constexpr (kDivergence == kReverseKL) {
        result.d0 = k.w / k.sum_a - result.log_sum_a + result.log_sum_b;
        result.loss = args.kd_scale * result.d0;
    } else if constexpr (kDivergence == kJSD) {
        normalized_sweep<kJSD>(r, args, num_cols, k, result);
        result.loss = args.kd_scale * (args.beta * result.d0 + args.one_minus_beta * result.d1);
    } else if constexpr (kDivergence == kCosine) {
        result.d0 = k.s_ab / std::sqrt(k.s_aa * k.s_bb);
        result.loss = args.kd_scale * (1.0f - result.d0);
    } else if constexpr (kDivergence == kTVD) {
        result.loss = args.kd_scale * normalized_sweep<kTVD>(r, args, num_cols, k, result);
    } else {  // α·KL(b_t‖b_s) + β·KL(p̂_t‖p̂_s), b = [p_gt, 1 − p_gt]
        static_assert(kDivergence == kDKD, "kd_result: a divergence without its result");
        result.d0 = k.w / k.sum_b - result.log_sum_b + result.log_sum_a;  // NCKD
        // target logit minus the non-target log-sum-exp, at T
        const float inv_t = args.inv_temperature;
        const float gap_s = target_logit(r, r.student, args.student.dtype) * inv_t - (k.m_a + result.log_sum_a);
        const float gap_t = target_logit(r, r.teacher, args.teacher.dtype) * inv_t - (k.m_b + result.log_sum_b);
        const float log_p_s = -softplus(-gap_s), log_q_s = -softplus(gap_s);
        const float log_p_t = -softplus(-gap_t), log_q_t = -softplus(gap_t);
        const float p_t = std::exp(log_p_t), q_t = std::exp(log_q_t);
        const float tckd = (p_t == 0 ? 0.0f : p_t * (log_p_t - log_p_s)) +
                           (q_t == 0 ? 0.0f : q_t * (log_q_t - log_q_s));
        result.d1 = p_t - std::exp(log_p_s);  // the backward's TCKD term
        result.loss = args.kd_scale * (args.alpha * tckd + args.beta * result.d0);
    }
    return result;
}

// The fused forward's gradient sweep over the kept exponentials: p = e·exp(shift − max − log-sum) per block; writes
// ∂(grad_scale·row_loss)/∂s (and ∂/∂t with kTeacherGrad) for kl and reverse_kl with the CE term.
template <int kDivergence, bool kHasKD, bool kHasCE, bool kTeacherGrad>
[[gnu::always_inline]] inline void fused_gradient(const Row& r, const KDArgs& args, int64_t row, const KDSums& k,
                                                 const KDResult& kd, const T1Sums& u, float log_sum_1, bool bad_row,
                                                 vi label, const FusedScratch& scratch) {
    const int s_dtype = args.student.dtype, t_dtype = args.teacher.dtype;
    const float inv_t = args.inv_temperature;
    void* grad_s_row = gradient_row(args.fused_grad_student, s_dtype, row, args.num_cols);
    void* grad_t_row = kTeacherGrad ? gradient_row(args.fused_grad_teacher, t_dtype, row, args.num_cols) : nullptr;
    if (!r.counted) return store_zero_gradients<kTeacherGrad>(args, grad_s_row, grad_t_row);
    const float nan_or_one = bad_row ? __builtin_nanf("") : 1.0f;
    const float kd_factor = nan_or_one * args.grad_scale * args.kd_scale * inv_t;  // ∂/∂s = (1/T)·∂/∂a
    const float ce_factor = nan_or_one * args.grad_scale * args.ce_weight;
    // loop invariants in locals (the stores below could alias anything reached through a reference)
    const int64_t num_cols = args.num_cols;
    const void *student = r.student, *teacher = r.teacher;
    const float *const e_a = scratch.e_a, *const e_b = scratch.e_b, *const e_1 = scratch.e_1;
    const float m_a = k.m_a, m_b = k.m_b, m_1 = u.m_1, log_sum_a = kd.log_sum_a, log_sum_b = kd.log_sum_b;
    const float d0 = kd.d0;
    for (int64_t start = 0; start < num_cols; start += kBlock) {
        const int64_t end = min_(start + kBlock, num_cols);
        const float* shift = scratch.shifts + 3 * (start / kBlock);
        const float c_a = std::exp((shift[0] - m_a) - log_sum_a);
        const float c_b = std::exp((shift[1] - m_b) - log_sum_b);
        const float c_1 = std::exp((shift[2] - m_1) - log_sum_1);
        for (int64_t c = start; c < end; c += kLanes) {
            const int n = static_cast<int>(min_(kLanes, end - c));
            vf grad_s = splat(0.0f), grad_t = splat(0.0f);
            if (kHasKD) {
                const vf p_s = vload(e_a + c) * c_a, p_t = vload(e_b + c) * c_b;
                const bool need_log_p = kDivergence == kReverseKL || kTeacherGrad;
                vf log_ratio = splat(0.0f);  // log p_s − log p_t, from the logits (still in cache)
                if (need_log_p) {
                    log_ratio = ((load_lanes(student, s_dtype, c, n, -kInf) * inv_t - m_a) - log_sum_a) -
                                ((load_lanes(teacher, t_dtype, c, n, -kInf) * inv_t - m_b) - log_sum_b);
                }
                if (kDivergence == kKL) {
                    grad_s = kd_factor * (p_s - p_t);
                    if (kTeacherGrad) grad_t = kd_factor * weighted(p_t, -log_ratio - d0);
                } else {
                    grad_s = kd_factor * weighted(p_s, log_ratio - d0);
                    if (kTeacherGrad) grad_t = kd_factor * (p_t - p_s);
                }
            }
            if (kHasCE) {
                const vf one_hot = column_indices(c) == label ? splat(1.0f) : splat(0.0f);
                grad_s += ce_factor * (vload(e_1 + c) * c_1 - one_hot);
            }
            store_lanes(grad_s_row, s_dtype, c, n, grad_s);
            if (kTeacherGrad) store_lanes(grad_t_row, t_dtype, c, n, grad_t);
        }
    }
}

// One row of the forward: one sweep in blocks of kBlock columns folding the sums at T (KD) and at T = 1 (CE,
// metrics), then the row loss, its statistics (Stat slots) and metrics (Metric slots). kFused (kl and
// reverse_kl): the sweep also keeps each exponential, and fused_gradient writes the gradient from them (no
// exponential recomputed). kMetrics: the fidelity metrics at T = 1.
template <int kDivergence, bool kHasKD, bool kHasCE, bool kFused, bool kTeacherGrad, bool kMetrics>
void forward_row(const KDArgs& args, int64_t row) {
    const Row r = row_state(args, row);
    const int64_t num_cols = r.counted ? args.num_cols : 0;  // ignored rows skip the sweep
    const FusedScratch scratch = kFused ? fused_scratch(num_cols) : FusedScratch{};
    const vi label = vi{} + static_cast<int32_t>(r.label_ok ? r.label : -1);
    KDSums k;
    T1Sums u;
    vi nan_seen = vi{};
    for (int64_t start = 0; start < num_cols; start += kBlock) {
        const int64_t end = min_(start + kBlock, num_cols);
        const BlockMaxima mx = block_maxima<kDivergence, kHasKD || kMetrics>(r, args, start, end, label, nan_seen);
        if (kHasKD) fold_kd_block<kDivergence, kFused>(k, r, args, start, end, mx, label, scratch);
        if (kHasCE || kMetrics) fold_t1_block<kMetrics, kFused && kHasCE>(u, r, args, start, end, mx, scratch);
    }

    bool nan_row = k.m_a == kInf || k.m_b == kInf || u.m_1 == kInf;
    for (int i = 0; i < kLanes; ++i) nan_row |= nan_seen[i] != 0;
    if (nan_row) k.m_a = k.m_b = u.m_1 = __builtin_nanf("");  // NaN statistics make the backward's gradient NaN too
    const float log_sum_1 = std::log(u.sum_1);
    const KDResult kd = kd_result<kDivergence, kHasKD>(k, r, args, num_cols);
    float loss = kd.loss;
    if (kHasCE) loss += args.ce_weight * ((u.m_1 - target_logit(r, r.student, args.student.dtype)) + log_sum_1);
    const bool bad_row = !r.label_ok || nan_row;
    args.loss[row] = !r.counted ? 0.0f : (bad_row ? __builtin_nanf("") : loss);
    float stats[kNumStats];
    stats[kStatMaxA] = k.m_a;
    stats[kStatLogSumA] = kd.log_sum_a;
    stats[kStatMaxB] = k.m_b;
    stats[kStatLogSumB] = kd.log_sum_b;
    stats[kStatD0] = kd.d0;
    stats[kStatD1] = kd.d1;
    stats[kStatMaxS] = u.m_1;
    stats[kStatLogSumS] = log_sum_1;
    for (int slot = 0; slot < kNumStats; ++slot) {
        args.stats[slot * args.num_rows + row] = r.counted ? stats[slot] : 0.0f;
    }
    if (kMetrics) {
        const float log_sum_t1 = std::log(u.sum_t1);
        float metrics[kNumMetrics];
        metrics[kMetricTop1Agreement] = u.argmax_s == u.argmax_t ? 1.0f : 0.0f;
        metrics[kMetricPredictiveKL] = u.w_1 / u.sum_t1 - log_sum_t1 + log_sum_1;
        metrics[kMetricTeacherEntropy] = log_sum_t1 - u.u_t / u.sum_t1;
        metrics[kMetricStudentEntropy] = log_sum_1 - u.u_s / u.sum_1;
        for (int slot = 0; slot < kNumMetrics; ++slot) {
            const float value = nan_row ? __builtin_nanf("") : metrics[slot];
            args.metrics[slot * args.num_rows + row] = r.counted ? value : 0.0f;
        }
    }
    if (kFused) {
        fused_gradient<kDivergence, kHasKD, kHasCE, kTeacherGrad>(r, args, row, k, kd, u, log_sum_1, bad_row, label,
                                                                  scratch);
    }
}

// One row of the backward: one sweep writing ∂s (and ∂t with kTeacherGrad), scaled by the row's incoming gradient.
template <int kDivergence, bool kHasKD, bool kHasCE, bool kTeacherGrad>
void backward_row(const KDArgs& args, int64_t row) {
    const Row r = row_state(args, row);
    const int64_t num_cols = args.num_cols;
    const int s_dtype = args.student.dtype, t_dtype = args.teacher.dtype;
    void* grad_s_row = gradient_row(args.grad_student, s_dtype, row, num_cols);
    void* grad_t_row = kTeacherGrad ? gradient_row(args.grad_teacher, t_dtype, row, num_cols) : nullptr;
    if (!r.counted) return store_zero_gradients<kTeacherGrad>(args, grad_s_row, grad_t_row);
    const auto stat = [&](Stat slot) { return args.stats[slot * args.num_rows + row]; };
    const float m_a = stat(kStatMaxA), log_sum_a = stat(kStatLogSumA), m_b = stat(kStatMaxB);
    const float log_sum_b = stat(kStatLogSumB), d0 = stat(kStatD0), d1 = stat(kStatD1);
    const float m_1 = stat(kStatMaxS), log_sum_1 = stat(kStatLogSumS);
    float grad_loss = args.grad_loss[row * args.grad_loss_stride];
    const bool nan_row = m_a != m_a || m_b != m_b || m_1 != m_1;  // marked by the forward
    if (!r.label_ok || nan_row) grad_loss = __builtin_nanf("");
    const float inv_t = args.inv_temperature;
    const float kd_factor = grad_loss * args.kd_scale * inv_t;  // d(loss)/d(s) = (1/T)·d(loss)/d(a)
    const float ce_factor = grad_loss * args.ce_weight;
    const vi label = vi{} + static_cast<int32_t>(r.label_ok ? r.label : -1);
    for (int64_t c = 0; c < num_cols; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, num_cols - c));
        prefetch(r.student, s_dtype, c + kPrefetch);
        if (kHasKD) prefetch(r.teacher, t_dtype, c + kPrefetch);
        const vf x_s = load_lanes(r.student, s_dtype, c, n, -kInf);
        vf grad_s = splat(0.0f), grad_t = splat(0.0f);
        if (kHasKD) {
            vf log_p_s = (x_s * inv_t - m_a) - log_sum_a;
            vf log_p_t = (load_lanes(r.teacher, t_dtype, c, n, -kInf) * inv_t - m_b) - log_sum_b;
            const vi target = column_indices(c) == label;
            if (kDivergence == kDKD) {  // p̂: 0 at the target
                log_p_s = target ? splat(-kInf) : log_p_s;
                log_p_t = target ? splat(-kInf) : log_p_t;
            }
            const vf p_s = vexp_nonpositive(log_p_s), p_t = vexp_nonpositive(log_p_t);
            if constexpr (kDivergence == kKL) {  // ∂KL(p_t‖p_s)/∂a = p_s − p_t, ∂/∂b = p_t (log p_t/p_s − KL)
                grad_s = kd_factor * (p_s - p_t);
                if (kTeacherGrad) grad_t = kd_factor * weighted(p_t, (log_p_t - log_p_s) - d0);
            } else if constexpr (kDivergence == kReverseKL) {  // ∂/∂a = p_s (log p_s/p_t − KL), ∂/∂b = p_t − p_s
                grad_s = kd_factor * weighted(p_s, (log_p_s - log_p_t) - d0);
                if (kTeacherGrad) grad_t = kd_factor * (p_t - p_s);
            } else if constexpr (kDivergence == kJSD) {  // ∂/∂a = (1−β) p_s (log p_s/m − KL(p_s‖m)), likewise t
                const JSDRatios ratio = jsd_log_ratios(args, log_p_s, log_p_t);
                grad_s = (kd_factor * args.one_minus_beta) * weighted(p_s, ratio.student - d1);
                if (kTeacherGrad) grad_t = (kd_factor * args.beta) * weighted(p_t, ratio.teacher - d0);
            } else if constexpr (kDivergence == kCosine) {  // p is p/‖p‖: ∂(1 − cos)/∂a = −p_s (p_t − cos·p_s)
                grad_s = -kd_factor * (p_s * (p_t - d0 * p_s));
                if (kTeacherGrad) grad_t = -kd_factor * (p_t * (p_s - d0 * p_t));
            } else if constexpr (kDivergence == kTVD) {  // ∂/∂a = ½ p_s (σ − Σ p_s σ), ∂/∂b = ½ p_t (Σ p_t σ − σ)
                const vf sign = sign_of_difference(p_s, p_t);
                grad_s = (0.5f * kd_factor) * (p_s * (sign - d0));
                if (kTeacherGrad) grad_t = (0.5f * kd_factor) * (p_t * (d1 - sign));
            } else {  // student only; d1 = p_t,gt − p_s,gt
                static_assert(kDivergence == kDKD, "backward_row: a divergence without its gradient");
                const vf non_target = args.beta * (p_s - p_t) + args.alpha * d1 * p_s;
                grad_s = kd_factor * (target ? splat(-args.alpha * d1) : non_target);
            }
        }
        if (kHasCE) {  // ∂CE/∂s = softmax(s) − onehot(label)
            const vf q = vexp_nonpositive((x_s - m_1) - log_sum_1);
            grad_s += ce_factor * (q - (column_indices(c) == label ? splat(1.0f) : splat(0.0f)));
        }
        store_lanes(grad_s_row, s_dtype, c, n, grad_s);
        if (kTeacherGrad) store_lanes(grad_t_row, t_dtype, c, n, grad_t);
    }
}

template <typename Args, typename RowFn>
void for_each_row(const Args& args, RowFn row_fn) {
#pragma omp parallel num_threads(args.num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t row = 0; row < args.num_rows; ++row) row_fn(args, row);
        store_fence();
    }
}

void scale_row(const ScaleRowsArgs& args, int64_t row) {
    const float factor = args.factors[row * args.factor_stride];
    if (factor == 1.0f) return;
    void* data = gradient_row(args.rows, args.dtype, row, args.num_cols);
    for (int64_t c = 0; c < args.num_cols; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, args.num_cols - c));
        store_lanes(data, args.dtype, c, n, load_lanes(data, args.dtype, c, n, 0.0f) * factor);
    }
}

// The modes from the run-time options (static_switch.h): a row function instantiated for each.
void forward(const KDArgs& args) {
    divergence_switch(args.divergence, [&](auto divergence) {
        constexpr int kDivergence = decltype(divergence)::value;
        bool_switch(args.kd_scale != 0, [&](auto has_kd) {
            bool_switch(args.ce_weight != 0, [&](auto has_ce) {
                bool_switch(args.fused_grad_student != nullptr, [&](auto wants_fused) {
                    // the fused gradient covers kl and reverse_kl; the teacher's only with it
                    constexpr bool kFused = decltype(wants_fused)::value && (kDivergence == kKL ||
                                                                             kDivergence == kReverseKL);
                    bool_switch(kFused && args.fused_grad_teacher != nullptr, [&](auto teacher_grad) {
                        bool_switch(args.metrics != nullptr, [&](auto metrics) {
                            for_each_row(args, forward_row<kDivergence, decltype(has_kd)::value,
                                                           decltype(has_ce)::value, kFused,
                                                           kFused && decltype(teacher_grad)::value,
                                                           decltype(metrics)::value>);
                        });
                    });
                });
            });
        });
    });
}

void backward(const KDArgs& args) {
    divergence_switch(args.divergence, [&](auto divergence) {
        bool_switch(args.kd_scale != 0, [&](auto has_kd) {
            bool_switch(args.ce_weight != 0, [&](auto has_ce) {
                bool_switch(args.grad_teacher != nullptr, [&](auto teacher_grad) {
                    for_each_row(args, backward_row<decltype(divergence)::value, decltype(has_kd)::value,
                                                    decltype(has_ce)::value, decltype(teacher_grad)::value>);
                });
            });
        });
    });
}

void scale_rows(const ScaleRowsArgs& args) { for_each_row(args, scale_row); }

}  // namespace
}  // namespace FASTKD_ISA
}  // namespace fastkd
