// The per-row math of the CUDA kd_loss kernels (kd_cuda.cu), as functions that compile for the device and for the
// host, so that the CPU test-suite runs the very arithmetic and work split of the GPU kernels
// (tests/test_kd_cuda.py compiles tests/kd_cuda_row_harness.cpp against this header).
//
// The algorithm is that of the Triton kernels (kernels/kd.py), divergences "kl" and "reverse_kl" with the
// hard-label CE term. With a = s/T, b = t/T, each thread of a row's block folds chunks of the row into an
// OnlineRow (running maxima, sums of exponentials re-centred on them, and w = Σ e_p·[(x_p − m_p) − (x_q − m_q)]
// where p is the distribution the KL averages over); the block then merges its threads' states in a fixed tree,
// and finish() turns the merged state into the row loss and the NUM_STATS statistics of kernel_args.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "kd_args.h"

#ifdef __CUDACC__
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
#endif

namespace fastkd {
namespace cuda_row {

constexpr float kInf = INFINITY;
constexpr int kUnroll = 4;       // vectors of each tensor in flight per thread
constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;

// The block size (threads per row; one row per block) for rows of num_cols entries read VEC at a time: enough
// threads that each folds about four chunks, between one warp and kMaxThreads (not tuned on a GPU yet).
FASTKD_HD int threads_per_row(int64_t num_cols, int vec) {
    const int64_t per_thread = static_cast<int64_t>(vec) * kUnroll * 4;
    int threads = kWarp;
    while (threads < kMaxThreads && threads * per_thread < num_cols) threads *= 2;
    return threads;
}

// A running max that may still be −inf (nothing finite seen yet), as a safe shift for exp.
FASTKD_HD float finite_or_zero(float m) { return m == -kInf ? 0.0f : m; }

// p·x, 0 where p = 0 (0·log 0 = 0, never 0·inf); NaN where p is NaN.
FASTKD_HD float weighted(float p, float x) { return p == 0.0f ? 0.0f : p * x; }

// A running Σ e·[bracket] after its exponentials are rescaled by `scale` and each bracket moves by −delta.
FASTKD_HD float recentred(float w, float scale, float delta, float total) {
    return scale == 0.0f ? 0.0f : scale * (w - delta * total);
}

// The chunks of a row (num_cols entries) that thread `tid` of `threads` folds: chunk c starts at
// chunk_start(c, tid, threads) and holds VEC·UNROLL entries, VEC consecutive ones per vector u at
// start + u·threads·VEC (so each of the UNROLL loads of a warp is one coalesced sweep).
template <int VEC, int UNROLL>
FASTKD_HD int64_t chunk_start(int64_t chunk, int tid, int threads) {
    return (chunk * UNROLL * threads + tid) * VEC;
}

template <int VEC>
FASTKD_HD int64_t vector_offset(int u, int threads) {
    return static_cast<int64_t>(u) * threads * VEC;
}

struct Options {
    float inv_temperature;
    bool reverse;  // KL(p_s‖p_t) instead of KL(p_t‖p_s)
    bool has_kd, has_ce;
};

struct OnlineRow {  // trivially constructible: it also lives in shared memory
    float m_a, s_a, m_b, s_b, w;  // the KL at T
    float m_1, s_1;               // log-sum-exp of s at T = 1 (CE)
};

// The state of no entries.
FASTKD_HD OnlineRow empty_row() { return OnlineRow{-kInf, 0.0f, -kInf, 0.0f, 0.0f, -kInf, 0.0f}; }

// Folds N entries (student s, teacher t; −inf for entries past the row's end) into the state.
template <int N>
FASTKD_HD void fold(OnlineRow& row, const float (&s)[N], const float (&t)[N], const Options& o) {
    if (o.has_kd) {
        float a[N], b[N];
        float top_a = -kInf, top_b = -kInf;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            a[i] = s[i] * o.inv_temperature;
            b[i] = t[i] * o.inv_temperature;
            top_a = fmaxf(top_a, a[i]);
            top_b = fmaxf(top_b, b[i]);
        }
        const float new_m_a = fmaxf(row.m_a, top_a), new_m_b = fmaxf(row.m_b, top_b);
        const float shift_a = finite_or_zero(new_m_a), shift_b = finite_or_zero(new_m_b);
        const float scale_a = expf(row.m_a - shift_a), scale_b = expf(row.m_b - shift_b);
        const float delta = (shift_b - finite_or_zero(row.m_b)) - (shift_a - finite_or_zero(row.m_a));
        float w = o.reverse ? recentred(row.w, scale_a, -delta, row.s_a) : recentred(row.w, scale_b, delta, row.s_b);
        float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const float e_a = expf(a[i] - shift_a), e_b = expf(b[i] - shift_b);
            const float bracket = (b[i] - shift_b) - (a[i] - shift_a);
            w += o.reverse ? weighted(e_a, -bracket) : weighted(e_b, bracket);
            sum_a += e_a;
            sum_b += e_b;
        }
        row.w = w;
        row.s_a = row.s_a * scale_a + sum_a;
        row.s_b = row.s_b * scale_b + sum_b;
        row.m_a = new_m_a;
        row.m_b = new_m_b;
    }
    if (o.has_ce) {
        float top = -kInf;
#pragma unroll
        for (int i = 0; i < N; ++i) top = fmaxf(top, s[i]);
        const float new_m = fmaxf(row.m_1, top), shift = finite_or_zero(new_m);
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < N; ++i) sum += expf(s[i] - shift);
        row.s_1 = row.s_1 * expf(row.m_1 - shift) + sum;
        row.m_1 = new_m;
    }
}

// The state of the union of the entries folded into x and into y.
FASTKD_HD OnlineRow merge(const OnlineRow& x, const OnlineRow& y, const Options& o) {
    OnlineRow r;
    const float m_a = fmaxf(x.m_a, y.m_a), m_b = fmaxf(x.m_b, y.m_b), m_1 = fmaxf(x.m_1, y.m_1);
    const float shift_a = finite_or_zero(m_a), shift_b = finite_or_zero(m_b), shift_1 = finite_or_zero(m_1);
    const float xa = expf(x.m_a - shift_a), ya = expf(y.m_a - shift_a);
    const float xb = expf(x.m_b - shift_b), yb = expf(y.m_b - shift_b);
    const float dx = (shift_b - finite_or_zero(x.m_b)) - (shift_a - finite_or_zero(x.m_a));
    const float dy = (shift_b - finite_or_zero(y.m_b)) - (shift_a - finite_or_zero(y.m_a));
    r.w = o.reverse ? recentred(x.w, xa, -dx, x.s_a) + recentred(y.w, ya, -dy, y.s_a)
                    : recentred(x.w, xb, dx, x.s_b) + recentred(y.w, yb, dy, y.s_b);
    r.m_a = m_a;
    r.m_b = m_b;
    r.s_a = x.s_a * xa + y.s_a * ya;
    r.s_b = x.s_b * xb + y.s_b * yb;
    r.m_1 = m_1;
    r.s_1 = x.s_1 * expf(x.m_1 - shift_1) + y.s_1 * expf(y.m_1 - shift_1);
    return r;
}

// A row's label state: ignored rows (label == ignore_index) are not counted; a counted row whose label is outside
// [0, V) is not ok (its loss and gradient become NaN).
struct Label {
    int64_t index;
    bool counted, ok;
};

FASTKD_HD Label row_label(const int64_t* labels, int64_t row, int64_t num_cols, int64_t ignore_index) {
    if (labels == nullptr) return Label{0, true, true};
    const int64_t label = labels[row];
    return Label{label, label != ignore_index, label >= 0 && label < num_cols};
}

// The row loss and its statistics (the Stat slots of kd_args.h: d0 the KL, d1 0; zeros at an ignored row).
// target_logit: s at the label (read by the caller where the label is ok).
FASTKD_HD float finish(const OnlineRow& r, const Label& label, float target_logit, float kd_scale, float ce_weight,
                       const Options& o, float (&stats)[kNumStats]) {
    const float log_s_a = logf(r.s_a), log_s_b = logf(r.s_b), log_s_1 = logf(r.s_1);
    float kl = 0.0f, loss = 0.0f;
    if (o.has_kd) {
        kl = o.reverse ? r.w / r.s_a - log_s_a + log_s_b : r.w / r.s_b - log_s_b + log_s_a;
        loss = kd_scale * kl;
    }
    if (o.has_ce) loss += ce_weight * ((r.m_1 - target_logit) + log_s_1);
    stats[kStatMaxA] = r.m_a;
    stats[kStatLogSumA] = log_s_a;
    stats[kStatMaxB] = r.m_b;
    stats[kStatLogSumB] = log_s_b;
    stats[kStatD0] = kl;
    stats[kStatD1] = 0.0f;
    stats[kStatMaxS] = r.m_1;
    stats[kStatLogSumS] = log_s_1;
#pragma unroll
    for (int slot = 0; slot < kNumStats; ++slot) stats[slot] = label.counted ? stats[slot] : 0.0f;
    if (!label.counted) return 0.0f;
    return label.ok ? loss : NAN;
}

// What the backward needs per row: the statistics and the factors of the incoming gradient.
struct RowGradient {
    float m_a, log_s_a, m_b, log_s_b, kl, m_1, log_s_1;
    float kd_factor, ce_factor;  // grad_loss·kd_scale/T and grad_loss·ce_weight; 0 at an ignored row, NaN if bad
};

FASTKD_HD RowGradient row_gradient(const float* stats, int64_t row, int64_t num_rows, float grad_loss,
                                   const Label& label, float kd_scale, float ce_weight, const Options& o) {
    const float g = !label.counted ? 0.0f : (label.ok ? grad_loss : NAN);
    const float* column = stats + row;
    return RowGradient{column[kStatMaxA * num_rows], column[kStatLogSumA * num_rows], column[kStatMaxB * num_rows],
                       column[kStatLogSumB * num_rows], column[kStatD0 * num_rows], column[kStatMaxS * num_rows],
                       column[kStatLogSumS * num_rows], g * kd_scale * o.inv_temperature, g * ce_weight};
}

// ∂(grad_loss·row_loss)/∂s and /∂t at one entry (is_label: the entry is the row's label).
FASTKD_HD void gradient(float s, float t, bool is_label, const RowGradient& g, const Options& o, float& grad_s,
                        float& grad_t) {
    grad_s = 0.0f;
    grad_t = 0.0f;
    if (o.has_kd) {
        const float log_p_s = (s * o.inv_temperature - g.m_a) - g.log_s_a;
        const float log_p_t = (t * o.inv_temperature - g.m_b) - g.log_s_b;
        const float p_s = expf(log_p_s), p_t = expf(log_p_t);
        if (o.reverse) {  // ∂KL(p_s‖p_t)/∂a = p_s (log p_s/p_t − KL), ∂/∂b = p_t − p_s
            grad_s = g.kd_factor * weighted(p_s, (log_p_s - log_p_t) - g.kl);
            grad_t = g.kd_factor * (p_t - p_s);
        } else {  // ∂KL(p_t‖p_s)/∂a = p_s − p_t, ∂/∂b = p_t (log p_t/p_s − KL)
            grad_s = g.kd_factor * (p_s - p_t);
            grad_t = g.kd_factor * weighted(p_t, (log_p_t - log_p_s) - g.kl);
        }
    }
    if (o.has_ce) grad_s += g.ce_factor * (expf((s - g.m_1) - g.log_s_1) - (is_label ? 1.0f : 0.0f));
}

}  // namespace cuda_row
}  // namespace fastkd
