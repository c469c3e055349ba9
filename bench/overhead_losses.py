"""Host overhead of dkd_loss and feature_loss on CPU at classification shapes against the eager code they replace:
µs per forward+backward call through autograd, fastkd (its default backend) and eager interleaved round by round
(the VM's noise moves both alike; fastkd.bench.interleaved_ms), medians of 15 rounds of ~2 ms blocks.

    python bench/overhead_losses.py [THREADS]        (default 1)
"""

import sys

import torch
import torch.nn.functional as F

import fastkd
from fastkd.bench import interleaved_ms

ROUNDS = 15


def eager_dkd(s, t, labels, alpha=1.0, beta=8.0, temperature=4.0):
    """mdistiller's DKD as its code writes it (masks, a −1000 shift for the non-target softmax)."""
    gt = F.one_hot(labels, s.shape[-1]).bool()
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1)
    scale = temperature**2 / s.shape[0]
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * scale
    log_q_s = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    q_t = F.softmax(t / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * scale
    return alpha * tckd + beta * nckd


def us_per_call(fns: dict) -> dict:
    return {name: ms * 1e3 for name, ms in interleaved_ms(fns, torch.device("cpu"), ROUNDS).items()}


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"CPU, {threads} thread(s), fp32; µs per forward+backward call, medians of {ROUNDS} interleaved rounds")
    print(f"{'op':<34} {'fastkd':>8} {'eager':>8} {'ratio':>6}")
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(64, 10), (128, 100), (256, 1000)]:
        s = torch.randn(rows, cols, generator=gen, requires_grad=True)
        t, labels = torch.randn(rows, cols, generator=gen), torch.randint(0, cols, (rows,), generator=gen)
        got = us_per_call(
            {
                "fastkd": lambda: torch.autograd.grad(fastkd.dkd_loss(s, t, labels), s),
                "eager": lambda: torch.autograd.grad(eager_dkd(s, t, labels), s),
            }
        )
        name = f"dkd_loss {rows}x{cols}"
        print(f"{name:<34} {got['fastkd']:8.1f} {got['eager']:8.1f} {got['fastkd'] / got['eager']:6.2f}")
    for shape in [(64, 64, 8, 8), (256, 128, 16, 16)]:
        s = torch.randn(shape, generator=gen, requires_grad=True)
        t = torch.randn(shape, generator=gen)
        got = us_per_call(
            {
                "fastkd": lambda: torch.autograd.grad(fastkd.feature_loss(s, t), s),
                "eager": lambda: torch.autograd.grad(F.mse_loss(s, t), s),
            }
        )
        name = f"feature_loss mse {'x'.join(map(str, shape))}"
        print(f"{name:<34} {got['fastkd']:8.1f} {got['eager']:8.1f} {got['fastkd'] / got['eager']:6.2f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
