"""Float64 truths for the property tests (tests/test_properties.py), written from the textbook definitions and
independently of :mod:`fastkd.reference`.

Every function takes float64 tensors (the tests cast the very inputs the library received, rounding included)
and is differentiable by torch autograd, which gives the truths' gradients. (The tests also evaluate the same
formulas in float32, as a yardstick of what float32 rounding alone costs.) Probabilities are handled through
their logarithms: log p = log-softmax, a class with p = 0 (a −inf logit) contributes 0·log 0 = 0, and the
"safe where" idiom (masking the inputs of a branch, not only its output) keeps the gradients of absent classes at
0 instead of NaN. Rows that are not counted (label = ignore_index) are replaced by zeros before any math, so an
ignored row of −inf logits has loss 0 and gradient 0.
"""

import math

import torch

NEG_INF = -math.inf
FEATURE_STD_EPS = 1e-5  # feature_loss: (x − mean)/sqrt(var + eps)
FEATURE_L2_EPS = 1e-12  # feature_loss: x/max(‖x‖, eps)
FEATURE_COSINE_EPS = 1e-8  # feature_loss: ⟨s, t⟩/(max(‖s‖, eps)·max(‖t‖, eps))


# ----------------------------------------------------------------------------------------------------------------
# distributions and divergences over the last dim, from log-probabilities
# ----------------------------------------------------------------------------------------------------------------


def log_softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p_j = x_j/T − log Σ_i exp(x_i/T), −inf where x_j = −inf (the row needs one finite entry), in the stable
    form (z − max z) − log Σ exp(z − max z): the max is kept apart from the log-sum (the result does not depend on
    it, so it takes no gradient), which matters only for the float32 evaluation of the truth in the tests."""
    z = x / temperature
    shifted = z - z.amax(dim=-1, keepdim=True).detach()
    return shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)


def kl_from_logs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_j p_j (log p_j − log q_j), with 0·log 0 = 0 where p_j = 0 (its gradient 0 there too)."""
    present = log_p > NEG_INF
    lp = torch.where(present, log_p, 0.0)
    lq = torch.where(present, log_q, 0.0)
    return torch.where(present, lp.exp() * (lp - lq), 0.0).sum(-1)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q) for 0 < w < 1, −inf where both p and q are 0."""
    absent = (log_p == NEG_INF) & (log_q == NEG_INF)
    a = torch.where(absent, 0.0, log_p + math.log(weight))
    b = torch.where(absent, 0.0, log_q + math.log1p(-weight))
    return torch.where(absent, NEG_INF, torch.logaddexp(a, b))


def divergence(log_p_t: torch.Tensor, log_p_s: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """D(p_t, p_s) per row: "kl" KL(p_t‖p_s), "reverse_kl" KL(p_s‖p_t), "jsd" β·KL(p_t‖m) + (1−β)·KL(p_s‖m) with
    m = β·p_t + (1−β)·p_s (exactly 0 at β = 0 and 1), "cosine" 1 − ⟨p_s, p_t⟩/(‖p_s‖‖p_t‖), "tvd" ½ Σ |p_s − p_t|."""
    if kind == "kl":
        return kl_from_logs(log_p_t, log_p_s)
    if kind == "reverse_kl":
        return kl_from_logs(log_p_s, log_p_t)
    if kind == "jsd":
        if beta in (0.0, 1.0):  # m equals one of the two distributions: 0, and no gradient
            return log_p_t.new_zeros(log_p_t.shape[:-1])
        log_m = log_mixture(log_p_t, log_p_s, beta)
        return beta * kl_from_logs(log_p_t, log_m) + (1 - beta) * kl_from_logs(log_p_s, log_m)
    if kind == "cosine":
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        return 1 - (p_s * p_t).sum(-1) / (p_s.norm(dim=-1) * p_t.norm(dim=-1))
    if kind == "tvd":
        return 0.5 * (log_p_s.exp() - log_p_t.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


# ----------------------------------------------------------------------------------------------------------------
# kd_loss, its teachers (one, an ensemble, a sparse top-K) and dkd_loss
# ----------------------------------------------------------------------------------------------------------------


def counted_rows(labels, num_rows: int, ignore_index: int) -> torch.Tensor:
    """Which flattened rows count: all without labels, else those whose label is not ignore_index."""
    if labels is None:
        return torch.ones(num_rows, dtype=torch.bool)
    return labels.reshape(-1) != ignore_index


def zero_uncounted(x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """The (N, V) rows with zeros in place of the rows that do not count (whatever they held, −inf included)."""
    return torch.where(counted.unsqueeze(-1), x, 0.0)


def cross_entropy_rows(student: torch.Tensor, labels, counted: torch.Tensor) -> torch.Tensor:
    """−log softmax(s)_label at T = 1 per counted row, 0 elsewhere."""
    target = torch.where(counted, labels.reshape(-1), 0).long().unsqueeze(-1)
    return torch.where(counted, -log_softmax(student).gather(-1, target).squeeze(-1), 0.0)


def reduce_rows(rows: torch.Tensor, row_shape, counted: torch.Tensor, reduction: str, normalizer=None):
    """ "none": the rows in shape ``row_shape``; "sum": Σ rows; "batchmean": Σ rows ÷ (normalizer, a 0-d tensor 0
    counting as 1, or else the number of counted rows, at least 1)."""
    if reduction == "none":
        return rows.reshape(row_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        return total / max(int(counted.sum()), 1)
    divisor = float(normalizer)
    return total / (1.0 if divisor == 0 else divisor)


def ensemble_log_probs(teachers: torch.Tensor, weights, ensemble: str, temperature: float) -> torch.Tensor:
    """log p_t of K teachers (K, N, V) with weights w (normalised to sum 1; teachers of weight 0 take no part):
    "prob" log Σ_k w_k softmax(t_k/T), "logit" log softmax(Σ_k w_k t_k/T)."""
    total = math.fsum(weights)
    used = [(w / total, t) for w, t in zip(weights, teachers.unbind(0)) if w > 0]
    if ensemble == "prob":
        return torch.logsumexp(torch.stack([math.log(w) + log_softmax(t, temperature) for w, t in used]), dim=0)
    if ensemble == "logit":
        return log_softmax(sum(w * t for w, t in used), temperature)
    raise ValueError(f"unknown ensemble {ensemble!r}")


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    divergence_kind: str = "kl",
    beta: float = 0.5,
    labels=None,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    scale_by_t2: bool = True,
    reduction: str = "batchmean",
    normalizer=None,
    teacher_weights=None,
    ensemble=None,
):
    """kd_loss of (*, V) logits: row = kd_weight·(T² if scale_by_t2)·D(p_t, p_s) + ce_weight·CE(softmax(s), y),
    0 at ignored rows, then reduced. With ``ensemble`` ("prob"/"logit") ``teacher`` is (K, *, V) and
    ``teacher_weights`` K numbers (uniform if None)."""
    num_classes = student.shape[-1]
    row_shape = student.shape[:-1]
    s = student.reshape(-1, num_classes)
    counted = counted_rows(labels, s.shape[0], ignore_index)
    s = zero_uncounted(s, counted)
    log_p_s = log_softmax(s, temperature)
    if ensemble is None:
        log_p_t = log_softmax(zero_uncounted(teacher.reshape(-1, num_classes), counted), temperature)
    else:
        teachers = teacher.reshape(teacher.shape[0], -1, num_classes)
        teachers = torch.where(counted.view(1, -1, 1), teachers, 0.0)
        weights = [1.0] * teachers.shape[0] if teacher_weights is None else [float(w) for w in teacher_weights]
        log_p_t = ensemble_log_probs(teachers, weights, ensemble, temperature)
    scale = kd_weight * (temperature**2 if scale_by_t2 else 1.0)
    rows = torch.where(counted, scale * divergence(log_p_t, log_p_s, divergence_kind, beta), 0.0)
    if ce_weight != 0:
        rows = rows + ce_weight * cross_entropy_rows(s, labels, counted)
    return reduce_rows(rows, row_shape, counted, reduction, normalizer)


def kd_topk_loss(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    tail: str,
    temperature: float = 1.0,
    labels=None,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    scale_by_t2: bool = True,
    reduction: str = "batchmean",
    normalizer=None,
):
    """kd_loss against a sparse teacher (its K values and indices per row). The teacher's log-weights are v_k/T on
    its K classes; with tail "bucket" (log-probabilities, K < V) one more class, the rest of the vocabulary, has
    log-weight log(1 − Σ_k exp v_k)/T; p_t is their softmax ("renormalize": over the K classes alone). The student
    keeps its full-row normalisation: log p_s,k = log softmax(s/T)_k, and its bucket is the mass of the classes
    outside the K. Row = kd_weight·(T²)·KL(p_t‖p_s) + ce_weight·CE, 0 at ignored rows."""
    num_classes = student.shape[-1]
    k = values.shape[-1]
    row_shape = student.shape[:-1]
    s = student.reshape(-1, num_classes)
    v = values.reshape(-1, k)
    idx = indices.reshape(-1, k).long()
    counted = counted_rows(labels, s.shape[0], ignore_index)
    s = zero_uncounted(s, counted)
    log_p_s_full = log_softmax(s, temperature)
    log_p_s = log_p_s_full.gather(-1, idx)
    weights = v / temperature
    if tail == "bucket" and k < num_classes:
        outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx, False)
        log_rest_s = torch.logsumexp(torch.where(outside, log_p_s_full, NEG_INF), dim=-1, keepdim=True)
        log_mass = torch.logsumexp(v, dim=-1, keepdim=True)
        log_rest_t = torch.log(-torch.expm1(log_mass.clamp(max=0.0)))  # −inf when the K hold all the mass
        weights = torch.cat([weights, log_rest_t / temperature], dim=-1)
        log_p_s = torch.cat([log_p_s, log_rest_s], dim=-1)
    log_p_t = log_softmax(weights)
    scale = kd_weight * (temperature**2 if scale_by_t2 else 1.0)
    rows = torch.where(counted, scale * kl_from_logs(log_p_t, log_p_s), 0.0)
    if ce_weight != 0:
        rows = rows + ce_weight * cross_entropy_rows(s, labels, counted)
    return reduce_rows(rows, row_shape, counted, reduction, normalizer)


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    reduction: str = "batchmean",
    normalizer=None,
):
    """Decoupled KD (Zhao et al. 2022, as mdistiller defines it): with b = [p_gt, 1 − p_gt] at temperature T and p̂
    the softmax over the non-target classes, row = α·T²·KL(b_t‖b_s) + β·T²·KL(p̂_t‖p̂_s) + ce_weight·CE, 0 at ignored
    rows. 1 − p_gt is the sum of the non-target probabilities (a log-sum-exp), never 1 minus a probability."""
    num_classes = student.shape[-1]
    row_shape = student.shape[:-1]
    s = student.reshape(-1, num_classes)
    t = teacher.reshape(-1, num_classes)
    counted = counted_rows(labels, s.shape[0], ignore_index)
    s, t = zero_uncounted(s, counted), zero_uncounted(t, counted)
    target = torch.where(counted, labels.reshape(-1), 0).long().unsqueeze(-1)
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter(-1, target, True)

    def binary_and_rest(x):
        log_p = log_softmax(x, temperature)
        log_gt = log_p.gather(-1, target)
        log_not_gt = torch.logsumexp(torch.where(is_target, NEG_INF, log_p), dim=-1, keepdim=True)
        log_hat = log_softmax(torch.where(is_target, NEG_INF, x), temperature)
        return torch.cat([log_gt, log_not_gt], dim=-1), log_hat

    b_s, hat_s = binary_and_rest(s)
    b_t, hat_t = binary_and_rest(t)
    rows = temperature**2 * (alpha * kl_from_logs(b_t, b_s) + beta * kl_from_logs(hat_t, hat_s))
    rows = torch.where(counted, rows, 0.0)
    if ce_weight != 0:
        rows = rows + ce_weight * cross_entropy_rows(s, labels, counted)
    return reduce_rows(rows, row_shape, counted, reduction, normalizer)


# ----------------------------------------------------------------------------------------------------------------
# feature_loss
# ----------------------------------------------------------------------------------------------------------------


def feature_groups(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Features viewed as (N, C, S): the channels moved to dim 1, the other non-batch dims flattened."""
    x = x.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def standardizer(x: torch.Tensor, present: torch.Tensor, dims: tuple):
    """(x − mean, 1/sqrt(var + 1e-5)) with the mean and the biased variance over the present elements of ``dims``;
    x − mean is 0 where absent."""
    count = present.sum(dims, keepdim=True).clamp_min(1)
    mean = torch.where(present, x, 0.0).sum(dims, keepdim=True) / count
    centered = torch.where(present, x - mean, 0.0)
    variance = (centered * centered).sum(dims, keepdim=True) / count
    return centered, 1 / torch.sqrt(variance + FEATURE_STD_EPS)


def normalized_features(x: torch.Tensor, present: torch.Tensor, normalize) -> torch.Tensor:
    """(N, C, S) features, 0 where absent, normalised: "channel" standardised per (sample, channel), "sample" per
    sample, "l2" divided by max(‖x‖, 1e-12) along the channels, None as they are."""
    if normalize in ("channel", "sample"):
        centered, rstd = standardizer(x, present, (2,) if normalize == "channel" else (1, 2))
        return centered * rstd
    if normalize == "l2":
        return x / x.norm(dim=1, keepdim=True).clamp_min(FEATURE_L2_EPS)
    return x


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    mask=None,
    kind: str = "mse",
    normalize=None,
    margin=None,
    beta: float = 1.0,
    channel_dim: int = 1,
    reduction: str = "mean",
):
    """Masked feature matching on features viewed as (N, C, S) (channels from ``channel_dim``, the other non-batch
    dims flattened): elements with mask 0 are absent (no statistic, no term); ``normalize`` "channel"/"sample"
    standardises each (sample, channel) / each sample, "l2" divides by the L2 norm along the channels; OFD's
    margin makes the target max(t, m_c) and counts an element when s > target or target > 0; the term is
    (s − t)², |s − t|, smooth-L1 with threshold β, or per position 1 − cos along the channels. "mean" divides
    Σ m·term by Σ m (positions for "cosine"; 0 when nothing is present), "sum" is Σ m·term."""
    s, t = feature_groups(student, channel_dim), feature_groups(teacher, channel_dim)
    m = torch.ones_like(s) if mask is None else feature_groups(mask.to(s.dtype).expand(student.shape), channel_dim)
    present = m != 0
    s = normalized_features(torch.where(present, s, 0.0), present, normalize)
    t = normalized_features(torch.where(present, t, 0.0), present, normalize)
    if kind == "cosine":
        weight = m[:, :1]
        cos = (s * t).sum(1, keepdim=True) / (
            s.norm(dim=1, keepdim=True).clamp_min(FEATURE_COSINE_EPS)
            * t.norm(dim=1, keepdim=True).clamp_min(FEATURE_COSINE_EPS)
        )
        terms = weight * (1 - cos)
    else:
        weight = m
        counts = present
        if margin is not None:
            t = torch.maximum(t, margin.view(1, -1, 1).expand_as(t))
            counts = present & ((s > t) | (t > 0))
        d = s - t
        if kind == "mse":
            term = d * d
        elif kind == "l1":
            term = d.abs()
        elif kind == "smooth_l1":
            term = torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta)
        else:
            raise ValueError(f"unknown kind {kind!r}")
        terms = torch.where(counts, m * term, 0.0)
    total = terms.sum()
    if reduction == "sum":
        return total
    divisor = weight.sum()
    return torch.where(divisor > 0, total / torch.where(divisor > 0, divisor, 1.0), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# spectral norms
# ----------------------------------------------------------------------------------------------------------------


def sigma_max(weight: torch.Tensor) -> torch.Tensor:
    """The largest singular value of a weight viewed as (out, in·∏k), by LAPACK's SVD in float64; its autograd
    gradient is u₁v₁ᵀ (well defined where σ₁ > σ₂)."""
    return torch.linalg.svdvals(weight.reshape(weight.shape[0], -1))[0]
