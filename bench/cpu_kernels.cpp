// The C++ CPU kernels timed without Python: forward, forward with the fused gradient, forward with the fidelity
// metrics, and the backward kernel, at 2048×32000 fp32 (KL, T=4), AVX-512. bench/RESULTS.md quotes it for the
// effect of -fwrapv (Python's default compile flag) on the vector loops. Build and run from the repository root:
//
//   g++ -std=c++17 -O3 -ffp-contract=fast -fopenmp -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma \
//       bench/cpu_kernels.cpp csrc/kd_cpu_avx512.cpp -o /tmp/cpu_kernels && /tmp/cpu_kernels 2
//   (add -fwrapv to see its effect)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../csrc/kd_cpu.h"

using namespace fastkd;

int main(int argc, char** argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
    const int64_t rows = 2048, cols = 32000;
    std::vector<float> s(rows * cols), t(rows * cols), grad(rows * cols);
    std::mt19937 rng(0);
    std::normal_distribution<float> normal(0.0f, 2.0f);
    for (int64_t i = 0; i < rows * cols; ++i) {
        s[i] = normal(rng);
        t[i] = normal(rng);
    }
    std::vector<float> loss(rows), stats(kNumStats * rows), metrics(kNumMetrics * rows), grad_loss(rows, 1.0f / rows);
    KDArgs args;
    args.student = {s.data(), kFloat32, cols};
    args.teacher = {t.data(), kFloat32, cols};
    args.num_rows = rows;
    args.num_cols = cols;
    args.inv_temperature = 0.25f;
    args.kd_scale = 16.0f;
    args.loss = loss.data();
    args.stats = stats.data();
    args.grad_loss = grad_loss.data();
    args.grad_student = grad.data();
    args.num_threads = threads;
    KDArgs fused = args, with_metrics = args;
    fused.fused_grad_student = grad.data();
    fused.grad_scale = 1.0f / rows;
    with_metrics.metrics = metrics.data();
    auto median_ms = [](auto fn) {
        std::vector<double> times;
        for (int r = 0; r < 7; ++r) {
            const auto start = std::chrono::steady_clock::now();
            fn();
            times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3);
        }
        std::sort(times.begin(), times.end());
        return times[3];
    };
    if (avx512::isa.forward == nullptr || !avx512::isa.cpu_supports()) {
        std::printf("no AVX-512 kernels here\n");
        return 1;
    }
    std::printf("%d threads: forward %.1f ms, forward+fused gradient %.1f ms, forward+metrics %.1f ms, "
                "backward %.1f ms\n", threads, median_ms([&] { avx512::isa.forward(args); }),
                median_ms([&] { avx512::isa.forward(fused); }), median_ms([&] { avx512::isa.forward(with_metrics); }),
                median_ms([&] { avx512::isa.backward(args); }));
}
