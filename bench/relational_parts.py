"""Where the relational losses spend their time on this machine (the parts `fastkd bench --op relational` times
whole), fp32, medians of 9 runs after 2 warm-ups:

- RKD, B = 256, D = 512: the C++ angle kernels alone (forward, backward) and the distances (torch.cdist without the
  matrix-product shortcut, forward and forward+backward), the two halves of fastkd's RKD step;
- CRD, B = 64, K = 16384, d = 128, N = 50000: one side's scores by one matrix product (fastkd's path at
  N ≤ 8(K+1)) against the C++ gather-dot kernel (its path above);
- graph KD, B = 256, (256, 256, 8, 8) and (256, 512, 4, 4) features: the whole loss, forward+backward, against its
  normalisation and Gram matrix products alone (the B×B rest is what a fused kernel could save).

    python bench/relational_parts.py
"""

import time

import torch

import fastkd
from fastkd import cpu_backend, relational


def median_ms(step, runs: int = 9) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2] * 1e3


def rkd_steps() -> dict:
    x, y = torch.randn(256, 512).requires_grad_(), torch.randn(256, 512)
    d_s, d_t = relational._distances(x.detach()), relational._distances(y)
    scale = torch.tensor(1.0 / 256**3)
    return {
        "RKD angle kernels, forward": lambda: cpu_backend.rkd_angle_forward(d_s, d_t),
        "RKD angle kernels, backward": lambda: cpu_backend.rkd_angle_backward(d_s, d_t, scale),
        "RKD distances, forward": lambda: relational._distances(x),
        "RKD distances, fwd+bwd": lambda: relational._distances(x).sum().backward(),
    }


def crd_steps() -> dict:
    bank = torch.nn.functional.normalize(torch.randn(50000, 128), dim=1)
    index = torch.randint(50000, (64, 16385))
    anchors = torch.nn.functional.normalize(torch.randn(64, 128), dim=1)
    return {
        "CRD scores, matrix product": lambda: (anchors @ bank.T).gather(1, index),
        "CRD scores, gather-dot": lambda: cpu_backend.crd_gather_dot(bank, index, anchors),
    }


def graph_steps() -> dict:
    student = torch.randn(256, 256, 8, 8).relu().requires_grad_()
    teacher = torch.randn(256, 512, 4, 4).relu()

    def gram_only():
        x = torch.nn.functional.normalize(student.flatten(1), dim=1)
        y = torch.nn.functional.normalize(teacher.flatten(1), dim=1)
        (x @ x.T).sum().backward()
        y @ y.T

    return {
        "graph_kd_loss, fwd+bwd": lambda: fastkd.graph_kd_loss(student, teacher).backward(),
        "graph_kd_loss knn=8, fwd+bwd": lambda: fastkd.graph_kd_loss(student, teacher, knn=8).backward(),
        "normalise + Gram matmuls": gram_only,
    }


def main() -> None:
    torch.manual_seed(0)
    print(f"device cpu, threads {torch.get_num_threads()}, C++ kernels {cpu_backend.isa()}, fp32, medians of 9 runs")
    for steps in (rkd_steps(), crd_steps(), graph_steps()):
        for name, step in steps.items():
            print(f"{name:<30} {median_ms(step):8.1f} ms")


if __name__ == "__main__":
    main()
