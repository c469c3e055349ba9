"""fastkd forward+backward time for each divergence, with and without the cross-entropy term (CUDA).

python bench/divergences.py [ROWS VOCAB]
"""

import sys

import torch
import triton.testing

import fastkd

rows, vocab = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (8192, 32000)
s = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
t = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
labels = torch.randint(0, vocab, (rows,), device="cuda")
print(f"fastkd fwd+bwd median, {rows}x{vocab} bf16, T=4, {torch.cuda.get_device_name()}")
for divergence in fastkd.kd.DIVERGENCES:
    for ce_weight in (0.0, 0.5):

        def step():
            loss = fastkd.kd_loss(s, t, temperature=4.0, divergence=divergence, labels=labels, ce_weight=ce_weight)
            return torch.autograd.grad(loss, s)

        ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
        print(f"  {divergence:<11} ce_weight={ce_weight}: {ms:.3f} ms")
