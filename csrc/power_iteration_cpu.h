// The C++ CPU backend of fastkd.lipschitz.spectral_norms: grouped power iteration over a list of matrices.
//
// One iteration, per matrix W (rows × cols, unit column stride) from unit vectors u, v, reading W once:
//   a = W v,  b = Wᵀ u,  σ = ‖a‖,  u ← a / σ,  v ← b / ‖b‖  (a vector whose new norm is ≤ eps is kept)
// (the algorithm of kernels/lipschitz.py). Rows are cut into tiles of kPowerTileRows; the tiles of all matrices
// are shared out among OpenMP threads, each tile writing its rows of a and its own partial Σ_rows W u per column,
// which are then summed in tile order: the results do not depend on the thread count.
#pragma once
#include <cstdint>
#include <vector>

namespace fastkd {

constexpr int64_t kPowerTileRows = 64;

struct PowerMatrix {
    const void* data = nullptr;
    int64_t rows = 0, cols = 0, row_stride = 0;
};

struct PowerArgs {
    std::vector<PowerMatrix> matrices;  // one dtype for all
    int dtype = 0;                      // DType of kd_cpu.h
    int64_t n_iter = 1;
    float eps = 1e-12f;
    // float32, flat over the matrices in order: u, v (inputs), and the outputs σ (one per matrix), the new u and v,
    // and the v the last iteration started from
    const float* u = nullptr;
    const float* v = nullptr;
    float* sigma = nullptr;
    float* u_out = nullptr;
    float* v_out = nullptr;
    float* v_prev = nullptr;
    int num_threads = 1;
};

}  // namespace fastkd
