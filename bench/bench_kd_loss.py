"""pytest-benchmark micro-benchmarks of kd_loss forward+backward against the eager expression and torch.compile.

    pytest bench --benchmark-enable                     # time them (CUDA when available, else CPU)
    pytest bench                                        # what CI runs: the small cases once, as a smoke test

On CPU fastkd runs its C++ backend. "fastkd, 0.5*loss" scales the loss before the backward, as α·KD code does:
on CPU the backward then rescales the gradient the forward wrote (one more pass over it). For tables with
roofline and memory use ``fastkd bench`` (bench/RESULTS.md).
"""

import pytest
import torch

import fastkd
from fastkd.bench import eager_kd, float64_truth, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(256, 100), (1024, 1000), (2048, 32000)] if DEVICE == "cpu" else [(1024, 1000), (8192, 32000)]
SMOKE_TEST_ELEMENTS = 2**21  # larger shapes run only when benchmarking is enabled
TEMPERATURE = 4.0
IMPLEMENTATIONS = {
    "fastkd": lambda s, t: fastkd.kd_loss(s, t, temperature=TEMPERATURE),
    "fastkd, 0.5*loss": lambda s, t: 0.5 * fastkd.kd_loss(s, t, temperature=TEMPERATURE),
    "eager": lambda s, t: eager_kd(s, t, TEMPERATURE),
    "compile": torch.compile(lambda s, t: eager_kd(s, t, TEMPERATURE), dynamic=False),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_kd_loss_forward_backward(benchmark, implementation, shape):
    if benchmark.disabled and shape[0] * shape[1] > SMOKE_TEST_ELEMENTS:
        pytest.skip("a timing shape: run with --benchmark-enable")
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    s = (torch.randn(shape, device=DEVICE) * 2).to(dtype).requires_grad_(True)
    t = (torch.randn(shape, device=DEVICE) * 2).to(dtype)
    fn = IMPLEMENTATIONS[implementation]

    def step():
        grad = torch.autograd.grad(fn(s, t), s)[0]
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return grad

    grad = benchmark(step)
    _, want = float64_truth(s, t, TEMPERATURE)
    if implementation == "fastkd, 0.5*loss":
        want = want * 0.5
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert relative_error(grad, want) < tolerance
