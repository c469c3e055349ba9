"""µs per kd_loss(s, t, temperature=2.0, divergence=d).backward() on CPU, 1 thread, at 8×10 and 256×1000, for kl and
jsd: medians of 7 blocks (200 calls at 8×10, 20 at 256×1000) after 20 warm-up calls. Give it the root of a checkout
to compare two versions in alternating processes (bench/RESULTS.md, "Double backward: the single backward's speed"):

    python bench/single_backward_speed.py /path/to/checkout
"""

import statistics
import sys
import time

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")

import torch  # noqa: E402

import fastkd  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape in [(8, 10), (256, 1000)]:
        s = torch.randn(*shape, generator=gen).requires_grad_()
        t = torch.randn(*shape, generator=gen)
        for divergence in ["kl", "jsd"]:

            def step():
                fastkd.kd_loss(s, t, temperature=2.0, divergence=divergence).backward()

            for _ in range(20):
                step()
            calls = 200 if shape[0] == 8 else 20
            times = []
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                times.append((time.perf_counter() - start) / calls * 1e6)
            out.append(f"{shape} {divergence} {statistics.median(times):.1f}")
    print(fastkd.__file__, "|", "; ".join(out))


if __name__ == "__main__":
    main()
