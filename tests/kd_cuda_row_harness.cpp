// Runs the CUDA kd_loss kernels' row math (csrc/kd_cuda_row.h) on the host, with their work split: the chunks each
// thread of a row's block folds, the warps' butterfly merges and the merge of the warps' states in warp 0. The
// loads (16-byte vectors, alignment) and the shuffles themselves are the GPU's and are not emulated.
//
// Usage: kd_cuda_row_harness IN OUT. IN holds, little-endian: int64 rows, cols, vec, reverse, has_labels,
// ignore_index; float32 inv_temperature, kd_scale, ce_weight; then float32 student and teacher (rows × cols),
// int64 labels (rows, when has_labels) and float32 grad_loss (rows). OUT gets float32 loss (rows), stats
// (8 × rows), grad_student and grad_teacher (rows × cols).
#include <cstdint>
#include <cstdio>
#include <vector>

#include "kd_cuda_row.h"

using namespace fastkd::cuda_row;

namespace {

template <typename T>
std::vector<T> read(FILE* f, size_t n) {
    std::vector<T> v(n);
    if (n && fread(v.data(), sizeof(T), n, f) != n) throw "short input";
    return v;
}

// The merged state the block's thread 0 holds after block_merge (kd_cuda.cu).
OnlineRow block_merge(std::vector<OnlineRow> lanes, const Options& o) {
    const int threads = static_cast<int>(lanes.size());
    auto butterfly = [&](std::vector<OnlineRow>& warp_lanes, int first) {
        for (int mask = kWarp / 2; mask > 0; mask >>= 1) {
            std::vector<OnlineRow> before(warp_lanes.begin() + first, warp_lanes.begin() + first + kWarp);
            for (int lane = 0; lane < kWarp; ++lane) {
                warp_lanes[first + lane] = merge(before[lane], before[lane ^ mask], o);
            }
        }
    };
    std::vector<OnlineRow> partial(kWarp, empty_row());
    for (int warp = 0; warp < threads / kWarp; ++warp) {
        butterfly(lanes, warp * kWarp);
        partial[warp] = lanes[warp * kWarp];
    }
    butterfly(partial, 0);
    return partial[0];
}

template <int VEC>
OnlineRow fold_row(const float* s, const float* t, int64_t cols, int threads, const Options& o) {
    std::vector<OnlineRow> lanes(threads, empty_row());
    for (int64_t chunk = 0; chunk_start<VEC, kUnroll>(chunk, 0, threads) < cols; ++chunk) {
        for (int tid = 0; tid < threads; ++tid) {
            float sv[VEC * kUnroll], tv[VEC * kUnroll];
            const int64_t start = chunk_start<VEC, kUnroll>(chunk, tid, threads);
            for (int u = 0; u < kUnroll; ++u) {
                for (int i = 0; i < VEC; ++i) {
                    const int64_t at = start + vector_offset<VEC>(u, threads) + i;
                    sv[u * VEC + i] = at < cols ? s[at] : -kInf;
                    tv[u * VEC + i] = at < cols ? t[at] : -kInf;
                }
            }
            fold(lanes[tid], sv, tv, o);
        }
    }
    return block_merge(lanes, o);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = fopen(argv[1], "rb");
    FILE* out = fopen(argv[2], "wb");
    if (!in || !out) return 3;
    try {
        const auto header = read<int64_t>(in, 6);
        const int64_t rows = header[0], cols = header[1], vec = header[2], ignore_index = header[5];
        const auto scalars = read<float>(in, 3);
        const Options o{scalars[0], header[3] != 0, scalars[1] != 0.0f, scalars[2] != 0.0f};
        const auto student = read<float>(in, rows * cols), teacher = read<float>(in, rows * cols);
        const auto labels = read<int64_t>(in, header[4] ? rows : 0);
        const auto grad_loss = read<float>(in, rows);
        std::vector<float> loss(rows), stats(fastkd::kNumStats * rows), grad_s(rows * cols), grad_t(rows * cols);
        const int threads = threads_per_row(cols, static_cast<int>(vec));
        for (int64_t r = 0; r < rows; ++r) {
            const Label label = row_label(header[4] ? labels.data() : nullptr, r, cols, ignore_index);
            const float* s = &student[r * cols];
            const float* t = &teacher[r * cols];
            OnlineRow state = empty_row();
            if (label.counted) {
                state = vec == 8 ? fold_row<8>(s, t, cols, threads, o)
                                 : vec == 4 ? fold_row<4>(s, t, cols, threads, o) : fold_row<1>(s, t, cols, threads, o);
            }
            const float target = label.counted && label.ok && o.has_ce ? s[label.index] : 0.0f;
            float row_stats[fastkd::kNumStats];
            loss[r] = finish(state, label, target, scalars[1], scalars[2], o, row_stats);
            for (int i = 0; i < fastkd::kNumStats; ++i) stats[i * rows + r] = row_stats[i];
        }
        for (int64_t r = 0; r < rows; ++r) {
            const Label label = row_label(header[4] ? labels.data() : nullptr, r, cols, ignore_index);
            const RowGradient g = row_gradient(stats.data(), r, rows, grad_loss[r], label, scalars[1], scalars[2], o);
            for (int64_t c = 0; c < cols && label.counted; ++c) {
                gradient(student[r * cols + c], teacher[r * cols + c], c == label.index, g, o, grad_s[r * cols + c],
                         grad_t[r * cols + c]);
            }
        }
        for (const auto* v : {&loss, &stats, &grad_s, &grad_t}) fwrite(v->data(), sizeof(float), v->size(), out);
    } catch (const char* error) {
        fprintf(stderr, "%s\n", error);
        return 4;
    }
    fclose(out);
    return 0;
}
