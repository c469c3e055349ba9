"""The C++ CPU backend in detail: fwd+bwd of kd_loss (KL, T=4, batchmean) per instruction set, thread count and
dtype, the cost of a cold buffer pool (every call page-faults a fresh gradient), of an upstream gradient other
than 1 (0.5·loss: the backward rescales the gradient the forward wrote), and of return_stats=True in the forward.
bench/RESULTS.md quotes it.

    python bench/cpu_backend.py [--shape 2048x32000] [--reps 10]
"""

import argparse

import torch

import fastkd
from fastkd import bench, cpu_backend

CPU = torch.device("cpu")


def median_ms(fn, reps, warmup=2):
    return bench.median_ms(fn, CPU, warmup=warmup, reps=reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048x32000")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    rows, cols = (int(x) for x in args.shape.split("x"))
    gen = torch.Generator().manual_seed(0)
    base_s, base_t = torch.randn(rows, cols, generator=gen) * 2, torch.randn(rows, cols, generator=gen) * 2
    threads, isa, limit = torch.get_num_threads(), cpu_backend.isa(), cpu_backend.cache_info()["limit_bytes"]
    print(
        f"{args.shape}, T=4, batchmean; torch {torch.__version__}, usable ISAs {cpu_backend.usable_isas()}, "
        f"median of {args.reps}"
    )
    fresh = median_ms(lambda: torch.empty_like(base_s).fill_(1.0), args.reps)
    reused = torch.empty_like(base_s)
    existing = median_ms(lambda: reused.fill_(1.0), args.reps)
    print(
        f"page-fault cost of a fresh {base_s.nbytes / 1e6:.0f} MB torch tensor: torch.empty_like(x).fill_(1) "
        f"{fresh:.1f} ms, fill_(1) of an existing one {existing:.1f} ms"
    )
    print(
        f"{'isa':<9} {'dtype':<9} {'threads':>7} {'fwd ms':>8} {'fwd+stats ms':>12} {'fwd+bwd ms':>11} "
        f"{'0.5*loss ms':>12} {'cold pool ms':>12}"
    )
    for dtype in (torch.float32, torch.bfloat16):
        s, t = base_s.to(dtype).requires_grad_(True), base_t.to(dtype)
        for name in cpu_backend.usable_isas():
            for num_threads in sorted({1, threads}):
                cpu_backend.set_isa(name)
                torch.set_num_threads(num_threads)
                forward = median_ms(lambda: fastkd.kd_loss(s.detach(), t, temperature=4.0), args.reps)
                with_stats = median_ms(
                    lambda: fastkd.kd_loss(s.detach(), t, temperature=4.0, return_stats=True), args.reps
                )
                step = median_ms(lambda: torch.autograd.grad(fastkd.kd_loss(s, t, temperature=4.0), s), args.reps)
                scaled = median_ms(
                    lambda: torch.autograd.grad(0.5 * fastkd.kd_loss(s, t, temperature=4.0), s), args.reps
                )
                cpu_backend.set_cache_limit(0)
                cold = median_ms(
                    lambda: torch.autograd.grad(fastkd.kd_loss(s, t, temperature=4.0), s),
                    max(args.reps // 2, 3),
                    warmup=1,
                )
                cpu_backend.set_cache_limit(limit)
                print(
                    f"{name:<9} {str(dtype)[6:]:<9} {num_threads:>7} {forward:8.1f} {with_stats:12.1f} {step:11.1f} "
                    f"{scaled:12.1f} {cold:12.1f}",
                    flush=True,
                )
    cpu_backend.set_isa(isa)
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
