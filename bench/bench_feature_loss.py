"""pytest-benchmark: fastkd.feature_loss against the eager expression users write for a masked, channel-
standardised MSE between feature maps (forward + backward).

    pytest bench/bench_feature_loss.py --benchmark-enable    # time them (CUDA when available, else CPU)
    pytest bench/bench_feature_loss.py                       # what CI runs: each once, as a smoke test

On CUDA the shape is the issue's 256×256×28×28 bf16 map. On CPU fastkd runs its reference implementation (there
is no C++ feature kernel yet), so the CPU figures compare two PyTorch expressions.
"""

import pytest
import torch

import fastkd
from fastkd.bench import eager_feature_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE, DTYPE = ((256, 256, 28, 28), torch.bfloat16) if DEVICE == "cuda" else ((16, 64, 14, 14), torch.float32)


IMPLEMENTATIONS = {
    "fastkd": lambda s, t, m: fastkd.feature_loss(s, t, mask=m, normalize="channel"),
    "eager": eager_feature_loss,
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_feature_loss_forward_backward(benchmark, implementation):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(SHAPE, generator=g).to(DEVICE, DTYPE).requires_grad_()
    t = torch.randn(SHAPE, generator=g).to(DEVICE, DTYPE)
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.2).to(DEVICE, torch.float32)
    fn = IMPLEMENTATIONS[implementation]
    expected = eager_feature_loss(s.double(), t.double(), mask.double())
    assert abs(fn(s, t, mask).item() - expected.item()) <= 1e-2 * abs(expected.item())

    def step():
        grad = torch.autograd.grad(fn(s, t, mask), s)[0]
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return grad

    benchmark(step)
