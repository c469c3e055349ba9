"""Host overhead of kd_loss on CPU at classification shapes: µs per call, forward alone and forward+backward
through autograd, fastkd (its default backend) against the eager expression; medians of 5 runs of many calls.

    python bench/overhead_cpu.py [THREADS]        (default 1)
"""

import statistics
import sys
import time

import torch

import fastkd
from fastkd.bench import eager_kd

SHAPES = [(8, 10), (128, 100), (256, 100), (256, 1000), (1024, 1000)]


def median_us(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"kd_loss (T = 4, batchmean) on CPU, {threads} thread(s), fp32; µs per call, medians of 5 runs")
    print(
        f"{'shape':<11} {'fastkd f+b':>11} {'eager f+b':>10} {'ratio':>6} "
        f"{'fastkd fwd':>11} {'eager fwd':>10} {'ratio':>6}"
    )
    for shape in SHAPES:
        s, t = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
        calls = 2000 if shape[0] * shape[1] < 100_000 else 200
        fastkd_fb = median_us(lambda: torch.autograd.grad(fastkd.kd_loss(s, t, temperature=4.0), s), calls)
        eager_fb = median_us(lambda: torch.autograd.grad(eager_kd(s, t, 4.0), s), calls)
        fastkd_f = median_us(lambda: fastkd.kd_loss(s.detach(), t, temperature=4.0), calls)
        eager_f = median_us(lambda: eager_kd(s.detach(), t, 4.0), calls)
        print(
            f"{'x'.join(map(str, shape)):<11} {fastkd_fb:11.1f} {eager_fb:10.1f} {fastkd_fb / eager_fb:6.2f} "
            f"{fastkd_f:11.1f} {eager_f:10.1f} {fastkd_f / eager_f:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
