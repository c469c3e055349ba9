"""What the kernels of every backend share (Triton in :mod:`fastkd.kernels`, C++ and CUDA in csrc/): the table of
mode codes and statistics slots, the options of a kd_loss launch, and the argument dict of the C++/CUDA kd_loss
kernels.

The enums below are the one table of codes and slots. The Triton kernels alias them as ``tl.constexpr`` values;
csrc/kd_args.h and csrc/feature_loss_cpu.h repeat them as C++ enums, and tests/test_kernel_args.py checks that the
headers agree with this file. A slot index or mode code written as a bare number anywhere else is a bug.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch


class Divergence(enum.IntEnum):
    """kd_loss's divergence codes (``divergence=`` by name, lower case; ``DKD`` is :func:`fastkd.dkd_loss`)."""

    KL = 0  # KL(p_t‖p_s)
    REVERSE_KL = 1  # KL(p_s‖p_t)
    JSD = 2  # generalized Jensen–Shannon, weight beta
    COSINE = 3  # 1 − cos(p_s, p_t)
    DKD = 4  # decoupled KD: alpha·TCKD + beta·NCKD, the target class split off
    TVD = 5  # total variation distance ½ Σ |p_s − p_t|

    @classmethod
    def of(cls, name: str) -> Divergence:
        return cls[name.upper()]


class Ensemble(enum.IntEnum):
    """How kd_loss's kernels read several teachers (``ensemble=``): ``NONE`` one (N, V) teacher; ``PROB`` the mean
    of K distributions (its forward also stores each teacher's max and log-sum at T in statistics rows NUM_STATS + k
    and NUM_STATS + K + k); ``LOGIT`` the weighted mean of K logit rows."""

    NONE = 0
    PROB = 1
    LOGIT = 2

    @classmethod
    def of(cls, name: str) -> Ensemble:
        return cls[name.upper()]


class Stat(enum.IntEnum):
    """Slots of kd_loss's per-row statistics, laid out (NUM_STATS, N) float32 (0 at an ignored row), which the
    forward stores for the backward; a = s/T, b = t/T."""

    MAX_A = 0  # max a (dkd: over the non-target classes)
    LOG_SUM_A = 1  # log Σ exp(a − max a) (cosine: log ‖exp(a − max a)‖₂)
    MAX_B = 2  # the same for b
    LOG_SUM_B = 3
    D0 = 4  # kl, reverse_kl: the divergence; jsd: KL(p_t‖m); cosine: the cosine; dkd: NCKD; tvd: Σ p_s·sign(p_s − p_t)
    D1 = 5  # jsd: KL(p_s‖m); dkd: p_t,gt − p_s,gt; tvd: Σ p_t·sign(p_s − p_t); otherwise 0
    MAX_S = 6  # max s and log Σ exp(s − max s), at T = 1 (the CE term)
    LOG_SUM_S = 7


class TopKStat(enum.IntEnum):
    """The statistics slots of a sparse (TopK) teacher's kernels, in the same (NUM_STATS, N) tensor."""

    MAX_A = 0  # max a over the row
    LOG_SUM_A = 1  # log Σ exp(a − max a)
    LOG_P_TAIL = 2  # log p_t of the tail bucket (−inf without one)
    KL = 3  # the row's KL
    MAX_S = 4  # max s and log Σ exp(s − max s), at T = 1 (the CE term)
    LOG_SUM_S = 5
    MAX_REST = 6  # max a and log Σ exp(a − max) over the columns outside the K (with a bucket)
    LOG_SUM_REST = 7


NUM_STATS = len(Stat)
assert len(TopKStat) == NUM_STATS


class Metric(enum.IntEnum):
    """Slots of the fidelity metrics (``return_stats``), laid out (NUM_METRICS, N) float32, at T = 1, 0 at ignored
    rows; their names are the keys of kd_loss's stats dict."""

    TOP1_AGREEMENT = 0  # argmax s = argmax t (1 or 0)
    PREDICTIVE_KL = 1  # KL(p_t‖p_s)
    TEACHER_ENTROPY = 2  # H(p_t)
    STUDENT_ENTROPY = 3  # H(p_s)


NUM_METRICS = len(Metric)


class DType(enum.IntEnum):
    """dtype codes of the tensors the C++ and CUDA kernels read (``UINT8``: bool and uint8 masks)."""

    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2
    UINT8 = 3


DTYPE_CODES = {torch.float32: DType.FLOAT32, torch.float16: DType.FLOAT16, torch.bfloat16: DType.BFLOAT16}


class FeatureKind(enum.IntEnum):
    """feature_loss's ``kind`` codes."""

    MSE = 0
    L1 = 1
    SMOOTH_L1 = 2
    COSINE = 3

    @classmethod
    def of(cls, name: str) -> FeatureKind:
        return cls[name.upper()]


class FeatureNormalize(enum.IntEnum):
    """feature_loss's normalisation codes: ``STANDARDIZE`` over the program's group ("channel" or "sample"), ``L2``
    along the channels."""

    NONE = 0
    STANDARDIZE = 1
    L2 = 2

    @classmethod
    def of(cls, name) -> FeatureNormalize:
        return {None: cls.NONE, "channel": cls.STANDARDIZE, "sample": cls.STANDARDIZE, "l2": cls.L2}[name]


class FeatureGroup(enum.IntEnum):
    """The elements one feature_loss program owns (its normalisation group) in the (N, C, S) view."""

    CHANNEL = 0  # one (n, c): the S elements of a channel map
    POSITION = 1  # one (n, s): the C channels at one position
    SAMPLE = 2  # one n: all C·S elements of a sample


def feature_groups(group: int, num_n: int, num_c: int, num_s: int) -> int:
    """The number of feature_loss groups of ``group`` (a FeatureGroup) in an (N, C, S) view."""
    return {FeatureGroup.CHANNEL: num_n * num_c, FeatureGroup.POSITION: num_n * num_s, FeatureGroup.SAMPLE: num_n}[
        FeatureGroup(group)
    ]


class KDOptions(NamedTuple):
    """The options of one kd_loss kernel launch, as every backend takes them: validated and normalised once by
    :mod:`fastkd.kd` (a frozen tuple: nothing downstream changes them). Its fields are also the option arguments of
    the ``fastkd::kd_loss_rows`` custom ops, which take them by keyword (``**options._asdict()``)."""

    temperature: float
    divergence: str  # a Divergence name, lower case ("kl", ..., "dkd", "tvd")
    beta: float  # jsd: the mixture weight; dkd: the NCKD weight
    ignore_index: int
    ce_weight: float
    kd_scale: float  # the divergence's factor: kd_weight (times T² with scale_by_t2); dkd: T²
    alpha: float = 1.0  # dkd: the TCKD weight


class TopKOptions(NamedTuple):
    """The options of one launch of the sparse-teacher kernels (see :class:`KDOptions`)."""

    temperature: float
    teacher_temperature: float  # T_t of the teacher's log-weights v/T_t: T, or 1 for a sampled teacher
    tail: str  # "bucket", "spread" or "renormalize" (fastkd.topk.TAILS)
    ignore_index: int
    ce_weight: float
    kd_scale: float


def stats_rows(teacher, ensemble: str) -> int:
    """Rows of kd_loss's forward statistics for a teacher (N, V), or (K, N, V) teachers with ``ensemble``."""
    return NUM_STATS + (2 * teacher.shape[0] if Ensemble.of(ensemble) == Ensemble.PROB else 0)


def kd_scalars(options: KDOptions) -> dict:
    """The kernels' scalars derived from the options: 1/T and the JSD mixture weights with their logs (−inf for a
    zero weight)."""
    beta = options.beta
    return dict(
        inv_temperature=1.0 / options.temperature,
        beta=beta,
        one_minus_beta=1.0 - beta,
        log_beta=math.log(beta) if beta > 0 else -math.inf,
        log_one_minus_beta=math.log1p(-beta) if beta < 1 else -math.inf,
    )


def rows_spec(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tensor with unit column stride, (data pointer, dtype code, row stride)) of an (N, V) tensor; other
    layouts are copied first."""
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    return x, (x.data_ptr(), int(DTYPE_CODES[x.dtype]), x.stride(0))


def kd_launch_args(student, teacher, labels, stats, options: KDOptions, *, num_threads: int) -> tuple[dict, list]:
    """The argument dict of the C++ and CUDA kd_loss kernels (csrc/binding_args.h ``common_args``), and the
    tensors it points into (to keep them alive)."""
    student, student_spec = rows_spec(student)
    teacher, teacher_spec = rows_spec(teacher)
    if labels is not None:
        labels = labels.to(torch.int64).contiguous()
    args = dict(
        student=student_spec,
        teacher=teacher_spec,
        num_rows=student.shape[0],
        num_cols=student.shape[1],
        labels=labels.data_ptr() if labels is not None else 0,
        ignore_index=options.ignore_index,
        divergence=int(Divergence.of(options.divergence)),
        ce_weight=options.ce_weight,
        kd_scale=options.kd_scale,
        alpha=options.alpha,
        stats=stats.data_ptr(),
        num_threads=num_threads,
        **kd_scalars(options),
    )
    return args, [student, teacher, labels]
