"""Arguments the kernels of every backend share (Triton in :mod:`fastkd.kernels`, C++ and CUDA in csrc/): kd_loss's
divergence codes, the number of per-row statistics its forward stores for the backward, the scalars derived
from its options and the argument dict of the C++/CUDA kd_loss kernels; feature_loss's kind and normalisation
codes."""
from __future__ import annotations

import math

import torch

DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2, "cosine": 3, "dkd": 4}
# per row, float32, laid out (NUM_STATS, N): max a, log-sum a, max b, log-sum b, d0, d1, max s, log-sum s.
# For "cosine" the log-sum slots hold log ‖exp(a − max a)‖₂ (likewise b) and d0 the cosine. For "dkd" (labels
# required; beta weighs NCKD, alpha TCKD) the maxima and log-sums cover the non-target classes, d0 is NCKD and
# d1 = p_t,gt − p_s,gt.
# A sparse (TopK) teacher's kernels use the slots as: max a, log-sum a, log p_t of the tail bucket (−inf without
# one), the KL, max s, log-sum s, and max and log-sum of a over the columns outside the K.
NUM_STATS = 8
# several teachers (kd_loss's ``ensemble``): 0 one teacher, 1 the mean of their distributions (whose forward also
# stores each teacher's max and log-sum at T in statistics rows NUM_STATS + k and NUM_STATS + K + k), 2 the weighted
# mean of their logits
ENSEMBLE_CODES = {"none": 0, "prob": 1, "logit": 2}
# per row, float32, (NUM_METRICS, N), when asked for: top-1 agreement (0/1), KL(p_t‖p_s), H(p_t), H(p_s), at T = 1;
# 0 at ignored rows
NUM_METRICS = 4


def stats_rows(teacher, ensemble: str) -> int:
    """Rows of kd_loss's forward statistics for a teacher (N, V), or (K, N, V) teachers with ``ensemble``."""
    return NUM_STATS + (2 * teacher.shape[0] if ensemble == "prob" else 0)


def kd_scalars(temperature: float, beta: float) -> dict:
    """1/T and the JSD mixture weights with their logs (−inf for a zero weight)."""
    return dict(
        inv_temperature=1.0 / temperature,
        beta=beta,
        one_minus_beta=1.0 - beta,
        log_beta=math.log(beta) if beta > 0 else -math.inf,
        log_one_minus_beta=math.log1p(-beta) if beta < 1 else -math.inf,
    )

# the dtype codes of the C++ and CUDA kernels (csrc/kd_args.h)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def rows_spec(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tensor with unit column stride, (data pointer, dtype code, row stride)) of an (N, V) tensor; other
    layouts are copied first."""
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    return x, (x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0))


def kd_launch_args(student, teacher, labels, stats, *, num_threads, temperature, divergence, beta, ignore_index,
                   ce_weight, kd_scale, alpha=1.0) -> tuple[dict, list]:
    """The argument dict of the C++ and CUDA kd_loss kernels (csrc/binding_args.h ``common_args``), and the
    tensors it points into (to keep them alive)."""
    student, student_spec = rows_spec(student)
    teacher, teacher_spec = rows_spec(teacher)
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
    args = dict(student=student_spec, teacher=teacher_spec, num_rows=student.shape[0], num_cols=student.shape[1],
                labels=labels.data_ptr() if labels is not None else 0, ignore_index=ignore_index,
                divergence=DIVERGENCE_CODES[divergence], ce_weight=ce_weight, kd_scale=kd_scale, alpha=alpha,
                stats=stats.data_ptr(), num_threads=num_threads, **kd_scalars(temperature, beta))
    return args, [student, teacher, labels]


# feature_loss (kernels/features.py and csrc/feature_loss_impl.h): kind, and the normalisation (1: standardise over
# the group, 2: l2)
FEATURE_KIND_CODES = {"mse": 0, "l1": 1, "smooth_l1": 2, "cosine": 3}
FEATURE_NORMALIZE_CODES = {None: 0, "channel": 1, "sample": 1, "l2": 2}
