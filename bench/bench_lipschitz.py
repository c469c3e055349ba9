"""pytest-benchmark: spectral norms of every Linear/Conv weight of a ResNet-18-sized model, one fused power
iteration (fastkd.lipschitz.spectral_norms, n_iter=1 with a persistent state, as a training step runs it) against
a per-layer PyTorch loop doing the same iteration (W v and Wᵀ u per layer: two reads of each weight).

    pytest bench/bench_lipschitz.py --benchmark-enable     # time them (CUDA when available, else CPU)
    pytest bench/bench_lipschitz.py                        # what CI runs: each once, as a smoke test

``fastkd bench --op lipschitz`` gives the same comparison as a table, with the roofline and an agreement check.
"""

import pytest
import torch

from fastkd.bench import power_iteration_steps, resnet18_weights

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("name", ["fastkd", "per-layer torch loop"])
def test_spectral_norms_resnet18(benchmark, name):
    step = power_iteration_steps(resnet18_weights(torch.float32, DEVICE))[name]

    def run():
        sigma = step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return sigma

    assert torch.isfinite(benchmark(run)).all()
