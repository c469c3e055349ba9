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

// kFused (kl and reverse_kl): the first sweep also keeps each exponential, and a second sweep over those (no
// exponential recomputed) writes the gradient of grad_scale·row_loss. kMetrics: the fidelity metrics at T = 1.
template <int kDivergence, bool kHasKD, bool kHasCE, bool kFused, bool kTeacherGrad, bool kMetrics>
void forward_row(const KDArgs& args, int64_t row) {
    const Row r = row_state(args, row);
    const int64_t num_cols = r.counted ? args.num_cols : 0;  // ignored rows skip the sweep
    const int s_dtype = args.student.dtype, t_dtype = args.teacher.dtype;
    const float inv_t = args.inv_temperature;
    float* e_a = nullptr;  // e_a, e_b, e_1: the exponentials; shifts: 3 per block
    float *e_b = nullptr, *e_1 = nullptr, *shifts = nullptr;
    if (kFused) {
        const int64_t padded = (num_cols + kLanes - 1) / kLanes * kLanes;
        const size_t need = static_cast<size_t>(3 * padded + 3 * (num_cols / kBlock + 1));
        if (t_scratch.size() < need) t_scratch.resize(need);
        e_a = t_scratch.data();
        e_b = e_a + padded;
        e_1 = e_b + padded;
        shifts = e_1 + padded;
    }
    const vi label = vi{} + static_cast<int32_t>(r.label_ok ? r.label : -1);
    float m_a = -kInf, m_b = -kInf, m_1 = -kInf, sum_a = 0, sum_b = 0, sum_1 = 0, w = 0;
    float s_ab = 0, s_aa = 0, s_bb = 0;  // cosine: ⟨e_a, e_b⟩, ‖e_a‖², ‖e_b‖² (the normalisers cancel)
    // metrics at T = 1: teacher max and sum, KL(p_t‖p_s) bracket sum, Σ e·(x − m) of each, first argmaxes
    float m_t1 = -kInf, sum_t1 = 0, w_1 = 0, u_s = 0, u_t = 0, best_s = -kInf, best_t = -kInf;
    int64_t argmax_s = 0, argmax_t = 0;
    vi nan_seen = vi{};  // the exponentials below drop NaN, so a row with NaN (or +inf) is marked as a whole
    for (int64_t start = 0; start < num_cols; start += kBlock) {
        const int64_t end = min_(start + kBlock, num_cols);
        vf max_s = splat(-kInf), max_t = splat(-kInf), max_rest_s = splat(-kInf), max_rest_t = splat(-kInf);
        for (int64_t c = start; c < end; c += kLanes) {
            const int n = static_cast<int>(min_(kLanes, end - c));
            const vf x_s = load_lanes(r.student, s_dtype, c, n, -kInf);
            max_s = vmax(x_s, max_s);
            nan_seen |= x_s != x_s;
            if (kHasKD || kMetrics) {
                const vf x_t = load_lanes(r.teacher, t_dtype, c, n, -kInf);
                max_t = vmax(x_t, max_t);
                nan_seen |= x_t != x_t;
                if (kDivergence == kDKD) {  // the non-target maxima
                    const vi target = column_indices(c) == label;
                    max_rest_s = vmax(target ? splat(-kInf) : x_s, max_rest_s);
                    max_rest_t = vmax(target ? splat(-kInf) : x_t, max_rest_t);
                }
            }
        }
        const float block_max_s = hmax(max_s);
        const float block_max_t = hmax(max_t);
        const float kd_max_s = kDivergence == kDKD ? hmax(max_rest_s) : block_max_s;
        const float kd_max_t = kDivergence == kDKD ? hmax(max_rest_t) : block_max_t;
        if (kMetrics) {
            if (block_max_s > best_s) {
                best_s = block_max_s;
                argmax_s = first_index_of(r.student, s_dtype, start, end, block_max_s);
            }
            if (block_max_t > best_t) {
                best_t = block_max_t;
                argmax_t = first_index_of(r.teacher, t_dtype, start, end, block_max_t);
            }
        }
        if (kHasKD) {
            const float new_m_a = fmax_(m_a, kd_max_s * inv_t), new_m_b = fmax_(m_b, kd_max_t * inv_t);
            const float shift_a = finite_or_zero(new_m_a), shift_b = finite_or_zero(new_m_b);
            vf acc_a = splat(0.0f), acc_b = splat(0.0f), acc_w = splat(0.0f);
            vf acc_ab = splat(0.0f), acc_aa = splat(0.0f), acc_bb = splat(0.0f);
            for (int64_t c = start; c < end; c += kLanes) {
                const int n = static_cast<int>(min_(kLanes, end - c));
                prefetch(r.student, s_dtype, c + kPrefetch);
                prefetch(r.teacher, t_dtype, c + kPrefetch);
                vf a = load_lanes(r.student, s_dtype, c, n, -kInf) * inv_t - shift_a;
                vf b = load_lanes(r.teacher, t_dtype, c, n, -kInf) * inv_t - shift_b;
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
            const float scale_a = std::exp(m_a - shift_a), scale_b = std::exp(m_b - shift_b);
            if (kDivergence == kCosine) {
                s_ab = s_ab * (scale_a * scale_b) + hsum(acc_ab);
                s_aa = s_aa * (scale_a * scale_a) + hsum(acc_aa);
                s_bb = s_bb * (scale_b * scale_b) + hsum(acc_bb);
            }
            if (kDivergence == kKL || kDivergence == kReverseKL || kDivergence == kDKD) {  // re-centre w
                const float delta = (shift_b - finite_or_zero(m_b)) - (shift_a - finite_or_zero(m_a));
                w = kDivergence == kReverseKL ? recentred(w, scale_a, -delta, sum_a) + hsum(acc_w)
                                              : recentred(w, scale_b, delta, sum_b) + hsum(acc_w);
            }
            sum_a = sum_a * scale_a + hsum(acc_a);
            sum_b = sum_b * scale_b + hsum(acc_b);
            m_a = new_m_a;
            m_b = new_m_b;
            if (kFused) {
                shifts[3 * (start / kBlock)] = shift_a;
                shifts[3 * (start / kBlock) + 1] = shift_b;
            }
        }
        if (kHasCE || kMetrics) {
            const float new_m_1 = fmax_(m_1, block_max_s), shift_1 = finite_or_zero(new_m_1);
            const float new_m_t1 = fmax_(m_t1, block_max_t), shift_t1 = finite_or_zero(new_m_t1);
            vf acc_1 = splat(0.0f), acc_t1 = splat(0.0f), acc_w1 = splat(0.0f), acc_us = splat(0.0f);
            vf acc_ut = splat(0.0f);
            for (int64_t c = start; c < end; c += kLanes) {
                const int n = static_cast<int>(min_(kLanes, end - c));
                const vf x_1 = load_lanes(r.student, s_dtype, c, n, -kInf) - shift_1;
                const vf exp_1 = vexp_nonpositive(x_1);
                acc_1 += exp_1;
                if (kFused && kHasCE) vstore(e_1 + c, exp_1);
                if (kMetrics) {
                    const vf x_t1 = load_lanes(r.teacher, t_dtype, c, n, -kInf) - shift_t1;
                    const vf exp_t1 = vexp_nonpositive(x_t1);
                    acc_t1 += exp_t1;
                    acc_w1 += weighted(exp_t1, x_t1 - x_1);
                    acc_us += weighted(exp_1, x_1);
                    acc_ut += weighted(exp_t1, x_t1);
                }
            }
            const float scale_1 = std::exp(m_1 - shift_1);
            if (kMetrics) {
                const float scale_t1 = std::exp(m_t1 - shift_t1);
                const float moved_1 = shift_1 - finite_or_zero(m_1), moved_t1 = shift_t1 - finite_or_zero(m_t1);
                w_1 = recentred(w_1, scale_t1, moved_t1 - moved_1, sum_t1) + hsum(acc_w1);
                u_s = recentred(u_s, scale_1, moved_1, sum_1) + hsum(acc_us);
                u_t = recentred(u_t, scale_t1, moved_t1, sum_t1) + hsum(acc_ut);
                sum_t1 = sum_t1 * scale_t1 + hsum(acc_t1);
                m_t1 = new_m_t1;
            }
            sum_1 = sum_1 * scale_1 + hsum(acc_1);
            m_1 = new_m_1;
            if (kFused) shifts[3 * (start / kBlock) + 2] = shift_1;
        }
    }

    bool nan_row = m_a == kInf || m_b == kInf || m_1 == kInf;
    for (int i = 0; i < kLanes; ++i) nan_row |= nan_seen[i] != 0;
    if (nan_row) m_a = m_b = m_1 = __builtin_nanf("");  // NaN statistics make the backward's gradient NaN too
    // cosine: log ‖e‖₂ in place of the log-sums (the backward's "probabilities" are then p/‖p‖)
    const float log_sum_a = kDivergence == kCosine ? 0.5f * std::log(s_aa) : std::log(sum_a);
    const float log_sum_b = kDivergence == kCosine ? 0.5f * std::log(s_bb) : std::log(sum_b);
    const float log_sum_1 = std::log(sum_1);
    float d0 = 0, d1 = 0, loss = 0;
    if (kHasKD) {
        if (kDivergence == kCosine) {
            d0 = s_ab / std::sqrt(s_aa * s_bb);
            loss = args.kd_scale * (1.0f - d0);
        } else if (kDivergence == kDKD) {  // α·KL(b_t‖b_s) + β·KL(p̂_t‖p̂_s), b = [p_gt, 1 − p_gt]
            d0 = w / sum_b - log_sum_b + log_sum_a;  // NCKD
            // target logit minus the non-target log-sum-exp, at T
            const float gap_s = target_logit(r, r.student, s_dtype) * inv_t - (m_a + log_sum_a);
            const float gap_t = target_logit(r, r.teacher, t_dtype) * inv_t - (m_b + log_sum_b);
            const float log_p_s = -softplus(-gap_s), log_q_s = -softplus(gap_s);
            const float log_p_t = -softplus(-gap_t), log_q_t = -softplus(gap_t);
            const float p_t = std::exp(log_p_t), q_t = std::exp(log_q_t);
            const float tckd = (p_t == 0 ? 0.0f : p_t * (log_p_t - log_p_s)) +
                               (q_t == 0 ? 0.0f : q_t * (log_q_t - log_q_s));
            d1 = p_t - std::exp(log_p_s);  // the backward's TCKD term
            loss = args.kd_scale * (args.alpha * tckd + args.beta * d0);
        } else if (kDivergence == kKL) {
            d0 = w / sum_b - log_sum_b + log_sum_a;
            loss = args.kd_scale * d0;
        } else if (kDivergence == kReverseKL) {
            d0 = w / sum_a - log_sum_a + log_sum_b;
            loss = args.kd_scale * d0;
        } else {  // second sweep: m = β p_t + (1 − β) p_s needs both normalisers
            vf acc_0 = splat(0.0f), acc_1 = splat(0.0f);
            for (int64_t c = 0; c < num_cols; c += kLanes) {
                const int n = static_cast<int>(min_(kLanes, num_cols - c));
                const vf log_p_s = (load_lanes(r.student, s_dtype, c, n, -kInf) * inv_t - m_a) - log_sum_a;
                const vf log_p_t = (load_lanes(r.teacher, t_dtype, c, n, -kInf) * inv_t - m_b) - log_sum_b;
                const JSDRatios ratio = jsd_log_ratios(args, log_p_s, log_p_t);
                acc_0 += weighted(vexp_nonpositive(log_p_t), ratio.teacher);
                acc_1 += weighted(vexp_nonpositive(log_p_s), ratio.student);
            }
            d0 = hsum(acc_0);
            d1 = hsum(acc_1);
            loss = args.kd_scale * (args.beta * d0 + args.one_minus_beta * d1);
        }
    }
    if (kHasCE) {
        loss += args.ce_weight * ((m_1 - target_logit(r, r.student, s_dtype)) + log_sum_1);
    }
    if (!r.counted) loss = 0;
    if (r.counted && (!r.label_ok || nan_row)) loss = __builtin_nanf("");
    args.loss[row] = loss;
    const float stats[kNumStats] = {m_a, log_sum_a, m_b, log_sum_b, d0, d1, m_1, log_sum_1};
    for (int k = 0; k < kNumStats; ++k) args.stats[k * args.num_rows + row] = r.counted ? stats[k] : 0.0f;
    if (kMetrics) {
        const float log_sum_t1 = std::log(sum_t1);
        const float metrics[kNumMetrics] = {argmax_s == argmax_t ? 1.0f : 0.0f,
                                            w_1 / sum_t1 - log_sum_t1 + log_sum_1, log_sum_t1 - u_t / sum_t1,
                                            log_sum_1 - u_s / sum_1};
        for (int k = 0; k < kNumMetrics; ++k) {
            args.metrics[k * args.num_rows + row] = r.counted ? (nan_row ? __builtin_nanf("") : metrics[k]) : 0.0f;
        }
    }
    if (!kFused) return;

    // second sweep, over the kept exponentials: p = e·exp(shift − max − log-sum) per block
    void* grad_s_row = gradient_row(args.fused_grad_student, s_dtype, row, args.num_cols);
    void* grad_t_row = kTeacherGrad ? gradient_row(args.fused_grad_teacher, t_dtype, row, args.num_cols) : nullptr;
    if (!r.counted) return store_zero_gradients<kTeacherGrad>(args, grad_s_row, grad_t_row);
    const float nan_or_one = (!r.label_ok || nan_row) ? __builtin_nanf("") : 1.0f;
    const float kd_factor = nan_or_one * args.grad_scale * args.kd_scale * inv_t;  // ∂/∂s = (1/T)·∂/∂a
    const float ce_factor = nan_or_one * args.grad_scale * args.ce_weight;
    for (int64_t start = 0; start < num_cols; start += kBlock) {
        const int64_t end = min_(start + kBlock, num_cols);
        const float* shift = shifts + 3 * (start / kBlock);
        const float c_a = std::exp((shift[0] - m_a) - log_sum_a), c_b = std::exp((shift[1] - m_b) - log_sum_b);
        const float c_1 = std::exp((shift[2] - m_1) - log_sum_1);
        for (int64_t c = start; c < end; c += kLanes) {
            const int n = static_cast<int>(min_(kLanes, end - c));
            vf grad_s = splat(0.0f), grad_t = splat(0.0f);
            if (kHasKD) {
                const vf p_s = vload(e_a + c) * c_a, p_t = vload(e_b + c) * c_b;
                const bool need_log_p = kDivergence == kReverseKL || kTeacherGrad;
                vf log_ratio = splat(0.0f);  // log p_s − log p_t, from the logits (still in cache)
                if (need_log_p) {
                    log_ratio = ((load_lanes(r.student, s_dtype, c, n, -kInf) * inv_t - m_a) - log_sum_a) -
                                ((load_lanes(r.teacher, t_dtype, c, n, -kInf) * inv_t - m_b) - log_sum_b);
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
                grad_s += ce_factor * (vload(e_1 + c) * c_1 - (column_indices(c) == label ? splat(1.0f) : splat(0.0f)));
            }
            store_lanes(grad_s_row, s_dtype, c, n, grad_s);
            if (kTeacherGrad) store_lanes(grad_t_row, t_dtype, c, n, grad_t);
        }
    }
}

template <int kDivergence, bool kHasKD, bool kHasCE, bool kTeacherGrad>
void backward_row(const KDArgs& args, int64_t row) {
    const Row r = row_state(args, row);
    const int64_t num_cols = args.num_cols;
    const int s_dtype = args.student.dtype, t_dtype = args.teacher.dtype;
    void* grad_s_row = gradient_row(args.grad_student, s_dtype, row, num_cols);
    void* grad_t_row = kTeacherGrad ? gradient_row(args.grad_teacher, t_dtype, row, num_cols) : nullptr;
    if (!r.counted) return store_zero_gradients<kTeacherGrad>(args, grad_s_row, grad_t_row);
    const float* stats = args.stats + row;
    const int64_t ld = args.num_rows;
    const float m_a = stats[0], log_sum_a = stats[ld], m_b = stats[2 * ld], log_sum_b = stats[3 * ld];
    const float d0 = stats[4 * ld], d1 = stats[5 * ld], m_1 = stats[6 * ld], log_sum_1 = stats[7 * ld];
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
            if (kDivergence == kKL) {  // ∂KL(p_t‖p_s)/∂a = p_s − p_t, ∂/∂b = p_t (log p_t/p_s − KL)
                grad_s = kd_factor * (p_s - p_t);
                if (kTeacherGrad) grad_t = kd_factor * weighted(p_t, (log_p_t - log_p_s) - d0);
            } else if (kDivergence == kReverseKL) {  // ∂KL(p_s‖p_t)/∂a = p_s (log p_s/p_t − KL), ∂/∂b = p_t − p_s
                grad_s = kd_factor * weighted(p_s, (log_p_s - log_p_t) - d0);
                if (kTeacherGrad) grad_t = kd_factor * (p_t - p_s);
            } else if (kDivergence == kDKD) {  // student only; d1 = p_t,gt − p_s,gt
                const vf non_target = args.beta * (p_s - p_t) + args.alpha * d1 * p_s;
                grad_s = kd_factor * (target ? splat(-args.alpha * d1) : non_target);
            } else if (kDivergence == kCosine) {  // p is p/‖p‖ here: ∂(1 − cos)/∂a = −p_s (p_t − cos·p_s)
                grad_s = -kd_factor * (p_s * (p_t - d0 * p_s));
                if (kTeacherGrad) grad_t = -kd_factor * (p_t * (p_s - d0 * p_t));
            } else {  // ∂JSD/∂a = (1−β) p_s (log p_s/m − KL(p_s‖m)), ∂/∂b = β p_t (log p_t/m − KL(p_t‖m))
                const JSDRatios ratio = jsd_log_ratios(args, log_p_s, log_p_t);
                grad_s = (kd_factor * args.one_minus_beta) * weighted(p_s, ratio.student - d1);
                if (kTeacherGrad) grad_t = (kd_factor * args.beta) * weighted(p_t, ratio.teacher - d0);
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

// The template flags from the runtime options, one at a time.
template <int kDivergence, bool kHasKD, bool kHasCE, bool kFused, bool kTeacherGrad>
void forward_rows(const KDArgs& args) {
    if (args.metrics != nullptr) {
        for_each_row(args, forward_row<kDivergence, kHasKD, kHasCE, kFused, kTeacherGrad, true>);
    } else {
        for_each_row(args, forward_row<kDivergence, kHasKD, kHasCE, kFused, kTeacherGrad, false>);
    }
}

template <int kDivergence, bool kHasKD, bool kHasCE, bool kFused>
void forward_rows(const KDArgs& args) {
    if (kFused && args.fused_grad_teacher != nullptr) {
        return forward_rows<kDivergence, kHasKD, kHasCE, kFused, true>(args);
    }
    forward_rows<kDivergence, kHasKD, kHasCE, kFused, false>(args);
}

template <int kDivergence, bool kHasKD, bool kHasCE>
void forward_rows(const KDArgs& args) {
    constexpr bool kFusable = kDivergence == kKL || kDivergence == kReverseKL;
    if (args.fused_grad_student != nullptr) return forward_rows<kDivergence, kHasKD, kHasCE, kFusable>(args);
    forward_rows<kDivergence, kHasKD, kHasCE, false>(args);
}

template <int kDivergence, bool kHasKD, bool kHasCE, bool kTeacherGrad>
void backward_rows(const KDArgs& args) {
    for_each_row(args, backward_row<kDivergence, kHasKD, kHasCE, kTeacherGrad>);
}

template <int kDivergence, bool kHasKD, bool kHasCE>
void backward_rows(const KDArgs& args) {
    if (args.grad_teacher != nullptr) return backward_rows<kDivergence, kHasKD, kHasCE, true>(args);
    backward_rows<kDivergence, kHasKD, kHasCE, false>(args);
}

template <int kDivergence, template <int, bool, bool> class Rows>
void with_flags(const KDArgs& args) {
    const bool has_kd = args.kd_scale != 0, has_ce = args.ce_weight != 0;
    if (has_kd && has_ce) return Rows<kDivergence, true, true>::run(args);
    if (has_kd) return Rows<kDivergence, true, false>::run(args);
    if (has_ce) return Rows<kDivergence, false, true>::run(args);
    Rows<kDivergence, false, false>::run(args);
}

template <int kDivergence, bool kHasKD, bool kHasCE>
struct ForwardRows {
    static void run(const KDArgs& args) { forward_rows<kDivergence, kHasKD, kHasCE>(args); }
};

template <int kDivergence, bool kHasKD, bool kHasCE>
struct BackwardRows {
    static void run(const KDArgs& args) { backward_rows<kDivergence, kHasKD, kHasCE>(args); }
};

template <template <int, bool, bool> class Rows>
void with_divergence(const KDArgs& args) {
    switch (args.divergence) {
        case kKL: return with_flags<kKL, Rows>(args);
        case kReverseKL: return with_flags<kReverseKL, Rows>(args);
        case kJSD: return with_flags<kJSD, Rows>(args);
        case kCosine: return with_flags<kCosine, Rows>(args);
        default: return with_flags<kDKD, Rows>(args);
    }
}

void forward(const KDArgs& args) { with_divergence<ForwardRows>(args); }
void backward(const KDArgs& args) { with_divergence<BackwardRows>(args); }
void scale_rows(const ScaleRowsArgs& args) { for_each_row(args, scale_row); }

}  // namespace
}  // namespace FASTKD_ISA
}  // namespace fastkd
