// RKD's angle loss and CRD's memory-bank scores for one instruction set (see relational_cpu.h): included last by
// kd_cpu_<isa>.cpp with FASTKD_ISA and FASTKD_VEC_BYTES defined, after simd.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "kd_cpu.h"
#include "relational_cpu.h"
#include "simd.h"

namespace fastkd {
namespace FASTKD_ISA {
namespace {

// The distance matrices copied with rows padded to whole vectors (zeros past num), and their reciprocals (0 where
// a distance is 0): with them the cosine is (a² + b² − e²)·(1/2a)·(1/b), which is 0 wherever a side from the
// anchor is 0 (as in the padding) with no mask and no division in the B³ loop.
struct PaddedDistances {
    int64_t stride = 0;
    std::vector<float> student, teacher, inv_student, inv_teacher;
};

PaddedDistances pad_distances(const RKDAngleArgs& a) {
    PaddedDistances m;
    m.stride = (a.num + kLanes - 1) / kLanes * kLanes;
    const int64_t size = a.num * m.stride;
    m.student.assign(size, 0.0f);
    m.teacher.assign(size, 0.0f);
    m.inv_student.assign(size, 0.0f);
    m.inv_teacher.assign(size, 0.0f);
    for (int64_t i = 0; i < a.num; ++i) {
        for (int64_t j = 0; j < a.num; ++j) {
            // a NaN distance counts as 0, as the masks of the other backends treat it (d > 0 is false)
            const float s0 = a.student[i * a.row_stride + j], t0 = a.teacher[i * a.row_stride + j];
            const float s = s0 > 0 ? s0 : 0.0f, t = t0 > 0 ? t0 : 0.0f;
            m.student[i * m.stride + j] = s;
            m.teacher[i * m.stride + j] = t;
            m.inv_student[i * m.stride + j] = s > 0 ? 1.0f / s : 0.0f;
            m.inv_teacher[i * m.stride + j] = t > 0 ? 1.0f / t : 0.0f;
        }
    }
    return m;
}

// c(i, j, k) for a vector of k: a = d_ij (as a² and 1/(2a)), b = d_ik with 1/b, e = d_jk.
inline vf cosines(float a_squared, float half_inv_a, vf b, vf inv_b, vf e) {
    return (a_squared + b * b - e * e) * half_inv_a * inv_b;
}

inline vf smooth_l1(vf diff) {
    const vf size = vabs(diff);
    return size < 1.0f ? 0.5f * diff * diff : size - 0.5f;
}

void rkd_angle_forward(const RKDAngleArgs& a) {
    const PaddedDistances m = pad_distances(a);
    const int64_t num = a.num, stride = m.stride;
    std::vector<double> anchor_sums(num);
#pragma omp parallel for num_threads(a.num_threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < num; ++i) {
        const float* s_i = m.student.data() + i * stride;
        const float* t_i = m.teacher.data() + i * stride;
        const float* inv_s_i = m.inv_student.data() + i * stride;
        const float* inv_t_i = m.inv_teacher.data() + i * stride;
        double total = 0;
        for (int64_t j = 0; j < num; ++j) {
            const float* s_j = m.student.data() + j * stride;
            const float* t_j = m.teacher.data() + j * stride;
            const float as2 = s_i[j] * s_i[j], hs = 0.5f * inv_s_i[j];
            const float at2 = t_i[j] * t_i[j], ht = 0.5f * inv_t_i[j];
            vf sum = splat(0.0f);
            for (int64_t k = 0; k < stride; k += kLanes) {
                const vf c_s = cosines(as2, hs, vload(s_i + k), vload(inv_s_i + k), vload(s_j + k));
                const vf c_t = cosines(at2, ht, vload(t_i + k), vload(inv_t_i + k), vload(t_j + k));
                sum += smooth_l1(c_s - c_t);
            }
            total += hsum(sum);
        }
        anchor_sums[i] = total;
    }
    double total = 0;
    for (int64_t i = 0; i < num; ++i) total += anchor_sums[i];
    *a.loss = static_cast<float>(total);
}

void rkd_angle_backward(const RKDAngleArgs& a) {
    const PaddedDistances m = pad_distances(a);
    const int64_t num = a.num, stride = m.stride;
    std::vector<float> row_parts(num * num);  // [j, i]: Σ_k g·(1/d_ik − c/d_ij), added to grad[i, j] at the end
    float* parts = row_parts.data();
#pragma omp parallel num_threads(a.num_threads)
    {
        std::vector<float> pair(stride);  // Σ_i g(i, j, k)/(d_ij·d_ik) for this thread's class j
#pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < num; ++j) {
            const float* s_j = m.student.data() + j * stride;
            const float* t_j = m.teacher.data() + j * stride;
            for (int64_t k = 0; k < stride; ++k) pair[k] = 0.0f;
            for (int64_t i = 0; i < num; ++i) {
                const float* s_i = m.student.data() + i * stride;
                const float* t_i = m.teacher.data() + i * stride;
                const float* inv_s_i = m.inv_student.data() + i * stride;
                const float* inv_t_i = m.inv_teacher.data() + i * stride;
                const float inv_a = inv_s_i[j];
                if (inv_a == 0.0f) {  // d_ij = 0: c(i, j, ·) is the constant 0
                    parts[j * num + i] = 0.0f;
                    continue;
                }
                const float as2 = s_i[j] * s_i[j], hs = 0.5f * inv_a;
                const float at2 = t_i[j] * t_i[j], ht = 0.5f * inv_t_i[j];
                vf row = splat(0.0f);
                for (int64_t k = 0; k < stride; k += kLanes) {
                    const vf inv_b = vload(inv_s_i + k);
                    const vf c_s = cosines(as2, hs, vload(s_i + k), inv_b, vload(s_j + k));
                    const vf c_t = cosines(at2, ht, vload(t_i + k), vload(inv_t_i + k), vload(t_j + k));
                    // d_ik = 0 leaves 1/d_ik = 0 and c = 0: both terms vanish there, as they must
                    const vf g = vmin(vmax(c_s - c_t, splat(-1.0f)), splat(1.0f));
                    vstore(pair.data() + k, vload(pair.data() + k) + g * inv_b * inv_a);
                    row += g * (inv_b - c_s * inv_a);
                }
                parts[j * num + i] = hsum(row);
            }
            for (int64_t k = 0; k < num; ++k) a.grad[j * num + k] = -a.scale * s_j[k] * pair[k];
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < num; ++i) {
            for (int64_t j = 0; j < num; ++j) a.grad[i * num + j] += 2.0f * a.scale * parts[j * num + i];
        }
    }
}

constexpr int64_t kPrefetchAhead = 8;  // bank rows asked for this many contrast samples ahead (random reads)

constexpr int64_t kSumBlock = 128;  // weighted row sums: contrast rows summed apart before joining the total

// Where the bank's rows lie, and how to read one.
struct BankRows {
    const char* data;
    int dtype;
    int64_t row_bytes, dim, dim_bytes;

    explicit BankRows(const BankDotArgs& a)
        : data(static_cast<const char*>(a.bank.data)),
          dtype(a.bank.dtype),
          row_bytes(a.bank.row_stride * element_size(a.bank.dtype)),
          dim(a.dim),
          dim_bytes(a.dim * element_size(a.bank.dtype)) {}

    const void* row(int64_t index) const { return data + index * row_bytes; }

    void prefetch(int64_t index) const {
        const char* start = data + index * row_bytes;
        for (int64_t offset = 0; offset < dim_bytes; offset += 64) __builtin_prefetch(start + offset, 0, 3);
    }

    // ⟨row, query⟩ with a float32 query of dim entries
    float dot(const void* row, const float* query) const {
        vf sum = splat(0.0f);
        for (int64_t c = 0; c < dim; c += kLanes) {
            const int n = static_cast<int>(dim - c < kLanes ? dim - c : kLanes);
            sum += load_lanes(row, dtype, c, n, 0.0f) * load_lanes(query, kFloat32, c, n, 0.0f);
        }
        return hsum(sum);
    }

    // total[0, dim) += weight·row (total padded to whole vectors)
    void add(const void* row, float weight, float* total) const {
        for (int64_t c = 0; c < dim; c += kLanes) {
            const int n = static_cast<int>(dim - c < kLanes ? dim - c : kLanes);
            vstore(total + c, vload(total + c) + weight * load_lanes(row, dtype, c, n, 0.0f));
        }
    }
};

void bank_gather_dot(const BankDotArgs& a) {
    const BankRows bank(a);
    const int64_t total = a.num_queries * a.num_contrast;
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
    for (int64_t flat = 0; flat < total; ++flat) {
        if (flat + kPrefetchAhead < total) bank.prefetch(a.index[flat + kPrefetchAhead]);
        a.scores[flat] = bank.dot(bank.row(a.index[flat]), a.query + flat / a.num_contrast * a.dim);
    }
}

// grad_query[q] = Σ_k weight(q, k, row_k)·row_k over each query's contrast rows, a query per thread, in blocks of
// kSumBlock rows summed apart before joining the total (rounding); weight may read the row (it is in cache then).
template <typename Weight>
void sum_weighted_rows(const BankDotArgs& a, Weight weight) {
    const BankRows bank(a);
    const int64_t padded = (a.dim + kLanes - 1) / kLanes * kLanes;
#pragma omp parallel num_threads(a.num_threads)
    {
        std::vector<float> sum(padded), block(padded);
#pragma omp for schedule(static)
        for (int64_t q = 0; q < a.num_queries; ++q) {
            const int64_t* index = a.index + q * a.num_contrast;
            for (int64_t c = 0; c < padded; ++c) sum[c] = 0.0f;
            for (int64_t start = 0; start < a.num_contrast; start += kSumBlock) {
                const int64_t end = start + kSumBlock < a.num_contrast ? start + kSumBlock : a.num_contrast;
                for (int64_t c = 0; c < padded; ++c) block[c] = 0.0f;
                for (int64_t k = start; k < end; ++k) {
                    if (k + kPrefetchAhead < a.num_contrast) bank.prefetch(index[k + kPrefetchAhead]);
                    const void* row = bank.row(index[k]);
                    bank.add(row, weight(q, k, bank, row), block.data());
                }
                for (int64_t c = 0; c < padded; c += kLanes) {
                    vstore(sum.data() + c, vload(sum.data() + c) + vload(block.data() + c));
                }
            }
            for (int64_t c = 0; c < a.dim; ++c) a.grad_query[q * a.dim + c] = sum[c];
        }
    }
}

void bank_scatter_dot(const BankDotArgs& a) {
    sum_weighted_rows(a, [&](int64_t q, int64_t k, const BankRows&, const void*) {
        return a.grad[q * a.num_contrast + k];
    });
}

// The scores of the contrast rows and their NCE gradient summed over the rows, each row read once (the second
// sweep over it, in sum_weighted_rows, hits the cache).
void bank_score_grad(const BankDotArgs& a) {
    sum_weighted_rows(a, [&](int64_t q, int64_t k, const BankRows& bank, const void* row) {
        const float u = bank.dot(row, a.query + q * a.dim);
        a.scores[q * a.num_contrast + k] = u;
        const float x = std::exp(u * a.inv_temperature) * a.inv_normalizer;
        return (k == 0 ? -a.noise : x) * a.grad_scale / (x + a.noise);
    });
}

}  // namespace

// This instruction set's entry in the table of relational kernels (kd_cpu.h).
extern const CpuRelationalIsa relational_isa = {rkd_angle_forward, rkd_angle_backward, bank_gather_dot,
                                                bank_scatter_dot, bank_score_grad};

}  // namespace FASTKD_ISA
}  // namespace fastkd
