// kd_loss against a sparse (TopK) teacher, the row kernels for one instruction set and its entry in the table of
// kd_cpu.h: included once by kd_cpu_<isa>.cpp, after kd_cpu_impl.h (whose helpers it shares), with FASTKD_ISA and
// FASTKD_VEC_BYTES defined. The algorithm of the Triton kernels kd_topk_forward_kernel / kd_topk_backward_kernel
// (kernels/kd.py), with the same statistics (the TopKStat slots), so either backend's forward can feed the other's
// backward; the specification is fastkd.reference.kd_topk_rows (and kd_topk_fidelity_rows for the metrics).
//
// A row's entries (slots whose index is not −1) are marked in a per-thread bitmap of the V columns, which also
// finds two equal indices. With a tail bucket ("bucket" or "spread", K < V) the forward sweeps the student row
// once in blocks of kBlock columns (maxima, then exponentials re-centred on them) over the rest alone, the entry
// columns masked by the bitmap, so the rest's log-sum-exp is exact (never 1 − Σ over the K); the full row's is
// then the rest's merged with the K entries'. Without a bucket it sweeps the whole row. The sums at T = 1 (CE,
// metrics) share the exponentials when T = 1, else take a second channel in the same sweep.
//
// The backward writes the gradient in one sweep, from one exponential per column on the rest: with a bucket
// p_s,j − p_tail·q_j = e_j·(exp(m_rest − max a − log Σ a) − p_tail/Σ_rest) with e_j = exp(a_j − m_rest) (both
// factors ≤ 1: nothing overflows however far the student's rest lies below the teacher's); with spread
// p_s,j − p_tail/(V − n); without a tail p_s,j. The few vectors that hold an entry column take p_s,k − p_t,k there
// (p_t from a per-thread dense scratch written at the entries).
//
// Each row is computed by one thread in a fixed order: the results do not depend on the thread count.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kd_cpu.h"
#include "kd_cpu_impl.h"
#include "kd_topk_cpu.h"
#include "simd.h"
#include "static_switch.h"

namespace fastkd {
namespace FASTKD_ISA {
namespace {

// ---- the entry marks ----

// A bitmap of the V columns, 1 at the row's entries: its bytes, 8 columns each, padded by 8 bytes. A bitmap rather
// than a bytemap: kLanes bytes widened to a mask vector compiled to byte-by-byte inserts (gcc 12, AVX-512), more
// than half of the forward's time with a bucket; a word of bits is one broadcast, and, compare.
inline int64_t bitmap_bytes(int64_t num_cols) { return (num_cols >> 3) + 8; }

inline bool marked(const uint8_t* bits, int64_t col) { return (bits[col >> 3] >> (col & 7)) & 1; }
inline void set_mark(uint8_t* bits, int64_t col, bool on) {
    const uint8_t bit = static_cast<uint8_t>(1u << (col & 7));
    bits[col >> 3] = on ? (bits[col >> 3] | bit) : (bits[col >> 3] & ~bit);
}

// The marks of columns c, ..., c + kLanes − 1 (c a multiple of kLanes), bit i for column c + i.
inline uint32_t lane_marks(const uint8_t* bits, int64_t c) {
    uint32_t word;
    std::memcpy(&word, bits + (c >> 3), sizeof word);
    return (word >> (c & 7)) & ((1u << kLanes) - 1);
}

inline vi marked_lanes(uint32_t marks) {
    vi lane_bits;
    for (int i = 0; i < kLanes; ++i) lane_bits[i] = 1 << i;
    return ((vi{} + static_cast<int32_t>(marks)) & lane_bits) != 0;
}

inline vi lanes_from(int n) {  // lanes n, n + 1, ... (past a row's end)
    vi lanes;
    for (int i = 0; i < kLanes; ++i) lanes[i] = i >= n ? -1 : 0;
    return lanes;
}

inline float weighted_one(float p, float x) { return p == 0 ? 0.0f : p * x; }

// n ≤ kLanes logits of a row from column c as float32 (−inf past n): simd.h's load_lanes, always inlined. Left to
// the compiler it was called out of line in the sweeps, which then kept every accumulator on the stack (twice the
// time of the forward without a bucket, measured with gcc 12 on AVX-512).
[[gnu::always_inline]] inline vf load_logits(const void* row, int dtype, int64_t c, int n) {
    if (dtype == kFloat32) {
        const float* p = static_cast<const float*>(row) + c;
        if (n == kLanes) return vload(p);
        float tmp[kLanes];
        for (int i = 0; i < kLanes; ++i) tmp[i] = i < n ? p[i] : -kInf;
        return vload(tmp);
    }
    const uint16_t* p = static_cast<const uint16_t*>(row) + c;
    vh h{};
    if (n == kLanes) {
        std::memcpy(&h, p, sizeof h);
    } else {
        for (int i = 0; i < n; ++i) h[i] = p[i];
    }
    const vf x = dtype == kBFloat16 ? bf16_to_f32(h) : f16_to_f32(h);
    return n == kLanes ? x : (lanes_from(n) ? splat(-kInf) : x);
}

// One logit of a row of `dtype` as float32.
inline float load_one(const void* row, int dtype, int64_t col) {
    if (dtype == kFloat32) return static_cast<const float*>(row)[col];
    vh h{};
    h[0] = static_cast<const uint16_t*>(row)[col];
    return (dtype == kBFloat16 ? bf16_to_f32(h) : f16_to_f32(h))[0];
}

// Per-thread scratch: the marks (a bitmap, all 0 between rows), the dense teacher probabilities of the
// backward (read only at marked columns), and the row's slots: the teacher's values (−inf at an empty slot), the
// student's logits at their columns (−inf at an empty or out-of-range slot) and the columns (−1 there).
struct TopKScratch {
    std::vector<uint8_t> marks;
    std::vector<float> dense;
    std::vector<float> values, logits, log_p;
    std::vector<int64_t> cols;
};

thread_local TopKScratch t_topk;

// A row of the sparse teacher: labels, the slots read into the scratch, the entry columns marked.
struct TopKRow {
    const void* student = nullptr;
    bool counted = true, label_ok = true;
    int64_t label = 0;
    int64_t entries = 0;     // n: slots holding an entry (index ≠ −1)
    bool valid = true;       // every entry in [0, V), no two equal, no value NaN or +inf
    int64_t padded = 0;      // the slot arrays' length, a multiple of kLanes
    const float* values = nullptr;
    const float* logits = nullptr;
    float* log_p = nullptr;  // room for the teacher's log-probabilities over the slots
    const int64_t* cols = nullptr;
    const uint8_t* marks = nullptr;
};

// Reads row `row`'s labels and slots; a counted row's entries are marked in the scratch (clear_marks undoes it).
inline TopKRow topk_row(const TopKArgs& a, int64_t row, TopKScratch& s) {
    TopKRow r;
    r.student = row_pointer(a.student, row);
    if (a.labels != nullptr) {
        r.label = a.labels[row];
        r.counted = r.label != a.ignore_index;
        r.label_ok = r.label >= 0 && r.label < a.num_cols;
    }
    if (!r.counted) return r;
    const int64_t num_slots = a.num_slots, num_cols = a.num_cols;
    r.padded = (num_slots + kLanes - 1) / kLanes * kLanes;
    if (static_cast<int64_t>(s.values.size()) < r.padded) {
        s.values.resize(r.padded);
        s.logits.resize(r.padded);
        s.log_p.resize(r.padded);
        s.cols.resize(r.padded);
    }
    if (static_cast<int64_t>(s.marks.size()) < bitmap_bytes(num_cols)) s.marks.resize(bitmap_bytes(num_cols), 0);
    float* values = s.values.data();
    float* logits = s.logits.data();
    int64_t* cols = s.cols.data();
    uint8_t* marks = s.marks.data();
    const void* value_row = row_pointer(a.values, row);
    for (int64_t k = 0; k < r.padded; k += kLanes) {
        const int n = static_cast<int>(min_(kLanes, num_slots - k));
        vstore(values + k, load_lanes(value_row, a.values.dtype, k, n, -kInf));
    }
    const int64_t index_offset = row * a.indices_row_stride;
    const int32_t* indices_32 = static_cast<const int32_t*>(a.indices) + index_offset;
    const int64_t* indices_64 = static_cast<const int64_t*>(a.indices) + index_offset;
    const int s_dtype = a.student.dtype;
    for (int64_t k = 0; k < r.padded; ++k) {
        const int64_t index = k >= num_slots ? kEmptySlot : (a.indices_int32 ? indices_32[k] : indices_64[k]);
        cols[k] = -1;
        logits[k] = -kInf;
        if (index == kEmptySlot) {
            values[k] = -kInf;
            continue;
        }
        ++r.entries;
        if (values[k] != values[k] || values[k] == kInf) r.valid = false;
        if (index < 0 || index >= num_cols) {
            r.valid = false;
            continue;
        }
        r.valid = r.valid && !marked(marks, index);  // two equal indices
        set_mark(marks, index, true);
        cols[k] = index;
        logits[k] = load_one(r.student, s_dtype, index);
    }
    r.values = values;
    r.logits = logits;
    r.log_p = s.log_p.data();
    r.cols = cols;
    r.marks = marks;
    return r;
}

inline void clear_marks(const TopKRow& r, TopKScratch& s) {
    for (int64_t k = 0; k < r.padded; ++k) {
        if (r.cols[k] >= 0) set_mark(s.marks.data(), r.cols[k], false);
    }
}

// Without a bucket, a row whose entries give no distribution (none, or all of weight 0) has no teacher: its KD
// term is 0 and has no gradient (fastkd.reference._topk_log_probs).
inline bool has_teacher(const TopKRow& r, bool bucket) {
    if (bucket) return true;
    vf top = splat(-kInf);
    for (int64_t k = 0; k < r.padded; k += kLanes) top = vmax(vload(r.values + k), top);
    return hmax(top) > -kInf;
}

// The teacher's log-probabilities on the slots (into r.log_p, −inf at an empty slot) and of the tail (returned,
// −inf without a bucket): the softmax of v_k·inv_t over the entries and, with a bucket, of
// log(1 − Σ_k exp v_k)·inv_t + tail_shift, the mass the log-probabilities v leave (computed in float64: in float32
// a tail of 1e-3 would carry the rounding of Σ ≈ 1, 6e-5 of itself). See kernels/kd.py _sparse_teacher_log_probs.
inline float sparse_teacher_log_probs(const TopKRow& r, float inv_t, float tail_shift, bool bucket) {
    const float* values = r.values;
    vf top_v = splat(-kInf);
    for (int64_t k = 0; k < r.padded; k += kLanes) top_v = vmax(vload(values + k) * inv_t, top_v);
    float top = hmax(top_v), w_tail = -kInf;
    if (bucket) {
        double top_64 = -kInf;
        for (int64_t k = 0; k < r.padded; ++k) top_64 = values[k] > top_64 ? values[k] : top_64;
        top_64 = top_64 == -kInf ? 0.0 : top_64;  // no entries: Σ exp v = 0, the tail holds all the mass
        double total = 0;
        for (int64_t k = 0; k < r.padded; ++k) total += std::exp(static_cast<double>(values[k]) - top_64);
        const double log_mass = top_64 + std::log(total);  // log Σ exp v, ≤ 0 up to rounding
        w_tail = static_cast<float>(std::log(-std::expm1(log_mass < 0 ? log_mass : 0.0))) * inv_t + tail_shift;
        top = fmax_(top, w_tail);
    }
    const float shift = finite_or_zero(top);
    vf acc = splat(0.0f);
    for (int64_t k = 0; k < r.padded; k += kLanes) acc += vexp_nonpositive(vload(values + k) * inv_t - shift);
    const float log_norm = top + std::log(hsum(acc) + (bucket ? std::exp(w_tail - shift) : 0.0f));
    for (int64_t k = 0; k < r.padded; k += kLanes) vstore(r.log_p + k, vload(values + k) * inv_t - log_norm);
    return w_tail - log_norm;
}

// ---- the forward ----

// An online log-sum-exp over the swept columns of x·scale: the running max m, Σ e with e = exp(y) and
// Σ e·y (the entropy bracket), y = x·scale − finite_or_zero(m).
struct LogSumExp {
    float m = -kInf, sum = 0, bracket = 0;
};

// Folds a block's sums, taken against shift = finite_or_zero(new_m), into the running state.
inline void fold(LogSumExp& state, float new_m, float block_sum, float block_bracket) {
    const float shift = finite_or_zero(new_m);
    const float scale = std::exp(state.m - shift);
    state.bracket = recentred(state.bracket, scale, shift - finite_or_zero(state.m), state.sum) + block_bracket;
    state.sum = state.sum * scale + block_sum;
    state.m = new_m;
}

// The full row's log-sum-exp from the rest's and the entries' logits (slots at −inf add nothing).
inline LogSumExp with_entries(const LogSumExp& rest, const TopKRow& r, float scale) {
    vf top = splat(-kInf);
    for (int64_t k = 0; k < r.padded; k += kLanes) top = vmax(vload(r.logits + k) * scale, top);
    const float m = fmax_(rest.m, hmax(top)), shift = finite_or_zero(m);
    vf acc = splat(0.0f), acc_bracket = splat(0.0f);
    for (int64_t k = 0; k < r.padded; k += kLanes) {
        const vf y = vload(r.logits + k) * scale - shift;
        const vf e = vexp_nonpositive(y);
        acc += e;
        acc_bracket += weighted(e, y);
    }
    LogSumExp full = rest;
    fold(full, m, hsum(acc), hsum(acc_bracket));
    return full;
}

// What one sweep of the student row gives: the swept set's log-sum-exp at scale_0 (the KD's 1/T, or 1 without KD)
// and, with kTwo, at 1; Σ a over the rest (spread); the first argmax of the row (metrics); whether the row holds a
// NaN or +inf logit.
struct TopKSweep {
    LogSumExp at_scale, at_one;
    float sum_a_rest = 0;
    float best = -kInf;
    int64_t argmax = 0;
    bool nan_row = false;
};

// One sweep over the student row in blocks of kBlock columns: with kBucket over the rest (entry columns masked),
// else over all columns. The entropy bracket is kept at T = 1 (kMetrics): on the second channel with kTwo, else on
// the first (whose scale is then 1). Flattened: the compiler left the vector exponential out of line, a call in
// the loop that kept every accumulator on the stack.
template <bool kBucket, bool kSpread, bool kTwo, bool kMetrics>
[[gnu::flatten]] TopKSweep sweep_row(const TopKArgs& a, const TopKRow& r, float scale_0) {
    TopKSweep out;
    const void* const student = r.student;
    const int s_dtype = a.student.dtype;
    const int64_t num_cols = a.num_cols;
    const uint8_t* const marks = r.marks;
    vi nan_seen = vi{};
    float row_max = -kInf;
    for (int64_t start = 0; start < num_cols; start += kBlock) {
        const int64_t end = min_(start + kBlock, num_cols);
        vf raw_max = splat(-kInf), swept_max = splat(-kInf);
        for (int64_t c = start; c < end; c += kLanes) {
            const int n = static_cast<int>(min_(kLanes, end - c));
            const vf x = load_logits(student, s_dtype, c, n);
            nan_seen |= x != x;
            raw_max = vmax(x, raw_max);
            if (kBucket) swept_max = vmax(marked_lanes(lane_marks(marks, c)) ? splat(-kInf) : x, swept_max);
        }
        const float block_max = hmax(raw_max), block_swept = kBucket ? hmax(swept_max) : block_max;
        row_max = fmax_(row_max, block_max);
        if (kMetrics && block_max > out.best) {
            out.best = block_max;
            out.argmax = first_index_of(student, s_dtype, start, end, block_max);
        }
        const float new_m_0 = fmax_(out.at_scale.m, block_swept * scale_0), shift_0 = finite_or_zero(new_m_0);
        const float new_m_1 = fmax_(out.at_one.m, block_swept), shift_1 = finite_or_zero(new_m_1);
        vf acc_0 = splat(0.0f), acc_bracket_0 = splat(0.0f), acc_1 = splat(0.0f), acc_bracket_1 = splat(0.0f);
        vf acc_rest = splat(0.0f);
        for (int64_t c = start; c < end; c += kLanes) {
            const int n = static_cast<int>(min_(kLanes, end - c));
            prefetch(student, s_dtype, c + kPrefetch);
            vf x = load_logits(student, s_dtype, c, n);
            if (kBucket) {
                const vi masked = marked_lanes(lane_marks(marks, c));
                if (kSpread) {  // Σ a over the rest: 0 at the entries and past the row's end (−inf logits count)
                    const vi outside = n == kLanes ? masked : (masked | lanes_from(n));
                    acc_rest += outside ? splat(0.0f) : x * scale_0;
                }
                x = masked ? splat(-kInf) : x;
            }
            const vf y_0 = x * scale_0 - shift_0;
            const vf e_0 = vexp_nonpositive(y_0);
            acc_0 += e_0;
            if (kMetrics && !kTwo) acc_bracket_0 += weighted(e_0, y_0);
            if (kTwo) {
                const vf y_1 = x - shift_1;
                const vf e_1 = vexp_nonpositive(y_1);
                acc_1 += e_1;
                if (kMetrics) acc_bracket_1 += weighted(e_1, y_1);
            }
        }
        fold(out.at_scale, new_m_0, hsum(acc_0), kMetrics && !kTwo ? hsum(acc_bracket_0) : 0.0f);
        if (kTwo) fold(out.at_one, new_m_1, hsum(acc_1), kMetrics ? hsum(acc_bracket_1) : 0.0f);
        if (kSpread) out.sum_a_rest += hsum(acc_rest);
    }
    bool nan_row = row_max == kInf;
    for (int i = 0; i < kLanes; ++i) nan_row |= nan_seen[i] != 0;
    out.nan_row = nan_row;
    return out;
}

// The fidelity metrics of the row at T = 1 (fastkd.reference.kd_topk_fidelity_rows): agreement of the argmaxes,
// KL(p_t‖p_s), H(p_t) of the sparse teacher (the tail as one class), H(p_s).
inline void topk_metrics(const TopKArgs& a, const TopKRow& r, bool teacher, const LogSumExp& full_1,
                         const LogSumExp& rest_1, const TopKSweep& sweep, float out[kNumMetrics]) {
    const float m_1 = full_1.m, log_sum_1 = std::log(full_1.sum);
    float kl = 0, entropy = 0;
    if (teacher) {
        const float log_p_tail = sparse_teacher_log_probs(r, 1.0f, 0.0f, a.bucket);
        vf acc_kl = splat(0.0f), acc_entropy = splat(0.0f);
        for (int64_t k = 0; k < r.padded; k += kLanes) {
            const vf log_p = vload(r.log_p + k), p = vexp_nonpositive(log_p);
            acc_kl += weighted(p, log_p - ((vload(r.logits + k) - m_1) - log_sum_1));
            acc_entropy += weighted(p, log_p);
        }
        kl = hsum(acc_kl);
        entropy = -hsum(acc_entropy);
        if (a.bucket) {
            const float log_q_tail = (rest_1.m + std::log(rest_1.sum)) - (m_1 + log_sum_1);
            const float p_tail = std::exp(log_p_tail);
            kl += weighted_one(p_tail, log_p_tail - log_q_tail);
            entropy -= weighted_one(p_tail, log_p_tail);
        }
    }
    float top_value = -kInf;  // the teacher's top class: the smallest index among the entries of the largest value
    int64_t top_class = a.num_cols;
    for (int64_t k = 0; k < r.padded; ++k) {
        if (r.cols[k] < 0) continue;
        if (r.values[k] > top_value || (r.values[k] == top_value && r.cols[k] < top_class)) {
            top_value = r.values[k];
            top_class = r.cols[k];
        }
    }
    out[kMetricTop1Agreement] = sweep.argmax == top_class ? 1.0f : 0.0f;
    out[kMetricPredictiveKL] = kl;
    out[kMetricTeacherEntropy] = entropy;
    out[kMetricStudentEntropy] = log_sum_1 - full_1.bracket / full_1.sum;
}

// The sweep of the forward for the launch's modes.
using SweepFn = TopKSweep (*)(const TopKArgs&, const TopKRow&, float);

// One row of the forward: the sweep, then the row's loss, statistics (TopKStat slots) and metrics. Only the sweeps
// are instantiated per mode: whole rows as templates added about 14 s to each kd_cpu_<isa>.cpp's build, the sweeps
// alone about 6 s (gcc 12, AVX-512).
void topk_forward_row(const TopKArgs& a, int64_t row, SweepFn sweep_fn, bool two, bool with_metrics) {
    TopKScratch& scratch = t_topk;
    const TopKRow r = topk_row(a, row, scratch);
    float stats[kNumStats] = {};
    float metrics[kNumMetrics] = {};
    float loss = 0;
    if (r.counted) {
        const bool has_kd = a.kd_scale != 0, has_ce = a.ce_weight != 0, bucket = a.bucket;
        const float inv_t = a.inv_temperature;
        const float scale_0 = has_kd ? inv_t : 1.0f;  // the first channel; at T = 1 when there is no second
        TopKSweep sweep;
        if (has_kd || has_ce || with_metrics) sweep = sweep_fn(a, r, scale_0);
        const LogSumExp& rest_1 = two ? sweep.at_one : sweep.at_scale;
        const LogSumExp full_0 = bucket ? with_entries(sweep.at_scale, r, scale_0) : sweep.at_scale;
        const LogSumExp full_1 = two ? (bucket ? with_entries(sweep.at_one, r, 1.0f) : sweep.at_one) : full_0;
        const bool teacher = has_teacher(r, bucket);
        float m_a = -kInf, log_sum_a = -kInf, log_p_tail = -kInf, kl = 0, m_rest = -kInf, log_sum_rest = -kInf;
        if (has_kd) {
            m_a = full_0.m;
            log_sum_a = std::log(full_0.sum);
            if (bucket) {
                m_rest = sweep.at_scale.m;
                log_sum_rest = std::log(sweep.at_scale.sum);
            }
        }
        if (has_kd && teacher) {
            const float rest_classes = static_cast<float>(a.num_cols - r.entries);
            const float tail_shift = a.spread ? (1.0f - a.inv_teacher_temperature) * std::log(rest_classes) : 0.0f;
            log_p_tail = sparse_teacher_log_probs(r, a.inv_teacher_temperature, tail_shift, bucket);
            vf acc = splat(0.0f);
            for (int64_t k = 0; k < r.padded; k += kLanes) {
                const vf log_p_t = vload(r.log_p + k);
                const vf log_p_s = (vload(r.logits + k) * inv_t - m_a) - log_sum_a;
                acc += weighted(vexp_nonpositive(log_p_t), log_p_t - log_p_s);
            }
            kl = hsum(acc);
            const float p_tail = std::exp(log_p_tail);
            if (a.spread) {  // p_tail·(log p_each − the mean of log p_s over the rest's V − n classes)
                const float mean_log_p_s_rest = sweep.sum_a_rest / rest_classes - (m_a + log_sum_a);
                kl += weighted_one(p_tail, log_p_tail - std::log(rest_classes) - mean_log_p_s_rest);
            } else if (bucket) {  // the student's bucket: its mass outside the entries
                kl += weighted_one(p_tail, log_p_tail - ((m_rest + log_sum_rest) - (m_a + log_sum_a)));
            }
            loss = a.kd_scale * kl;
        }
        float m_1 = -kInf, log_sum_1 = -kInf;
        if (has_ce || with_metrics) {
            m_1 = full_1.m;
            log_sum_1 = std::log(full_1.sum);
        }
        if (has_ce) {
            const float target = r.label_ok ? load_one(r.student, a.student.dtype, r.label) : 0.0f;
            loss += a.ce_weight * ((m_1 - target) + log_sum_1);
        }
        const bool nan_row = sweep.nan_row;
        if (nan_row) m_a = m_1 = m_rest = __builtin_nanf("");  // NaN statistics make the backward's gradient NaN too
        loss = (!r.label_ok || !r.valid || nan_row) ? __builtin_nanf("") : loss;
        stats[kTopKMaxA] = m_a;
        stats[kTopKLogSumA] = log_sum_a;
        stats[kTopKLogPTail] = log_p_tail;
        stats[kTopKKL] = kl;
        stats[kTopKMaxS] = m_1;
        stats[kTopKLogSumS] = log_sum_1;
        stats[kTopKMaxRest] = m_rest;
        stats[kTopKLogSumRest] = log_sum_rest;
        if (with_metrics) {
            topk_metrics(a, r, teacher, full_1, rest_1, sweep, metrics);
            if (nan_row || !r.valid) {
                for (float& m : metrics) m = __builtin_nanf("");
            }
        }
        clear_marks(r, scratch);
    }
    a.loss[row] = loss;
    for (int slot = 0; slot < kNumStats; ++slot) a.stats[slot * a.num_rows + row] = stats[slot];
    if (with_metrics) {
        for (int slot = 0; slot < kNumMetrics; ++slot) a.metrics[slot * a.num_rows + row] = metrics[slot];
    }
}

// ---- the backward ----

// What the backward's sweep over a counted row reads: the row, where its gradient goes, and its constants.
struct BackwardSweep {
    const void* student;
    void* grad_row;
    const uint8_t* marks;  // the entry columns
    const float* p_t;      // the teacher's probabilities, at the entry columns
    int64_t num_cols;
    int s_dtype;
    int32_t label;  // −1 without a valid one
    float inv_t, m_a, log_sum_a, m_1, log_sum_1;
    float kd, ce;                   // the factors of the KD term (∂/∂s) and of the CE term
    float shift_rest, rest_factor;  // bucket: the rest's gradient is rest_factor·exp(a − shift_rest)
    float ce_scale, q_ratio;        // kShared: softmax(s) = ce_scale·exp(a − shift_rest) (bucket) or q_ratio·p_s
    float p_each;                   // spread: each rest class's teacher probability
};

// The sweep of the backward: ∂(grad_loss·row_loss)/∂s over the row, one exponential per column (two for CE at
// T ≠ 1), the vectors that hold an entry column redone there. kShared (T = 1 with KD and CE): the CE's softmax
// comes from the KD's exponentials. Flattened, as sweep_row.
template <bool kBucket, bool kSpread, bool kKD, bool kCE, bool kShared>
[[gnu::flatten]] void backward_sweep(const BackwardSweep& b) {
    const void* const student = b.student;
    void* const grad_row = b.grad_row;
    const uint8_t* const marks = b.marks;
    const float* const p_t = b.p_t;
    const int64_t num_cols = b.num_cols;
    const int s_dtype = b.s_dtype;
    const float inv_t = b.inv_t, m_a = b.m_a, log_sum_a = b.log_sum_a, m_1 = b.m_1, log_sum_1 = b.log_sum_1;
    const float kd = b.kd, ce = b.ce, shift_rest = b.shift_rest, rest_factor = b.rest_factor;
    const float ce_scale = b.ce_scale, q_ratio = b.q_ratio, p_each = b.p_each;
    const vi label = vi{} + b.label;
    for (int64_t c = 0; c < num_cols; c += kLanes) {
        const int n = static_cast<int>(min_(kLanes, num_cols - c));
        prefetch(student, s_dtype, c + kPrefetch);
        const vf x = load_logits(student, s_dtype, c, n);
        vf grad = splat(0.0f);
        vf q = splat(0.0f);  // softmax(s) (CE)
        if (kKD) {
            if (kBucket && !kSpread) {  // p_s − p_tail·q_rest = e·(p_scale − q_scale), e = exp(a − max of the rest)
                const vf e = vexp_nonpositive(vmin(x * inv_t - shift_rest, splat(0.0f)));
                grad = rest_factor * e;
                if (kShared) q = ce_scale * e;
            } else {  // spread: p_s − p_tail/(V − n); no bucket: p_s
                const vf p_s = vexp_nonpositive(vmin((x * inv_t - m_a) - log_sum_a, splat(0.0f)));
                grad = kSpread ? kd * (p_s - p_each) : kd * p_s;
                if (kShared) q = p_s * q_ratio;
            }
        }
        if (kCE && !kShared) q = vexp_nonpositive(vmin((x - m_1) - log_sum_1, splat(0.0f)));
        const vf one_hot = column_indices(c) == label ? splat(1.0f) : splat(0.0f);
        if (kCE) grad += ce * (q - one_hot);
        if (kKD) {
            const uint32_t m = lane_marks(marks, c);
            if (m != 0) {  // an entry column: p_s,k − p_t,k
                const vf p_s = vexp_nonpositive(vmin((x * inv_t - m_a) - log_sum_a, splat(0.0f)));
                vf entry = kd * (p_s - vload(p_t + c));
                if (kCE) entry += ce * (vexp_nonpositive(vmin((x - m_1) - log_sum_1, splat(0.0f))) - one_hot);
                grad = marked_lanes(m) ? entry : grad;
            }
        }
        store_lanes(grad_row, s_dtype, c, n, grad);
    }
}

using BackwardSweepFn = void (*)(const BackwardSweep&);

// One row of the backward: the row's constants from the statistics (of either backend's forward), the teacher's
// probabilities at the entry columns, then the sweep. An ignored row's gradient is 0.
void topk_backward_row(const TopKArgs& a, int64_t row, BackwardSweepFn sweep_fn) {
    const int64_t num_cols = a.num_cols;
    const int s_dtype = a.student.dtype;
    void* grad_row = static_cast<char*>(a.grad_student) + row * num_cols * element_size(s_dtype);
    TopKScratch& scratch = t_topk;
    const TopKRow r = topk_row(a, row, scratch);
    if (!r.counted) {
        std::memset(grad_row, 0, static_cast<size_t>(num_cols * element_size(s_dtype)));  // 0.0 in every dtype
        return;
    }
    const bool has_kd = a.kd_scale != 0, has_ce = a.ce_weight != 0, bucket = a.bucket && has_kd;
    const auto stat = [&](TopKStat slot) { return a.stats[slot * a.num_rows + row]; };
    const float m_a = stat(kTopKMaxA), log_sum_a = stat(kTopKLogSumA), log_p_tail = stat(kTopKLogPTail);
    const float m_1 = stat(kTopKMaxS), log_sum_1 = stat(kTopKLogSumS);
    const float m_rest = stat(kTopKMaxRest), log_sum_rest = stat(kTopKLogSumRest);
    bool bad = !r.label_ok || !r.valid;
    bad |= has_kd && (m_a != m_a || (bucket && m_rest != m_rest));  // a NaN row, marked by the forward
    bad |= has_ce && m_1 != m_1;
    const float grad_loss = bad ? __builtin_nanf("") : a.grad_loss[row * a.grad_loss_stride];
    const bool teacher = has_teacher(r, bucket);
    BackwardSweep b;
    b.student = r.student;
    b.grad_row = grad_row;
    b.marks = r.marks;
    b.num_cols = num_cols;
    b.s_dtype = s_dtype;
    b.label = static_cast<int32_t>(r.label_ok ? r.label : -1);
    b.inv_t = a.inv_temperature;
    b.m_a = m_a;
    b.log_sum_a = log_sum_a;
    b.m_1 = m_1;
    b.log_sum_1 = log_sum_1;
    b.kd = grad_loss * a.kd_scale * a.inv_temperature * (teacher ? 1.0f : 0.0f);  // d/ds = (1/T)·d/da
    b.ce = grad_loss * a.ce_weight;
    const float rest_classes = static_cast<float>(num_cols - r.entries);
    if (has_kd) {  // the teacher's probabilities at the entry columns
        if (static_cast<int64_t>(scratch.dense.size()) < num_cols + kLanes) scratch.dense.resize(num_cols + kLanes);
        float* const p_t = scratch.dense.data();
        if (teacher) {
            const float tail_shift = a.spread ? (1.0f - a.inv_teacher_temperature) * std::log(rest_classes) : 0.0f;
            sparse_teacher_log_probs(r, a.inv_teacher_temperature, tail_shift, bucket);
        }
        for (int64_t k = 0; k < r.padded; ++k) {
            if (r.cols[k] >= 0) p_t[r.cols[k]] = teacher ? std::exp(r.log_p[k]) : 0.0f;
        }
    }
    b.p_t = scratch.dense.data();  // read at marked columns only
    // bucket: p_s,j − p_tail·q_j = e_j·(exp(m_rest − m_a − log Σ a) − p_tail/Σ_rest), both factors ≤ 1
    b.shift_rest = finite_or_zero(m_rest);
    const bool rest_seen = m_rest > -kInf;  // else every rest logit is −inf: e = 0 there
    const float p_scale = rest_seen ? std::exp((b.shift_rest - m_a) - log_sum_a) : 0.0f;
    const float q_scale = rest_seen ? std::exp(log_p_tail - log_sum_rest) : 0.0f;
    b.rest_factor = b.kd * (p_scale - q_scale);
    // T = 1: softmax(s) = e·exp(m_rest − max s − log Σ) (bucket; m_rest ≤ max s), or p_s·q_ratio, where q_ratio is
    // 1 when the statistics come from this backend's forward (it shares the sums at T = 1)
    b.ce_scale = rest_seen ? std::exp((b.shift_rest - m_1) - log_sum_1) : 0.0f;
    b.q_ratio = std::exp((m_a + log_sum_a) - (m_1 + log_sum_1));
    b.p_each = a.spread && has_kd ? std::exp(log_p_tail - std::log(rest_classes)) : 0.0f;
    sweep_fn(b);
    clear_marks(r, scratch);
}

// The modes from the run-time options (static_switch.h): a sweep instantiated for each.
void topk_forward(const TopKArgs& a) {
    const bool has_kd = a.kd_scale != 0;
    const bool two = has_kd && (a.ce_weight != 0 || a.metrics != nullptr) && a.inv_temperature != 1.0f;
    const bool with_metrics = a.metrics != nullptr;
    SweepFn sweep_fn = nullptr;
    bool_switch(a.bucket, [&](auto bucket) {
        bool_switch(a.spread && has_kd, [&](auto spread) {
            bool_switch(two, [&](auto two_channels) {
                bool_switch(with_metrics, [&](auto metrics) {
                    constexpr bool kBucket = decltype(bucket)::value;
                    sweep_fn = sweep_row<kBucket, kBucket && decltype(spread)::value, decltype(two_channels)::value,
                                         decltype(metrics)::value>;
                });
            });
        });
    });
    for_each_row(a, [&](const TopKArgs& args, int64_t row) {
        topk_forward_row(args, row, sweep_fn, two, with_metrics);
    });
}

void topk_backward(const TopKArgs& a) {
    const bool has_kd = a.kd_scale != 0, has_ce = a.ce_weight != 0;
    BackwardSweepFn sweep_fn = nullptr;
    bool_switch(a.bucket && has_kd, [&](auto bucket) {
        bool_switch(a.spread && has_kd, [&](auto spread) {
            bool_switch(has_kd, [&](auto kd) {
                bool_switch(has_ce, [&](auto ce) {
                    bool_switch(has_kd && has_ce && a.inv_temperature == 1.0f, [&](auto shared) {
                        constexpr bool kBucket = decltype(bucket)::value, kKD = decltype(kd)::value;
                        constexpr bool kCE = decltype(ce)::value;
                        sweep_fn = backward_sweep<kBucket && kKD, kBucket && kKD && decltype(spread)::value, kKD,
                                                  kCE, kKD && kCE && decltype(shared)::value>;
                    });
                });
            });
        });
    });
    for_each_row(a, [&](const TopKArgs& args, int64_t row) { topk_backward_row(args, row, sweep_fn); });
}

}  // namespace

// This instruction set's entry in the table of sparse-teacher kernels (kd_cpu.h).
extern const CpuTopKIsa topk_isa = {topk_forward, topk_backward};

}  // namespace FASTKD_ISA
}  // namespace fastkd
