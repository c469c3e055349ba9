"""How far a top-K teacher's loss is from full-logit KD at temperature T, by tail policy: the relative error of the
loss (Σ over rows) and of the student's gradient (relative norm) against kd_loss with the full teacher, both on the
reference in float64. V = 32000, 32 rows, the teacher's top-K log-probabilities taken at T = 1 (as a cache stores
them), the student's logits ~ N(0, 2²); a peaked teacher (logits ~ N(0, 4²): its top 8 hold most of the mass) and
a flat one (N(0, 0.5²): the tail holds most of it).

    python bench/topk_tail.py
"""

import torch

import fastkd

V, ROWS = 32000, 32
TAILS = ("bucket", "spread", "renormalize")


def loss_and_grad(student, teacher, temperature):
    leaf = student.clone().requires_grad_()
    loss = fastkd.kd_loss(leaf, teacher, temperature=temperature, reduction="sum", backend="reference")
    loss.backward()
    return loss.detach(), leaf.grad


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(ROWS, V, generator=gen) * 2).double()
    teachers = {
        "peaked": (torch.randn(ROWS, V, generator=gen) * 4).double(),
        "flat": (torch.randn(ROWS, V, generator=gen) * 0.5).double(),
    }
    print("relative error against full-logit KD: loss / gradient")
    print(f"{'teacher':<8} {'K':>4} {'T':>3} {'tail mass':>9} " + " ".join(f"{tail:>21}" for tail in TAILS))
    for name, logits in teachers.items():
        for k in (8, 64, 256):
            top = fastkd.topk_teacher(logits, k)
            tail_mass = (1 - top.values.exp().sum(-1)).mean().item()
            for temperature in (1.0, 2.0, 4.0, 8.0):
                full_loss, full_grad = loss_and_grad(student, logits, temperature)
                cells = []
                for tail in TAILS:
                    sparse = top if tail != "renormalize" else fastkd.TopK(top.values, top.indices, "logits")
                    leaf = student.clone().requires_grad_()
                    loss = fastkd.kd_loss(
                        leaf, sparse, temperature=temperature, tail=tail, reduction="sum", backend="reference"
                    )
                    loss.backward()
                    loss_error = abs(loss.item() - full_loss.item()) / full_loss.item()
                    grad_error = ((leaf.grad - full_grad).norm() / full_grad.norm()).item()
                    cells.append(f"{loss_error:>10.3g} / {grad_error:<8.3g}")
                print(f"{name:<8} {k:>4} {temperature:>3g} {tail_mass:>9.3f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
