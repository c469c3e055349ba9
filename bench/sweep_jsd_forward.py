"""JSD forward under several launch configurations, and KL+CE forward (CUDA); produced the JSD
launch-configuration figures in bench/RESULTS.md.

    python bench/sweep_jsd_forward.py
"""

import torch
import triton.testing

from fastkd.kernel_args import KDOptions
from fastkd.kernels import kd

rows, vocab = 8192, 32000
s = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
t = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
o = KDOptions(temperature=4.0, divergence="jsd", beta=0.5, ignore_index=-100, ce_weight=0.0, kd_scale=16.0)
for cfg in [
    dict(BLOCK=512, num_warps=1),
    dict(BLOCK=1024, num_warps=4),
    dict(BLOCK=2048, num_warps=8),
    dict(BLOCK=4096, num_warps=16),
    dict(BLOCK=4096, num_warps=32),
    dict(BLOCK=8192, num_warps=32),
]:
    f = triton.testing.do_bench(lambda: kd.kd_forward(s, t, None, o, config=cfg), return_mode="median")
    print(cfg, f"jsd fwd {f * 1e3:.0f} us", flush=True)
o = o._replace(divergence="kl", ce_weight=0.5)
lab = torch.randint(0, vocab, (rows,), device="cuda")
for cfg in [dict(BLOCK=512, num_warps=1), dict(BLOCK=2048, num_warps=2), dict(BLOCK=4096, num_warps=4)]:
    f = triton.testing.do_bench(lambda: kd.kd_forward(s, t, lab, o, config=cfg), return_mode="median")
    print(cfg, f"kl+ce fwd {f * 1e3:.0f} us", flush=True)
