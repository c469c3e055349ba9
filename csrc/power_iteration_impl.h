// Grouped power iteration for one instruction set (see power_iteration_cpu.h): included by kd_cpu_<isa>.cpp with
// FASTKD_ISA and FASTKD_VEC_BYTES defined, after simd.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "kd_cpu.h"
#include "power_iteration_cpu.h"
#include "simd.h"

namespace fastkd {
namespace FASTKD_ISA {
namespace {

// Where each matrix's pieces sit in the flat buffers, and its number of row tiles.
struct PowerLayout {
    std::vector<int64_t> u_offset, v_offset, partial_offset, tiles;
    std::vector<std::pair<int64_t, int64_t>> work;  // (matrix, tile) for every tile
};

PowerLayout power_layout(const PowerArgs& args) {
    PowerLayout layout;
    int64_t u = 0, v = 0, partial = 0;
    for (int64_t m = 0; m < static_cast<int64_t>(args.matrices.size()); ++m) {
        const PowerMatrix& w = args.matrices[m];
        const int64_t tiles = (w.rows + kPowerTileRows - 1) / kPowerTileRows;
        layout.u_offset.push_back(u);
        layout.v_offset.push_back(v);
        layout.partial_offset.push_back(partial);
        layout.tiles.push_back(tiles);
        for (int64_t t = 0; t < tiles; ++t) layout.work.emplace_back(m, t);
        u += w.rows;
        v += w.cols;
        partial += tiles * w.cols;
    }
    return layout;
}

// kRows consecutive rows: a[r] = W[r, :]·v and partial[c] += Σ_r W[r, c]·u[r], one sweep over the columns.
template <int kRows>
void power_rows(const PowerMatrix& w, int dtype, int64_t first, const float* u, const float* v, float* a,
                float* partial) {
    const char* base = static_cast<const char*>(w.data);
    const void* row[kRows];
    float scale[kRows];
    vf dot[kRows];
    for (int r = 0; r < kRows; ++r) {
        row[r] = base + (first + r) * w.row_stride * element_size(dtype);
        scale[r] = u[first + r];
        dot[r] = splat(0.0f);
    }
    for (int64_t c = 0; c < w.cols; c += kLanes) {
        const int n = static_cast<int>(w.cols - c < kLanes ? w.cols - c : kLanes);
        const vf x = load_lanes(v, kFloat32, c, n, 0.0f);
        vf sum = load_lanes(partial, kFloat32, c, n, 0.0f);
        for (int r = 0; r < kRows; ++r) {
            const vf weight = load_lanes(row[r], dtype, c, n, 0.0f);
            dot[r] += weight * x;
            sum += weight * scale[r];
        }
        if (n == kLanes) {
            vstore(partial + c, sum);
        } else {
            for (int i = 0; i < n; ++i) partial[c + i] = sum[i];
        }
    }
    for (int r = 0; r < kRows; ++r) a[first + r] = hsum(dot[r]);
}

void power_tile(const PowerMatrix& w, int dtype, int64_t tile, const float* u, const float* v, float* a,
                float* partial) {
    for (int64_t c = 0; c < w.cols; ++c) partial[c] = 0.0f;
    const int64_t end = (tile + 1) * kPowerTileRows < w.rows ? (tile + 1) * kPowerTileRows : w.rows;
    int64_t r = tile * kPowerTileRows;
    for (; r + 4 <= end; r += 4) power_rows<4>(w, dtype, r, u, v, a, partial);
    for (; r < end; ++r) power_rows<1>(w, dtype, r, u, v, a, partial);
}

// σ = ‖a‖, u ← a/σ; b = Σ_tiles partials (in tile order), v ← b/‖b‖; a vector whose new norm is ≤ eps keeps
// its previous value (u_in, v_in), so that a zero weight does not zero its state for good.
void power_finish(const PowerMatrix& w, int64_t tiles, float eps, const float* a, const float* partials,
                  const float* u_in, const float* v_in, float* sigma, float* u, float* v) {
    double squares = 0;
    for (int64_t r = 0; r < w.rows; ++r) squares += double(a[r]) * a[r];
    *sigma = static_cast<float>(std::sqrt(squares));
    const float u_scale = 1.0f / (*sigma > eps ? *sigma : eps);
    for (int64_t r = 0; r < w.rows; ++r) u[r] = *sigma > eps ? a[r] * u_scale : u_in[r];
    squares = 0;
    for (int64_t c = 0; c < w.cols; ++c) {
        float b = 0.0f;
        for (int64_t t = 0; t < tiles; ++t) b += partials[t * w.cols + c];
        v[c] = b;
        squares += double(b) * b;
    }
    const float norm = static_cast<float>(std::sqrt(squares));
    const float v_scale = 1.0f / (norm > eps ? norm : eps);
    for (int64_t c = 0; c < w.cols; ++c) v[c] = norm > eps ? v[c] * v_scale : v_in[c];
}

void power_iteration(const PowerArgs& args) {
    const PowerLayout layout = power_layout(args);
    const int64_t num_matrices = static_cast<int64_t>(args.matrices.size());
    const int64_t total_rows = layout.u_offset.back() + args.matrices.back().rows;
    const int64_t total_cols = layout.v_offset.back() + args.matrices.back().cols;
    const int64_t total_tiles = static_cast<int64_t>(layout.work.size());
    // scratch kept across calls (a training loop calls with the same shapes every step): no page faults;
    // iteration i writes its vectors to buffer i % 2 and reads those of the previous one (or the inputs)
    thread_local std::vector<float> a, partials, u_buffers[2], v_buffers[2];
    a.resize(total_rows);
    partials.resize(layout.partial_offset.back() + layout.tiles.back() * args.matrices.back().cols);
    const float* u = args.u;
    const float* v = args.v;
    for (int64_t iteration = 0; iteration < args.n_iter; ++iteration) {
        const bool last = iteration + 1 == args.n_iter;
        std::vector<float>& u_buffer = u_buffers[iteration % 2];
        std::vector<float>& v_buffer = v_buffers[iteration % 2];
        if (!last) {
            u_buffer.resize(total_rows);
            v_buffer.resize(total_cols);
        } else {
            for (int64_t c = 0; c < total_cols; ++c) args.v_prev[c] = v[c];
        }
        float* u_new = last ? args.u_out : u_buffer.data();
        float* v_new = last ? args.v_out : v_buffer.data();
        float* a_data = a.data();  // the scratch is thread_local: OpenMP workers must use the caller's
        float* partial_data = partials.data();
#pragma omp parallel num_threads(args.num_threads)
        {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < total_tiles; ++i) {
                const auto [m, tile] = layout.work[i];
                const PowerMatrix& w = args.matrices[m];
                power_tile(w, args.dtype, tile, u + layout.u_offset[m], v + layout.v_offset[m],
                           a_data + layout.u_offset[m], partial_data + layout.partial_offset[m] + tile * w.cols);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t m = 0; m < num_matrices; ++m) {
                power_finish(args.matrices[m], layout.tiles[m], args.eps, a_data + layout.u_offset[m],
                             partial_data + layout.partial_offset[m], u + layout.u_offset[m], v + layout.v_offset[m],
                             args.sigma + m, u_new + layout.u_offset[m], v_new + layout.v_offset[m]);
            }
        }
        u = u_new;
        v = v_new;
    }
}

}  // namespace
}  // namespace FASTKD_ISA
}  // namespace fastkd
