"""Where float32 math runs out: kd_loss's relative error against float64 on the same (float32-rounded) inputs,
per backend (and the eager torch expression), for large temperatures and for a student that nearly equals its
teacher (the README's "float32 limits").

    TRITON_INTERPRET=1 python bench/float32_limits.py [--backends cpu triton reference eager] [--classes 5000]
"""

import argparse

import torch
import torch.nn.functional as F

import fastkd


def eager_loss(s, t, *, temperature=1.0, divergence="kl"):
    """The usual eager float32 expressions, for comparison ("eager" in --backends)."""
    log_p_s, log_p_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    if divergence == "kl":
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="sum") * temperature**2
    return (1 - F.cosine_similarity(log_p_s.exp(), log_p_t.exp(), dim=-1)).sum() * temperature**2


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def errors(s, t, backend, **options):
    """(loss error, student-gradient error) of kd_loss on float32 s, t against the float64 reference on the same
    values (the float64 reference is accurate to about 1e-16·T² here, far below the float32 errors measured)."""
    results = []
    for x, y, chosen in ((s, t, backend), (s.double(), t.double(), "reference")):
        leaf = x.clone().requires_grad_(True)
        loss = (
            eager_loss(leaf, y, **options)
            if chosen == "eager"
            else fastkd.kd_loss(leaf, y, reduction="sum", backend=chosen, **options)
        )
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    return relative_error(results[0][0], results[1][0]), relative_error(results[0][1], results[1][1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["cpu", "reference", "eager"])
    parser.add_argument("--classes", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    shape = (args.rows, args.classes)
    s, t = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen) * 3
    print(f"{args.rows}×{args.classes} float32 logits N(0, 9); relative error of the loss / the student gradient")
    print("\nlarge temperatures (divergence kl):")
    for temperature in (1.0, 10.0, 30.0, 100.0):
        row = [
            f"{b}: {e[0]:.1e} / {e[1]:.1e}" for b in args.backends for e in [errors(s, t, b, temperature=temperature)]
        ]
        print(f"  T = {temperature:>5g}  " + "   ".join(row))
    print("\nstudent = teacher + ε·N(0, 1) (T = 1):")
    for divergence in ("kl", "cosine"):
        for eps in (1e-1, 1e-2, 1e-3):
            near = t + eps * torch.randn(shape, generator=gen)
            row = [
                f"{b}: {e[0]:.1e} / {e[1]:.1e}"
                for b in args.backends
                for e in [errors(near, t, b, divergence=divergence)]
            ]
            print(f"  {divergence:>6} ε = {eps:g}  " + "   ".join(row))


if __name__ == "__main__":
    main()
