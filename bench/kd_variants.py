"""What kd_loss's variants cost next to the plain one-teacher loss (issue 3's GPU targets): an ensemble of K
teachers (prob and logit), a TopK teacher, and return_stats on the forward. Medians (CUDA: triton.testing.do_bench
with the L2 flushed; CPU: wall clock), peak extra memory, and on CUDA the share of the memory roofline from a copy
bandwidth measured in the same run.

    python bench/kd_variants.py [--shape 4096x32000:bf16] [--teachers 4] [--topk 64] [--reps 20] [--json PATH]

The roofline counts what each variant must move at least: forward + backward read the student and every teacher
row once each, and write the student gradient (the prob ensemble's forward reads its K teacher rows twice, for
the normalisers first; that second read is not counted as necessary). Defaults: 4096×32000 bf16 on CUDA,
256×4000 fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json

import torch

import fastkd
from fastkd.bench import copy_bandwidth_gbs, environment, median_ms, parse_shape, peak_extra_mib


def variants(student, teachers, topk, labels, temperature):
    """name -> (forward, forward+backward, elements read or written at least per fwd+bwd, per row entry)."""
    teacher = teachers[0]
    k = teachers.shape[0]

    def loss(t, **options):
        return fastkd.kd_loss(student, t, temperature=temperature, labels=labels, **options)

    def pair(t, **options):
        def forward():
            with torch.no_grad():
                return loss(t, **options)

        return forward, lambda: torch.autograd.grad(loss(t, **options), student)

    plain = pair(teacher)
    stats = pair(teacher, return_stats=True)
    return {
        "one teacher": (*plain, 5),  # fwd: s, t; bwd: s, t, ∂s
        "one teacher + return_stats": (stats[0], None, 2),
        f"ensemble prob K={k}": (*pair(teachers, ensemble="prob"), 2 * (1 + k) + 1),
        f"ensemble logit K={k}": (*pair(teachers, ensemble="logit"), 2 * (1 + k) + 1),
        f"TopK K={topk.values.shape[-1]} bucket": (*pair(topk), 3),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape")
    parser.add_argument("--teachers", type=int, default=4)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, cols, dtype = parse_shape(args.shape or ("4096x32000:bf16" if device.type == "cuda" else "256x4000:fp32"))
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(rows, cols, generator=gen) * 2).to(device, dtype).requires_grad_(True)
    teachers = (torch.randn(args.teachers, rows, cols, generator=gen) * 2).to(device, dtype)
    labels = torch.randint(0, cols, (rows,), generator=gen).to(device)
    topk = fastkd.topk_teacher(teachers[0], args.topk)
    bandwidth = copy_bandwidth_gbs(device) if device.type == "cuda" else None
    env = environment(device)
    print(f"kd_variants: {env}, shape {rows}x{cols} {dtype}, T={args.temperature}, copy bandwidth {bandwidth} GB/s")
    table = []
    for name, (forward, forward_backward, elements) in variants(
        student, teachers, topk, labels, args.temperature
    ).items():
        fwd = median_ms(forward, device, reps=args.reps)
        both = median_ms(forward_backward, device, reps=args.reps) if forward_backward else None
        timed = both if both is not None else fwd
        roofline = None
        if bandwidth:
            roofline = rows * cols * elements * student.element_size() / (bandwidth * 1e9) / (timed * 1e-3)
        memory = peak_extra_mib(forward_backward or forward, device)
        table.append(
            dict(variant=name, forward_ms=fwd, forward_backward_ms=both, peak_extra_mib=memory, roofline=roofline)
        )
    base = table[0]
    print(f"{'variant':<28} {'fwd ms':>8} {'fwd+bwd ms':>10} {'× one':>6} {'peak MiB':>9} {'roofline':>8}")
    for row in table:
        ratio = (
            row["forward_backward_ms"] / base["forward_backward_ms"]
            if row["forward_backward_ms"]
            else row["forward_ms"] / base["forward_ms"]
        )
        row["ratio_to_one_teacher"] = ratio
        both = f"{row['forward_backward_ms']:.3f}" if row["forward_backward_ms"] else "—"
        memory = f"{row['peak_extra_mib']:.0f}" if row["peak_extra_mib"] is not None else "—"
        roofline = f"{100 * row['roofline']:.0f}%" if row["roofline"] else "—"
        print(f"{row['variant']:<28} {row['forward_ms']:>8.3f} {both:>10} {ratio:>6.2f} {memory:>9} {roofline:>8}")
    report = dict(
        environment=env,
        shape=[rows, cols, str(dtype)],
        temperature=args.temperature,
        copy_bandwidth_gbs=bandwidth,
        results=table,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
