"""A Distiller's training step against the same step written with plain torch losses, on CPU: a small CNN student
and teacher on 8×8 single-channel images (digit-sized), batch 64, 10 classes; terms CE + KD (T = 4) + a FitNets
feature term on the (64, 64, 8, 8) output of each model's second convolution (captured by a forward hook in
both loops). One step: zero_grad, both models' forwards, the loss, backward, SGD step. µs per step, medians of
interleaved rounds (fastkd.bench.interleaved_ms), and the bare losses' forward+backward on the same tensors.

    python bench/overhead_distiller.py [THREADS]        (default 1)
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd.bench import interleaved_ms
from fastkd.distiller import KD, CrossEntropy, Features

ROUNDS = 15
TEMPERATURE = 4.0


def cnn(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 64, 3, padding=1),  # "2": the matched feature, (N, 64, 8, 8)
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def plain_losses(s, t, fs, ft, labels):
    kd = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.softmax(t / TEMPERATURE, -1), reduction="batchmean")
    return F.cross_entropy(s, labels) + kd * TEMPERATURE**2 + F.mse_loss(fs, ft)


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    student, teacher = cnn(32), cnn(64).eval().requires_grad_(False)
    images, labels = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen)

    distiller = fastkd.Distiller(
        student,
        teacher,
        terms={
            "ce": CrossEntropy(),
            "kd": KD(temperature=TEMPERATURE),
            "feat": Features("2", "2", adapter=None),
        },
    )
    distill_opt = torch.optim.SGD(student.parameters(), lr=1e-3)

    plain_student = cnn(32)
    plain_student.load_state_dict(student.state_dict())
    plain_opt = torch.optim.SGD(plain_student.parameters(), lr=1e-3)
    captured = {}
    plain_student[2].register_forward_hook(lambda m, a, out: captured.__setitem__("s", out))
    teacher[2].register_forward_hook(lambda m, a, out: captured.__setitem__("t", out))

    def distill_step():
        distill_opt.zero_grad()
        distiller(images, labels).loss.backward()
        distill_opt.step()

    def plain_step():
        plain_opt.zero_grad()
        s = plain_student(images)
        with torch.no_grad():
            t = teacher(images)
        plain_losses(s, t, captured["s"], captured["t"], labels).backward()
        plain_opt.step()

    s = torch.randn(64, 10, generator=gen, requires_grad=True)
    t = torch.randn(64, 10, generator=gen)
    fs = torch.randn(64, 64, 8, 8, generator=gen, requires_grad=True)
    ft = torch.randn(64, 64, 8, 8, generator=gen)

    def fastkd_losses():
        loss = F.cross_entropy(s, labels) + fastkd.kd_loss(s, t, temperature=TEMPERATURE) + fastkd.feature_loss(fs, ft)
        torch.autograd.grad(loss, (s, fs))

    def eager_losses():
        torch.autograd.grad(plain_losses(s, t, fs, ft, labels), (s, fs))

    got = interleaved_ms(
        {
            "distiller step": distill_step,
            "plain step": plain_step,
            "fastkd losses": fastkd_losses,
            "eager losses": eager_losses,
        },
        torch.device("cpu"),
        ROUNDS,
    )
    print(f"CPU, {threads} thread(s), fp32; µs per call, medians of {ROUNDS} interleaved rounds")
    for name, ms in got.items():
        print(f"{name:<16} {ms * 1e3:9.1f}")
    print(f"step ratio   {got['distiller step'] / got['plain step']:.2f}")
    print(f"losses ratio {got['fastkd losses'] / got['eager losses']:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
