"""Where graph_kd_loss spends its time on this machine: the whole loss, forward+backward, against its normalisation
and Gram matrix products alone (the B×B rest is what a fused kernel could save). B = 256, student features
(256, 256, 8, 8), teacher features (256, 512, 4, 4), fp32, medians of 9 runs after 2 warm-ups.

    python bench/graph_kd_cost.py
"""

import time

import torch

import fastkd


def median_ms(step, runs: int = 9) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2] * 1e3


def main() -> None:
    torch.manual_seed(0)
    student = torch.randn(256, 256, 8, 8).relu().requires_grad_()
    teacher = torch.randn(256, 512, 4, 4).relu()

    def gram_only():
        x = torch.nn.functional.normalize(student.flatten(1), dim=1)
        y = torch.nn.functional.normalize(teacher.flatten(1), dim=1)
        (x @ x.T).sum().backward()
        y @ y.T

    steps = {
        "graph_kd_loss": lambda: fastkd.graph_kd_loss(student, teacher).backward(),
        "graph_kd_loss, knn=8": lambda: fastkd.graph_kd_loss(student, teacher, knn=8).backward(),
        "normalise + Gram matmuls": gram_only,
    }
    print(f"device cpu, threads {torch.get_num_threads()}, fp32, forward+backward, medians of 9 runs")
    for name, step in steps.items():
        print(f"{name:<26} {median_ms(step):8.1f} ms")


if __name__ == "__main__":
    main()
