// feature_loss kernels for one instruction set (see feature_loss_cpu.h): included by kd_cpu_<isa>.cpp with
// FASTKD_ISA and FASTKD_VEC_BYTES defined. The algorithm of the Triton kernels (kernels/features.py): one group
// (a channel map, the channels of one position, or a sample) per task, swept a few times (statistics, then the
// loss or the gradient), elements whose mask is 0 absent from every statistic and gradient. A group is a few runs
// of equally spaced elements, read kLanes at a time (directly when they are adjacent, gathered otherwise).
// Groups are shared among OpenMP threads, each computed by one thread in a fixed order: the results do not
// depend on the thread count.
#pragma once
#include <cmath>
#include <cstdint>

#include "feature_loss_cpu.h"
#include "kd_cpu.h"
#include "simd.h"

namespace fastkd {
namespace FASTKD_ISA {
namespace {

constexpr float kFeatureNormEps = 1e-5f, kFeatureL2Eps = 1e-12f, kFeatureCosineEps = 1e-8f;  // reference.py

// A run: `length` elements, the i-th at offset + i·step in each view (in elements); its channel is c0 + i·c_step.
struct Run {
    int64_t s, t, m, gs, gt;  // offsets
    int64_t s_step, t_step, m_step, gs_step, gt_step;
    int64_t length, c0, c_step;
};

inline int64_t offset(const Strided3& x, int64_t n, int64_t c, int64_t s) {
    return n * x.stride[0] + c * x.stride[1] + s * x.stride[2];
}

// Calls f(run) for the runs of group g.
template <class F>
void for_each_run(const FeatureArgs& a, int64_t g, F&& f) {
    auto run = [&](int64_t n, int64_t c, int64_t s, int axis, int64_t length, int64_t c_step) {
        f(Run{offset(a.student, n, c, s), offset(a.teacher, n, c, s), offset(a.mask, n, c, s),
              offset(a.grad_student, n, c, s), offset(a.grad_teacher, n, c, s), a.student.stride[axis],
              a.teacher.stride[axis], a.mask.stride[axis], a.grad_student.stride[axis], a.grad_teacher.stride[axis],
              length, c, c_step});
    };
    switch (static_cast<FeatureGroup>(a.group)) {
        case kGroupChannel: return run(g / a.num_c, g % a.num_c, 0, 2, a.num_s, 0);
        case kGroupPosition: return run(g / a.num_s, 0, g % a.num_s, 1, a.num_c, 1);
        case kGroupSample:
            for (int64_t c = 0; c < a.num_c; ++c) run(g, c, 0, 2, a.num_s, 0);
            return;
    }
}

// n ≤ kLanes elements of a view from `start` every `step` elements, as float32 (0 past n).
inline vf load_run(const Strided3& x, int64_t start, int64_t step, int n) {
    if (step == 1 && x.dtype != kUInt8) return load_lanes(x.data, x.dtype, start, n, 0.0f);
    float values[kLanes] = {};
    for (int i = 0; i < n; ++i) {
        const int64_t at = start + i * step;
        switch (static_cast<DType>(x.dtype)) {
            case kFloat32: values[i] = static_cast<const float*>(x.data)[at]; break;
            case kUInt8: values[i] = static_cast<const uint8_t*>(x.data)[at]; break;
            case kFloat16:
            case kBFloat16:
                values[i] = load_lanes(static_cast<const uint16_t*>(x.data) + at, x.dtype, 0, 1, 0.0f)[0];
                break;
        }
    }
    return vload(values);
}

inline vf load_mask(const FeatureArgs& a, const Run& r, int64_t i, int n) {
    if (a.mask.data == nullptr) {
        vf ones = splat(0.0f);
        for (int k = 0; k < n; ++k) ones[k] = 1.0f;
        return ones;
    }
    return load_run(a.mask, r.m + i * r.m_step, r.m_step, n);
}

inline void store_run(const Strided3& x, int64_t start, int64_t step, int n, vf v) {
    if (step == 1) return store_lanes(const_cast<void*>(x.data), x.dtype, start, n, v);
    for (int i = 0; i < n; ++i) store_lanes(const_cast<void*>(x.data), x.dtype, start + i * step, 1, splat(v[i]));
}

// A sum over a group in a fixed order: vectors add up in a float32 block of kBlockVectors, and blocks in
// float64, so that groups of millions of elements keep their statistics accurate (the same order for any thread
// count, as each group is summed by one thread).
class GroupSum {
  public:
    void add(vf x) {
        block_ += x;
        if (++count_ == kBlockVectors) {
            total_ += hsum(block_);
            block_ = splat(0.0f);
            count_ = 0;
        }
    }
    float value() const { return static_cast<float>(total_ + hsum(block_)); }

  private:
    static constexpr int kBlockVectors = 64;
    vf block_ = splat(0.0f);
    double total_ = 0;
    int count_ = 0;
};

inline int lanes(const Run& r, int64_t i) { return static_cast<int>(r.length - i < kLanes ? r.length - i : kLanes); }

// The per-group normalisation y = (x − shift)·scale of each side, the count of present elements and the norms.
struct Normalizers {
    float count = 0, shift_s = 0, shift_t = 0, scale_s = 1, scale_t = 1, norm_s = 0, norm_t = 0;
};

// Σ over the group's present elements of s², t², s·t.
inline void sums_of_squares(const FeatureArgs& a, int64_t g, float* ss, float* tt, float* st) {
    GroupSum vss, vtt, vst;
    for_each_run(a, g, [&](const Run& r) {
        for (int64_t i = 0; i < r.length; i += kLanes) {
            const int n = lanes(r, i);
            const vi present = load_mask(a, r, i, n) != 0.0f;
            const vf xs = present ? load_run(a.student, r.s + i * r.s_step, r.s_step, n) : splat(0.0f);
            const vf xt = present ? load_run(a.teacher, r.t + i * r.t_step, r.t_step, n) : splat(0.0f);
            vss.add(xs * xs);
            vtt.add(xt * xt);
            vst.add(xs * xt);
        }
    });
    *ss = vss.value();
    *tt = vtt.value();
    *st = vst.value();
}

Normalizers group_normalizers(const FeatureArgs& a, int64_t g) {
    Normalizers z;
    if (a.normalize == kNormalizeStandardize) {  // the mean, then the variance around it (two sweeps, as Triton's)
        GroupSum count, sum_s, sum_t;
        for_each_run(a, g, [&](const Run& r) {
            for (int64_t i = 0; i < r.length; i += kLanes) {
                const int n = lanes(r, i);
                const vi present = load_mask(a, r, i, n) != 0.0f;
                count.add(present ? splat(1.0f) : splat(0.0f));
                sum_s.add(present ? load_run(a.student, r.s + i * r.s_step, r.s_step, n) : splat(0.0f));
                sum_t.add(present ? load_run(a.teacher, r.t + i * r.t_step, r.t_step, n) : splat(0.0f));
            }
        });
        z.count = count.value();
        const float safe = z.count > 1.0f ? z.count : 1.0f;
        z.shift_s = sum_s.value() / safe;
        z.shift_t = sum_t.value() / safe;
        GroupSum var_s, var_t;
        for_each_run(a, g, [&](const Run& r) {
            for (int64_t i = 0; i < r.length; i += kLanes) {
                const int n = lanes(r, i);
                const vi present = load_mask(a, r, i, n) != 0.0f;
                const vf ds = load_run(a.student, r.s + i * r.s_step, r.s_step, n) - z.shift_s;
                const vf dt = load_run(a.teacher, r.t + i * r.t_step, r.t_step, n) - z.shift_t;
                var_s.add(present ? ds * ds : splat(0.0f));
                var_t.add(present ? dt * dt : splat(0.0f));
            }
        });
        z.scale_s = 1.0f / std::sqrt(var_s.value() / safe + kFeatureNormEps);
        z.scale_t = 1.0f / std::sqrt(var_t.value() / safe + kFeatureNormEps);
    } else if (a.normalize == kNormalizeL2) {
        float ss, tt, st;
        sums_of_squares(a, g, &ss, &tt, &st);
        z.norm_s = std::sqrt(ss);
        z.norm_t = std::sqrt(tt);
        z.scale_s = 1.0f / (z.norm_s > kFeatureL2Eps ? z.norm_s : kFeatureL2Eps);
        z.scale_t = 1.0f / (z.norm_t > kFeatureL2Eps ? z.norm_t : kFeatureL2Eps);
    }
    return z;
}

// One chunk of a run, normalised: mask weight, ys, yt, which elements count and where the margin sets the target.
struct Chunk {
    vf m, ys, yt;
    vi counted, clipped;
};

inline Chunk normalized_chunk(const FeatureArgs& a, const Run& r, int64_t i, int n, const Normalizers& z) {
    Chunk k;
    k.m = load_mask(a, r, i, n);
    k.ys = (load_run(a.student, r.s + i * r.s_step, r.s_step, n) - z.shift_s) * z.scale_s;
    k.yt = (load_run(a.teacher, r.t + i * r.t_step, r.t_step, n) - z.shift_t) * z.scale_t;
    k.counted = k.m != 0.0f;
    k.clipped = vi{};  // all false
    if (a.margin != nullptr) {
        vf margin = splat(0.0f);
        for (int l = 0; l < n; ++l) margin[l] = a.margin[r.c0 + (i + l) * r.c_step];
        k.clipped = margin >= k.yt;
        k.yt = k.clipped ? margin : k.yt;
        k.counted = k.counted & ((k.ys > k.yt) | (k.yt > 0.0f));
    }
    return k;
}

// An element-wise term of d = ys − yt and its derivative.
inline void term_and_slope(int kind, float beta, vf d, vf* term, vf* slope) {
    const vf magnitude = vabs(d);
    const vf sign = d > 0.0f ? splat(1.0f) : (d < 0.0f ? splat(-1.0f) : splat(0.0f));
    if (kind == kKindMSE) {
        *term = d * d;
        *slope = 2.0f * d;
    } else if (kind == kKindL1) {
        *term = magnitude;
        *slope = sign;
    } else {  // kKindSmoothL1 (kKindCosine has no element-wise term)
        const vi small = magnitude < beta;
        *term = small ? 0.5f * d * d / beta : magnitude - 0.5f * beta;
        *slope = small ? d / beta : sign;
    }
}

// The gradient of scale·m·term w.r.t. the normalised student value of each element that counts (0 elsewhere).
inline vf loss_gradient(const FeatureArgs& a, const Chunk& k, float scale) {
    vf term, slope;
    term_and_slope(a.kind, a.beta, k.ys - k.yt, &term, &slope);
    return k.counted ? scale * k.m * slope : splat(0.0f);
}

// The mask weight of a cosine group (one position; the mask is constant along its channels).
inline float position_weight(const FeatureArgs& a, int64_t g) {
    float weight = 0;
    for_each_run(a, g, [&](const Run& r) { weight = load_mask(a, r, 0, 1)[0]; });
    return weight;
}

void feature_forward_group(const FeatureArgs& a, int64_t g) {
    if (a.kind == kKindCosine) {
        float ss, tt, st;
        sums_of_squares(a, g, &ss, &tt, &st);
        const float m = position_weight(a, g);
        const float cosine = st / ((std::sqrt(ss) > kFeatureCosineEps ? std::sqrt(ss) : kFeatureCosineEps) *
                                   (std::sqrt(tt) > kFeatureCosineEps ? std::sqrt(tt) : kFeatureCosineEps));
        a.terms[g] = m != 0 ? m * (1.0f - cosine) : 0.0f;
        a.weights[g] = m;
        return;
    }
    const Normalizers z = group_normalizers(a, g);
    GroupSum terms, weights;
    for_each_run(a, g, [&](const Run& r) {
        for (int64_t i = 0; i < r.length; i += kLanes) {
            const int n = lanes(r, i);
            const Chunk k = normalized_chunk(a, r, i, n, z);
            vf term, slope;
            term_and_slope(a.kind, a.beta, k.ys - k.yt, &term, &slope);
            terms.add(k.counted ? k.m * term : splat(0.0f));
            weights.add(k.m);
        }
    });
    a.terms[g] = terms.value();
    a.weights[g] = weights.value();
}

void feature_backward_group(const FeatureArgs& a, int64_t g) {
    const float scale = *a.scale;
    const bool teacher_grad = a.grad_teacher.data != nullptr;
    if (a.kind == kKindCosine) {
        float ss, tt, st;
        sums_of_squares(a, g, &ss, &tt, &st);
        const float weight = scale * position_weight(a, g);
        const float norm_s = std::sqrt(ss), norm_t = std::sqrt(tt);
        const float ns = norm_s > kFeatureCosineEps ? norm_s : kFeatureCosineEps;
        const float nt = norm_t > kFeatureCosineEps ? norm_t : kFeatureCosineEps;
        // ℓ = 1 − P/(A·B): ∂ℓ/∂s = −t/(A·B) + P·s/(A³·B)·[‖s‖ > eps], and the same with s and t swapped
        const float coef_s = norm_s > kFeatureCosineEps ? st / (ns * ns * ns * nt) : 0.0f;
        const float coef_t = norm_t > kFeatureCosineEps ? st / (ns * nt * nt * nt) : 0.0f;
        for_each_run(a, g, [&](const Run& r) {
            for (int64_t i = 0; i < r.length; i += kLanes) {
                const int n = lanes(r, i);
                const vf xs = load_run(a.student, r.s + i * r.s_step, r.s_step, n);
                const vf xt = load_run(a.teacher, r.t + i * r.t_step, r.t_step, n);
                const vf zero = splat(0.0f);  // a masked-out position gets 0, even where its features are NaN
                store_run(a.grad_student, r.gs + i * r.gs_step, r.gs_step, n,
                          weight != 0 ? weight * (coef_s * xs - xt / (ns * nt)) : zero);
                if (teacher_grad) {
                    store_run(a.grad_teacher, r.gt + i * r.gt_step, r.gt_step, n,
                              weight != 0 ? weight * (coef_t * xt - xs / (ns * nt)) : zero);
                }
            }
        });
        return;
    }
    const Normalizers z = group_normalizers(a, g);
    // the gradient g of the loss w.r.t. the normalised values, then back through the normalisation (as the Triton
    // kernel: standardised ∂/∂x = r·(g − mean g − y·mean(g·y)); l2 ∂/∂x = r·(g − y·⟨y, g⟩))
    float mean_gs = 0, mean_gys = 0, mean_gt = 0, mean_gyt = 0, dot_s = 0, dot_t = 0;
    if (a.normalize != kNormalizeNone) {
        GroupSum sum_gs, sum_gys, sum_gt, sum_gyt;
        for_each_run(a, g, [&](const Run& r) {
            for (int64_t i = 0; i < r.length; i += kLanes) {
                const int n = lanes(r, i);
                const Chunk k = normalized_chunk(a, r, i, n, z);
                const vf grad = loss_gradient(a, k, scale);
                const vi present = k.m != 0.0f;
                sum_gs.add(present ? grad : splat(0.0f));
                sum_gys.add(present ? grad * k.ys : splat(0.0f));
                sum_gt.add(present ? -grad : splat(0.0f));
                sum_gyt.add(present ? -grad * k.yt : splat(0.0f));
            }
        });
        const float safe = z.count > 1.0f ? z.count : 1.0f;
        dot_s = sum_gys.value();
        dot_t = sum_gyt.value();
        mean_gs = sum_gs.value() / safe;
        mean_gys = dot_s / safe;
        mean_gt = sum_gt.value() / safe;
        mean_gyt = dot_t / safe;
    }
    for_each_run(a, g, [&](const Run& r) {
        for (int64_t i = 0; i < r.length; i += kLanes) {
            const int n = lanes(r, i);
            const Chunk k = normalized_chunk(a, r, i, n, z);
            const vf grad = loss_gradient(a, k, scale);
            vf grad_s, grad_t;
            if (a.normalize == kNormalizeStandardize) {
                grad_s = z.scale_s * (grad - mean_gs - k.ys * mean_gys);
                grad_t = z.scale_t * (-grad - mean_gt - k.yt * mean_gyt);
            } else if (a.normalize == kNormalizeL2) {
                grad_s = z.scale_s * (grad - (z.norm_s > kFeatureL2Eps ? k.ys * dot_s : splat(0.0f)));
                grad_t = z.scale_t * (-grad - (z.norm_t > kFeatureL2Eps ? k.yt * dot_t : splat(0.0f)));
            } else {
                grad_s = grad;
                grad_t = k.clipped ? splat(0.0f) : -grad;  // the margin, not t, sets the target there
            }
            const vi present = k.m != 0.0f;
            store_run(a.grad_student, r.gs + i * r.gs_step, r.gs_step, n, present ? grad_s : splat(0.0f));
            if (teacher_grad) {
                store_run(a.grad_teacher, r.gt + i * r.gt_step, r.gt_step, n, present ? grad_t : splat(0.0f));
            }
        }
    });
}

// One block of the flat pass (FeatureFlatArgs): Σ term over [begin, end), gradients stored on the way.
template <int Kind>
float flat_block(const FeatureFlatArgs& args, int64_t begin, int64_t end) {
    const FeatureFlatArgs a = args;  // a local copy: the compiler keeps it in registers across the stores below
    GroupSum sum;
    auto chunk = [&](int64_t i, int n) {
        const vf d =
            load_lanes(a.student, a.student_dtype, i, n, 0.0f) - load_lanes(a.teacher, a.teacher_dtype, i, n, 0.0f);
        vf term, slope;
        term_and_slope(Kind, a.beta, d, &term, &slope);  // lanes past n: d = 0, a term of 0
        sum.add(term);
        const vf grad = a.grad_scale * slope;
        if (a.grad_student != nullptr) store_lanes(a.grad_student, a.student_dtype, i, n, grad);
        if (a.grad_teacher != nullptr) store_lanes(a.grad_teacher, a.teacher_dtype, i, n, -grad);
    };
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) chunk(i, kLanes);  // whole vectors: n is a constant here
    if (i < end) chunk(i, static_cast<int>(end - i));
    return sum.value();
}

template <int Kind>
void feature_flat_kind(const FeatureFlatArgs& a) {
    const int64_t blocks = (a.count + kFeatureFlatBlock - 1) / kFeatureFlatBlock;
#pragma omp parallel num_threads(a.num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t end = (b + 1) * kFeatureFlatBlock;
            a.block_sums[b] = flat_block<Kind>(a, b * kFeatureFlatBlock, end < a.count ? end : a.count);
        }
        store_fence();
    }
}

void feature_flat(const FeatureFlatArgs& a) {
    switch (a.kind) {
        case kKindMSE: return feature_flat_kind<kKindMSE>(a);
        case kKindL1: return feature_flat_kind<kKindL1>(a);
        default: return feature_flat_kind<kKindSmoothL1>(a);
    }
}

int64_t feature_groups(const FeatureArgs& a) {
    switch (static_cast<FeatureGroup>(a.group)) {
        case kGroupChannel: return a.num_n * a.num_c;
        case kGroupPosition: return a.num_n * a.num_s;
        case kGroupSample: return a.num_n;
    }
    return 0;
}

void feature_forward(const FeatureArgs& args) {
    const int64_t groups = feature_groups(args);
#pragma omp parallel for schedule(dynamic, 16) num_threads(args.num_threads)
    for (int64_t g = 0; g < groups; ++g) feature_forward_group(args, g);
}

void feature_backward(const FeatureArgs& args) {
    const int64_t groups = feature_groups(args);
#pragma omp parallel num_threads(args.num_threads)
    {
#pragma omp for schedule(dynamic, 16)
        for (int64_t g = 0; g < groups; ++g) feature_backward_group(args, g);
        store_fence();  // each thread orders its own streaming stores
    }
}

}  // namespace
}  // namespace FASTKD_ISA
}  // namespace fastkd
