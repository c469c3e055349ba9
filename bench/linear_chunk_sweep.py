"""linear_kd_loss forward+backward time against chunk_rows, and against materialised logits + kd_loss, on CPU.

    python bench/linear_chunk_sweep.py [N H V] [chunk_rows ...]     (default 4096 1024 32000, 128 512 1024)

Prints the median of 3 timed calls (after one warm-up) per variant. The default chunk rule of
fastkd.linear_kd.default_chunk_rows quotes these figures.
"""

import statistics
import sys
import time

import torch

import fastkd


def main(argv):
    numbers = [int(x) for x in argv]
    rows, hidden, vocab = numbers[:3] if len(numbers) >= 3 else (4096, 1024, 32000)
    chunks = numbers[3:] or [128, 512, 1024]
    torch.manual_seed(0)
    h = torch.randn(rows, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 2 / hidden**0.5).requires_grad_()
    th, tw = torch.randn(rows, hidden), torch.randn(vocab, hidden) * 2 / hidden**0.5

    def materialised():
        with torch.no_grad():
            teacher = th @ tw.T
        return torch.autograd.grad(fastkd.kd_loss(h @ w.T, teacher, temperature=4.0), (h, w))

    variants = [("logits + kd_loss", materialised)]
    for chunk in chunks:
        variants.append(
            (
                f"chunk_rows={chunk}",
                lambda c=chunk: torch.autograd.grad(
                    fastkd.linear_kd_loss(h, w, th, tw, temperature=4.0, chunk_rows=c), (h, w)
                ),
            )
        )
    print(f"{rows}x{hidden}x{vocab} fp32, {torch.get_num_threads()} threads, forward+backward median of 3")
    for name, step in variants:
        step()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(f"{name:<20} {statistics.median(times):8.3f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
