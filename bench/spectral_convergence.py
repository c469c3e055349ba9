"""How far spectral_norms is from σ_max after n iterations from a random start, over seeds of Gaussian matrices
(the slow case for power iteration): median and worst relative error per shape (the figures in the README and
the docstring of fastkd.lipschitz). ``python bench/spectral_convergence.py [--seeds 30] [--backend cpu]``"""

import argparse
import json

import torch

import fastkd

SHAPES = [(256, 256), (1000, 1000), (2048, 512), (512, 2048)]


def relative_errors(shape, seeds, counts, backend):
    """{n: [1 − σ_n/σ_max per seed]} for Gaussian matrices of ``shape``, σ_n after n iterations in total."""
    errors = {n: [] for n in counts}
    for seed in range(seeds):
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        exact = torch.linalg.matrix_norm(weight.double(), ord=2).item()
        state, done = None, 0
        for n in counts:
            sigma, state = fastkd.spectral_norms(
                [weight],
                n_iter=n - done,
                state=state,
                backend=backend,
                generator=torch.Generator().manual_seed(100 + seed),
            )
            done = n
            errors[n].append(1 - sigma.item() / exact)
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--json", default=None, help="also write the errors here")
    args = parser.parse_args()
    counts = (250, 1000)
    results = {}
    print(f"{'shape':>12} {'n_iter':>7} {'median':>9} {'worst':>9} {'> 1e-3':>7}")
    for shape in SHAPES:
        errors = relative_errors(shape, args.seeds, counts, args.backend)
        results["x".join(map(str, shape))] = errors
        for n in counts:
            values = sorted(errors[n])
            print(
                f"{'x'.join(map(str, shape)):>12} {n:>7} {values[len(values) // 2]:>9.1e} {values[-1]:>9.1e} "
                f"{sum(e > 1e-3 for e in values):>7}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
