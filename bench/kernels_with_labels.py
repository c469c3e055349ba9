"""Kernel times with and without labels / the CE term, KL and JSD (CUDA); produced the with/without-labels
kernel figures in bench/RESULTS.md.

    python bench/kernels_with_labels.py
"""

import torch
import triton.testing

from fastkd.kernel_args import KDOptions
from fastkd.kernels import kd

rows, vocab = 8192, 32000
s = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
t = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
labels = torch.randint(0, vocab, (rows,), device="cuda")
g = torch.ones(1, device="cuda").expand(rows)
for div in ("kl", "jsd"):
    for lab, ce in ((None, 0.0), (labels, 0.0), (labels, 0.5)):
        o = KDOptions(temperature=4.0, divergence=div, beta=0.5, ignore_index=-100, ce_weight=ce, kd_scale=16.0)
        _, st, _ = kd.kd_forward(s, t, lab, o)
        f = triton.testing.do_bench(lambda: kd.kd_forward(s, t, lab, o), return_mode="median")
        b = triton.testing.do_bench(
            lambda: kd.kd_backward(g, s, t, lab, st, o, teacher_grad=False), return_mode="median"
        )
        print(
            div,
            "labels" if lab is not None else "no labels",
            ce,
            f"fwd {f * 1e3:.0f} us  bwd {b * 1e3:.0f} us",
            flush=True,
        )
