"""Where the time of a small kd_loss step goes: host time per call of each layer, from the Triton launch up
to forward+backward through autograd, next to the eager expression (CUDA).

    python bench/profile_overhead.py [ROWS VOCAB]
"""

import sys
import time

import torch

import fastkd
from fastkd.bench import eager_kd
from fastkd.kernel_args import KDOptions
from fastkd.kernels import kd

rows, vocab = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (256, 100)
s = torch.randn(rows, vocab, device="cuda", requires_grad=True)
t = torch.randn(rows, vocab, device="cuda")
options = KDOptions(temperature=4.0, divergence="kl", beta=0.5, ignore_index=-100, ce_weight=0.0, kd_scale=16.0)
_, stats, _ = kd.kd_forward(s, t, None, options)
grad_loss = torch.ones(1, device="cuda").expand(rows)


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


cases = {
    "triton forward launch": lambda: kd.kd_forward(s, t, None, options),
    "triton backward launch": lambda: kd.kd_backward(grad_loss, s, t, None, stats, options, teacher_grad=False),
    "custom op forward": lambda: torch.ops.fastkd.kd_loss_rows(
        s.detach(), t, None, 4.0, "kl", 0.5, -100, 0.0, 16.0, 1.0, "triton", False
    ),
    "kd_loss forward (no grad)": lambda: fastkd.kd_loss(s.detach(), t, temperature=4.0),
    "kd_loss forward (grad mode)": lambda: fastkd.kd_loss(s, t, temperature=4.0),
    "kd_loss fwd+bwd autograd.grad": lambda: torch.autograd.grad(fastkd.kd_loss(s, t, temperature=4.0), s),
    "eager fwd+bwd autograd.grad": lambda: torch.autograd.grad(eager_kd(s, t, 4.0), s),
    "torch.sum fwd+bwd autograd.grad": lambda: torch.autograd.grad(s.sum(), s),
}
print(f"host time per call, {rows}x{vocab} fp32, {torch.cuda.get_device_name()}")
for name, fn in cases.items():
    print(f"  {name:<34} {host_us(fn):8.1f} us")

with torch.profiler.profile(
    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
) as prof:
    for _ in range(50):
        torch.autograd.grad(fastkd.kd_loss(s, t, temperature=4.0), s)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
