"""What a fastkd custom op's dispatch costs per call in eager mode: the kd forward kernel op called through
``torch.ops.fastkd.kd_loss_rows`` against its function called directly (what fastkd's autograd.Functions do in
eager mode since dispatch.kernel_op), interleaved in one process, 8×10 fp32 CPU tensors, 1 thread.

    python bench/custom_op_dispatch.py [BACKEND]       (default cpu; triton needs TRITON_INTERPRET=1 on CPU)
"""

import statistics
import sys
import time

import torch

import fastkd

OPTIONS = dict(temperature=4.0, divergence="kl", beta=0.5, ignore_index=-100, ce_weight=0.0, kd_scale=16.0, alpha=1.0)


def per_call_us(fn, calls: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(backend: str) -> None:
    torch.set_num_threads(1)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    kwargs = dict(OPTIONS, ensemble="none", backend=backend, with_metrics=False)
    op = lambda: torch.ops.fastkd.kd_loss_rows.default(s, t, None, None, **kwargs)  # noqa: E731
    direct = lambda: fastkd.kd._kd_loss_rows_op(s, t, None, None, **kwargs)  # noqa: E731
    for fn in (op, direct):
        per_call_us(fn, 500)
    rounds = {"through the custom op": [], "direct call": []}
    for _ in range(21):  # interleaved, so that the machine's drift hits both alike
        rounds["through the custom op"].append(per_call_us(op))
        rounds["direct call"].append(per_call_us(direct))
    print(f"kd_loss_rows forward, {backend}, 8x10 fp32, 1 thread: µs per call, median of 21 interleaved rounds")
    for name, values in rounds.items():
        print(f"  {name:<24} {statistics.median(values):7.1f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
