"""Sweep the kd_loss kernels' launch configuration on a GPU: BLOCK × num_warps, forward and backward apart.

    python bench/tune_kd.py [--json PATH]

Prints, per shape and kernel, the median time (triton.testing.do_bench) and the achieved bandwidth of each
configuration, best first, next to the configuration kernels.kd.launch_config picks.
"""

import argparse
import json

import torch
import triton
import triton.testing

from fastkd.kernel_args import KDOptions
from fastkd.kernels import kd

SHAPES = [
    (256, 100, torch.float32),
    (1024, 1000, torch.float32),
    (8192, 32000, torch.bfloat16),
    (4096, 128256, torch.bfloat16),
]
OPTIONS = KDOptions(temperature=4.0, divergence="kl", beta=0.5, ignore_index=-100, ce_weight=0.0, kd_scale=16.0)


def configs(num_cols):
    top = triton.next_power_of_2(num_cols)
    for block in (256, 512, 1024, 2048, 4096, 8192, 16384):
        if block > 2 * top or block < min(top, 256):
            continue
        for warps in (1, 2, 4, 8, 16, 32):
            if 32 * warps <= block:
                yield dict(BLOCK=block, num_warps=warps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    args = parser.parse_args()
    report = []
    for rows, cols, dtype in SHAPES:
        s = torch.randn(rows, cols, device="cuda", dtype=dtype)
        t = torch.randn(rows, cols, device="cuda", dtype=dtype)
        grad_loss = torch.ones(1, device="cuda").expand(rows)
        _, stats, _ = kd.kd_forward(s, t, None, OPTIONS)
        nbytes = {"forward": 2 * s.numel() * s.element_size(), "backward": 3 * s.numel() * s.element_size()}
        for kernel in ("forward", "backward"):
            timings = []
            for config in configs(cols):

                def fn():
                    if kernel == "forward":
                        return kd.kd_forward(s, t, None, OPTIONS, config=config)
                    return kd.kd_backward(grad_loss, s, t, None, stats, OPTIONS, teacher_grad=False, config=config)

                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                timings.append((ms, config))
            timings.sort(key=lambda x: x[0])
            chosen = kd.launch_config(cols, kernel, OPTIONS.divergence)
            print(f"{rows}x{cols} {dtype} {kernel}: launch_config picks {chosen}")
            for ms, config in timings[:6] + [x for x in timings if x[1] == chosen]:
                print(f"    {config}  {ms * 1e3:9.1f} us  {nbytes[kernel] / ms / 1e6:7.0f} GB/s")
            report.append(
                dict(
                    shape=[rows, cols, str(dtype)],
                    kernel=kernel,
                    timings=[dict(ms=ms, **c) for ms, c in timings],
                    chosen=chosen,
                )
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
