"""Spectral norms of every Linear/Conv weight of a ResNet-18-sized model: one fused power iteration
(fastkd.lipschitz.spectral_norms, n_iter=1 with a persistent state, as a training step runs it) against a
per-layer PyTorch loop doing the same iteration (W v and Wᵀ u per layer: two reads of each weight).

    python bench/bench_lipschitz.py [--device cpu|cuda] [--dtype fp32|bf16] [--reps N] [--json PATH]
    pytest bench/bench_lipschitz.py --benchmark-enable      # the same two, with pytest-benchmark
    pytest bench/bench_lipschitz.py                         # what CI runs: each once, as a smoke test

The roofline is the time to read every weight once at the copy bandwidth measured in the same run (bytes read
plus written, as fastkd bench counts it).
"""
import argparse
import json
import sys

import pytest
import torch

from fastkd import lipschitz
from fastkd.bench import copy_bandwidth_gbs, median_ms

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resnet18_weight_shapes() -> list:
    """The 21 Linear/Conv weight shapes of torchvision's ResNet-18 (11.7M parameters), without torchvision."""
    shapes = [(64, 3, 7, 7)]
    channels = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(width, channels if block == 0 else width, 3, 3), (width, width, 3, 3)]
            if block == 0 and (stride != 1 or channels != width):
                shapes.append((width, channels, 1, 1))
        channels = width
    return shapes + [(1000, 512)]


def make_weights(dtype: torch.dtype, device: str, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) / shape[1] ** 0.5).to(dtype).to(device)
            for shape in resnet18_weight_shapes()]


def loop_iteration(weights: list, us: list, vs: list, eps: float = 1e-12) -> torch.Tensor:
    """The same iteration as spectral_norms, layer by layer in PyTorch; updates us/vs in place, returns σ."""
    sigmas = []
    for i, w in enumerate(weights):
        matrix = w.reshape(w.shape[0], -1)
        a = torch.mv(matrix, vs[i].to(w.dtype)).float()
        b = torch.mv(matrix.T, us[i].to(w.dtype)).float()
        sigma = a.norm()
        us[i], vs[i] = a / sigma.clamp_min(eps), b / b.norm().clamp_min(eps)
        sigmas.append(sigma)
    return torch.stack(sigmas)


def implementations(weights: list) -> dict:
    """name → step(): one power iteration over the whole list, each with its own state."""
    state = [lipschitz.init_state(weights, generator=torch.Generator().manual_seed(1))]
    us = list(state[0].u.split([w.shape[0] for w in weights]))
    vs = list(state[0].v.split([w[0].numel() for w in weights]))

    def fused():
        sigma, state[0] = lipschitz.spectral_norms(weights, n_iter=1, state=state[0])
        return sigma

    return {"fastkd (one fused iteration)": fused, "per-layer torch loop": lambda: loop_iteration(weights, us, vs)}


@pytest.mark.parametrize("name", ["fastkd (one fused iteration)", "per-layer torch loop"])
def test_spectral_norms_resnet18(benchmark, name):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = make_weights(torch.float32, device)
    step = implementations(weights)[name]

    def run():
        sigma = step()
        if device == "cuda":
            torch.cuda.synchronize()
        return sigma

    assert torch.isfinite(benchmark(run)).all()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    weights = make_weights(DTYPES[args.dtype], args.device)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    bandwidth = copy_bandwidth_gbs(device)
    read_once_ms = nbytes / (bandwidth / 2 * 1e9) * 1e3  # copy bandwidth counts read + write
    steps = implementations(weights)
    # agreement before timing: 200 iterations of each reach the same σ
    fused, loop = steps.values()
    for _ in range(200):
        fused_sigma, loop_sigma = fused(), loop()
    agreement = ((fused_sigma - loop_sigma).abs() / loop_sigma).max().item()
    rows = {name: median_ms(step, device, reps=args.reps) for name, step in steps.items()}
    result = {"device": str(device), "dtype": args.dtype, "matrices": len(weights), "parameters":
              sum(w.numel() for w in weights), "weight_mb": nbytes / 1e6, "copy_bandwidth_gbs": bandwidth,
              "read_once_ms": read_once_ms, "max_relative_sigma_difference": agreement,
              "threads": torch.get_num_threads(), "median_ms": rows}
    print(f"ResNet-18 weights: {len(weights)} matrices, {result['parameters'] / 1e6:.2f}M parameters, "
          f"{nbytes / 1e6:.1f} MB {args.dtype}, {device}, {torch.get_num_threads()} threads; copy bandwidth "
          f"{bandwidth:.1f} GB/s → reading every weight once: {read_once_ms:.3f} ms; σ agree to {agreement:.1e}")
    print(f"{'implementation':<30} {'median ms':>10} {'× read-once':>12}")
    for name, ms in rows.items():
        print(f"{name:<30} {ms:>10.3f} {ms / read_once_ms:>12.2f}")
    first, second = rows.values()
    print(f"speedup of the fused iteration over the loop: {second / first:.2f}×")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
