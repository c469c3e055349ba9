// The C++ CPU backend of fastkd.relational: the arguments of RKD's angle-loss kernels and of CRD's memory-bank
// scores (relational_cpu_impl.h), as fastkd/cpu_backend.py passes them. No torch headers.
//
// RKD angle, from the two (B, B) float32 distance matrices (student d, teacher d'), for the anchor i:
//   c(i, j, k) = (d_ij² + d_ik² − d_jk²)/(2·d_ij·d_ik), 0 where d_ij or d_ik is 0;  ℓ = smooth L1 (δ = 1) of c − c'.
//   forward:  Σ over all B³ triplets of ℓ (each anchor's sum on one thread, the anchors summed in float64 in order)
//   backward: with g = clamp(c − c', −1, 1)·scale, ∂/∂d_jk = −d_jk·Σ_i g(i, j, k)/(d_ij·d_ik) and
//             ∂/∂d_ij += 2·Σ_k g(i, j, k)·(1/d_ik − c(i, j, k)/d_ij), both from one pass in which each thread owns
//             a class j (no atomics; results independent of the thread count).
// CRD, for a bank (N, d) and B query rows: scores[b, c] = ⟨bank[index[b, c]], query[b]⟩ (gather-dot) and
// grad_query[b] = Σ_c grad[b, c]·bank[index[b, c]] (scatter-dot), reading the bank rows in place; and both from one
// read of each row (score-grad), where grad[b, c] is CRD's NCE gradient of the score itself: with
// x = exp(u/τ)/Z, −noise·scale/(x + noise) for the positive (c = 0) and x·scale/(x + noise) for the others.
#pragma once
#include <cstdint>

#include "kd_args.h"  // the dtype codes and Rows

namespace fastkd {

struct RKDAngleArgs {
    const float* student = nullptr;  // (num, num) distances, row stride `row_stride`, unit column stride
    const float* teacher = nullptr;
    int64_t num = 0, row_stride = 0;
    float* loss = nullptr;  // forward: the sum of ℓ, one float
    float scale = 0;        // backward: the factor of g
    float* grad = nullptr;  // backward: (num, num) contiguous, ∂(scale·Σ ℓ)/∂d
    int num_threads = 1;
};

struct BankDotArgs {
    Rows bank;                     // (num_bank_rows, dim), unit column stride
    int64_t num_bank_rows = 0, dim = 0;
    const int64_t* index = nullptr;  // (num_queries, num_contrast), contiguous, values in [0, num_bank_rows)
    int64_t num_queries = 0, num_contrast = 0;
    const float* query = nullptr;  // gather-dot: (num_queries, dim) contiguous float32
    float* scores = nullptr;       // gather-dot: (num_queries, num_contrast) contiguous float32
    const float* grad = nullptr;   // scatter-dot: (num_queries, num_contrast) contiguous float32
    float* grad_query = nullptr;   // scatter-dot: (num_queries, dim) contiguous float32
    // score-grad: 1/τ, 1/Z, noise = K/N + ε and scale = 1/(τB) (writes scores and grad_query)
    float inv_temperature = 1, inv_normalizer = 1, noise = 0, grad_scale = 0;
    int num_threads = 1;
};

}  // namespace fastkd
