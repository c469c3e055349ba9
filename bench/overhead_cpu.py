"""Host overhead of kd_loss on CPU at classification shapes: µs per call, forward alone and forward+backward
through autograd, fastkd (its default backend) against the eager expression, medians of 5 runs of many calls.

    python bench/overhead_cpu.py [THREADS]        (default 1)
"""

import torch, time, statistics, sys, fastkd
from fastkd.bench import eager_kd

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)


def us(fn, n=2000):
    for _ in range(200):
        fn()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(ts)


for shape in [(8, 10), (128, 100), (256, 100), (256, 1000), (1024, 1000)]:
    s = torch.randn(*shape, requires_grad=True)
    t = torch.randn(*shape)
    n = 2000 if shape[0] * shape[1] < 100000 else 200
    r = dict(
        fk_fb=us(lambda: torch.autograd.grad(fastkd.kd_loss(s, t, temperature=4.0), s), n),
        ea_fb=us(lambda: torch.autograd.grad(eager_kd(s, t, 4.0), s), n),
        fk_f=us(lambda: fastkd.kd_loss(s.detach(), t, temperature=4.0), n),
        ea_f=us(lambda: eager_kd(s.detach(), t, 4.0), n),
    )
    print(
        shape,
        " ".join(f"{k}={v:.1f}" for k, v in r.items()),
        f"fb ratio {r['fk_fb'] / r['ea_fb']:.2f} f ratio {r['fk_f'] / r['ea_f']:.2f}",
        flush=True,
    )
