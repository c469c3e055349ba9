"""Pure-PyTorch reference implementations: the executable specification of every fastkd op.

The kernels are tested against these functions, and these functions against float64 math. They favour
clarity over speed and memory (they build several N×V temporaries), and are differentiable with autograd.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every reference computes in."""
    for t in tensors:  # a loop, not any(generator): this runs on every kd_loss call
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _weighted(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """Element-wise p·log_ratio with 0 where p = 0 (0·log 0 = 0); autograd-safe where log_ratio is ±inf or NaN.
    A NaN p stays NaN (a NaN logit must not vanish from the loss)."""
    zero = p == 0
    return torch.where(zero, 0, p * torch.where(zero, 0, log_ratio))


def counted_rows_only(x: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """``x`` (*, V) with the rows whose label is ``ignore_index`` replaced by zeros (``x`` itself without labels):
    an ignored row enters no computation, so its gradient is exactly 0 even where its logits would give NaN
    (a row of −inf has no softmax)."""
    if labels is None:
        return x
    return torch.where((labels != ignore_index).unsqueeze(-1), x, 0)


def log_mixture_ratio(x: torch.Tensor, w: float) -> torch.Tensor:
    """log(1 − w + w·eˣ) for w in [0, 1] and x in [−inf, inf], accurate to rounding also where the result is tiny.

    With x = log p − log q it is log(m/q) for the mixture m = w·p + (1 − w)·q: computing it from x with
    log1p/expm1, instead of subtracting log q from log m, keeps the generalized JSD accurate as β → 0 or 1.
    """
    if w == 0:
        return torch.zeros_like(x)
    if w == 1:
        return x
    nan = x.isnan()
    x = torch.where(nan, 0, x)  # the branches below stay NaN-free for autograd; NaN is put back at the end
    with torch.no_grad():
        y = w * torch.expm1(x)
        tiny = (y > -0.5) & (y <= 1)  # log1p(y) is exact here
        low = y <= -0.5  # 1 − w + w·eˣ is a sum of two positive terms, no cancellation
        high = ~(tiny | low)  # e^x may overflow: work in log space
    tiny_value = torch.log1p(w * torch.expm1(torch.where(tiny, x, 0)))
    low_value = torch.log((1 - w) + w * torch.exp(torch.where(low, x, 0)))
    high_value = torch.logaddexp(
        torch.tensor(math.log1p(-w), dtype=x.dtype, device=x.device),
        math.log(w) + torch.where(high & x.isfinite(), x, 0),
    )
    value = torch.where(tiny, tiny_value, torch.where(low, low_value, high_value))
    return torch.where(nan, math.nan, torch.where(x == math.inf, math.inf, value))


def kd_divergence_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float, divergence: str, beta: float
) -> torch.Tensor:
    """Per-row divergence D between p_t = softmax(t/T) and p_s = softmax(s/T) of (N, V) logits, shape (N,).

    ``"kl"``: Σ p_t (log p_t − log p_s); ``"reverse_kl"``: Σ p_s (log p_s − log p_t);
    ``"jsd"``: β·KL(p_t‖m) + (1−β)·KL(p_s‖m) with m = β·p_t + (1−β)·p_s (exactly 0 at β = 0 and β = 1);
    ``"cosine"``: 1 − ⟨p_s, p_t⟩/(‖p_s‖‖p_t‖); ``"tvd"``: ½ Σ |p_s − p_t| (total variation distance).
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "kl":
        return _weighted(log_p_t.exp(), log_p_t - log_p_s).sum(-1)
    if divergence == "reverse_kl":
        return _weighted(log_p_s.exp(), log_p_s - log_p_t).sum(-1)
    if divergence == "jsd":
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        both_zero = (log_p_t == -math.inf) & (log_p_s == -math.inf)  # masked in both: weighted by 0 below
        log_ratio = torch.where(both_zero, 0, log_p_t - log_p_s)
        jsd = torch.zeros_like(log_p_s[..., 0])
        # log(p_t/m) = −log(1 − (1−β) + (1−β)·p_s/p_t), log(p_s/m) = −log(1 − β + β·p_t/p_s)
        if beta > 0:  # a zero weight drops its term entirely, so an infinite KL there cannot turn into 0·inf = NaN
            jsd = jsd - beta * _weighted(p_t, log_mixture_ratio(-log_ratio, 1 - beta)).sum(-1)
        if beta < 1:
            jsd = jsd - (1 - beta) * _weighted(p_s, log_mixture_ratio(log_ratio, beta)).sum(-1)
        return jsd
    if divergence == "cosine":
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        return 1 - (p_s * p_t).sum(-1) / (p_s.norm(dim=-1) * p_t.norm(dim=-1))
    if divergence == "tvd":  # |x| as x·sign(x): the same value and subgradient, and a NaN keeps its gradient NaN
        difference = log_p_s.exp() - log_p_t.exp()
        sign = torch.where(difference.isnan(), math.nan, torch.sign(difference)).detach()
        return 0.5 * (difference * sign).sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−log softmax(logits)[target] per row. From log_softmax, which subtracts the row max before anything else:
    its gradient softmax − onehot stays exact to rounding for logits of ±1e4 (logsumexp(s) − s[target] would
    cancel two numbers of 1e4 and lose four digits in the gradient)."""
    return -F.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def kd_loss_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    temperature: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    ce_weight: float,
    kd_weight: float,
    scale_by_t2: bool,
) -> torch.Tensor:
    """Per-row kd_loss of (N, V) logits before reduction, shape (N,), in float32 (float64 for float64 inputs).

    row loss = kd_weight·(T² if scale_by_t2)·D(p_t, p_s) + ce_weight·CE(softmax(s), label), where D is
    :func:`kd_divergence_rows` at temperature T and CE is at temperature 1. A row whose label is
    ``ignore_index`` has loss 0 (and gradient 0); a row whose label is neither ``ignore_index`` nor in
    [0, V) has loss NaN. A zero weight drops its term (no 0·inf).
    """
    math_dtype = _math_dtype(student_logits, teacher_logits)
    s = counted_rows_only(student_logits.to(math_dtype), labels, ignore_index)
    t = counted_rows_only(teacher_logits.to(math_dtype), labels, ignore_index)
    num_classes = s.shape[-1]
    loss = torch.zeros(s.shape[:-1], dtype=math_dtype, device=s.device)
    if kd_weight != 0:
        t2 = temperature * temperature if scale_by_t2 else 1.0
        divergence_rows = kd_divergence_rows(s, t, temperature=temperature, divergence=divergence, beta=beta)
        loss = loss + kd_weight * t2 * divergence_rows
    if labels is None:
        return loss
    counted = labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    if ce_weight != 0:
        target = torch.where(counted & in_range, labels, 0).long()
        loss = loss + ce_weight * _cross_entropy(s, target)
    loss = torch.where(counted, loss, 0)
    return torch.where(counted & ~in_range, math.nan, loss)


def kd_fidelity_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor], *, ignore_index: int
) -> torch.Tensor:
    """Per-row fidelity metrics of (N, V) logits at temperature 1, shape (4, N), no gradient: top-1 agreement
    (argmax s = argmax t, 1 or 0), KL(p_t‖p_s), H(p_t), H(p_s); 0 at rows whose label is ``ignore_index``."""
    with torch.no_grad():
        math_dtype = _math_dtype(student_logits, teacher_logits)
        s = student_logits.to(math_dtype)
        t = teacher_logits.to(math_dtype)
        log_p_s, log_p_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
        rows = torch.stack(
            [
                (s.argmax(-1) == t.argmax(-1)).to(math_dtype),
                kd_divergence_rows(s, t, temperature=1.0, divergence="kl", beta=0.5),
                -_weighted(log_p_t.exp(), log_p_t).sum(-1),
                -_weighted(log_p_s.exp(), log_p_s).sum(-1),
            ]
        )
        if labels is not None:
            rows = torch.where(labels != ignore_index, rows, 0)
        return rows


def dkd_loss_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
    ce_weight: float,
) -> torch.Tensor:
    """Per-row decoupled KD loss of (N, V) logits, V ≥ 2, shape (N,), float32 (float64 for float64 inputs):
    α·T²·KL(b_t‖b_s) + β·T²·KL(p̂_t‖p̂_s) + ce_weight·CE, with b = [p_gt, 1 − p_gt] and p̂ the softmax over the
    non-target classes, all from log-sum-exp with and without the target class (no log of a sum of
    probabilities). 0 at rows whose label is ``ignore_index``, NaN at other labels outside [0, V)."""
    math_dtype = _math_dtype(student_logits, teacher_logits)
    s = counted_rows_only(student_logits.to(math_dtype), labels, ignore_index)
    t = counted_rows_only(teacher_logits.to(math_dtype), labels, ignore_index)
    num_classes = s.shape[-1]
    counted = labels != ignore_index
    in_range = (labels >= 0) & (labels < num_classes)
    target = torch.where(counted & in_range, labels, 0).long().unsqueeze(-1)
    is_target = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, target, True)

    def split_log_probs(x):
        """log p_gt, log(1 − p_gt) and log p̂ (−inf at the target) of logits at temperature T: the binary pair
        from the target logit z_gt and the non-target log-sum-exp r, as −softplus(r − z_gt) and −softplus(z_gt − r)
        (accurate however close p_gt is to 0 or 1). The max of the non-target z is subtracted first (the results
        do not depend on it, so it takes no gradient): at z = x/T of size 200 a float32 ulp is 1.5e-5, and the
        gradient of a class holding all but 5e-5 of p̂ would lose a quarter of its value; the overall max would
        not do when the target dominates, as then the non-target z − max are of that size (both found by
        tests/test_properties.py)."""
        z = x / temperature
        rest_max = z.masked_fill(is_target, -math.inf).amax(dim=-1, keepdim=True).detach()
        z = z - torch.where(rest_max.isfinite(), rest_max, 0)
        log_sum_rest = torch.logsumexp(z.masked_fill(is_target, -math.inf), dim=-1)
        gap = z.gather(-1, target).squeeze(-1) - log_sum_rest
        log_hat = z.masked_fill(is_target, -math.inf) - log_sum_rest.unsqueeze(-1)
        return -F.softplus(-gap), -F.softplus(gap), log_hat

    log_gt_s, log_rest_s, log_hat_s = split_log_probs(s)
    log_gt_t, log_rest_t, log_hat_t = split_log_probs(t)
    tckd = _weighted(log_gt_t.exp(), log_gt_t - log_gt_s) + _weighted(log_rest_t.exp(), log_rest_t - log_rest_s)
    # p̂ = 0 in both at the target: 0·log(0/0) = 0
    nckd = _weighted(log_hat_t.exp(), torch.where(is_target, 0, log_hat_t - log_hat_s)).sum(-1)
    loss = temperature * temperature * (alpha * tckd + beta * nckd)
    if ce_weight != 0:
        loss = loss + ce_weight * _cross_entropy(s, target.squeeze(-1))
    loss = torch.where(counted, loss, 0)
    return torch.where(counted & ~in_range, math.nan, loss)


def ensemble_teacher_logits(
    teacher_logits: torch.Tensor, weights: torch.Tensor, *, ensemble: str, temperature: float
) -> torch.Tensor:
    """Logits z of shape ``teacher_logits.shape[1:]`` whose softmax(z/T) is the target of K teachers
    ``teacher_logits`` (K, *, V) with weights (K,) summing to 1, float32 (float64 for float64 inputs):

    - ``"prob"``: Σ_k w_k softmax(t_k/T), the arithmetic mean of the distributions, as z = T·log Σ_k w_k
      softmax(t_k/T) (a log-sum-exp over k of log w_k + log_softmax(t_k/T));
    - ``"logit"``: softmax(Σ_k w_k t_k / T), the normalised geometric mean, as z = Σ_k w_k t_k.

    A teacher of weight 0 is absent (whatever its logits hold).
    """
    math_dtype = _math_dtype(teacher_logits)
    w = weights.to(device=teacher_logits.device, dtype=math_dtype).reshape((-1,) + (1,) * (teacher_logits.dim() - 1))
    # a teacher of weight 0 enters no computation: its logits (which may be −inf, a whole row even) are replaced by 0
    t = torch.where(w > 0, teacher_logits.to(math_dtype), 0)
    if ensemble == "logit":
        return (w * t).sum(0)
    if ensemble == "prob":
        log_p = F.log_softmax(t / temperature, dim=-1) + torch.log(w)
        return temperature * torch.logsumexp(log_p, dim=0)
    raise ValueError(f"unknown ensemble {ensemble!r}")


def head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    *,
    vocab_size: int,
    softcap: Optional[float],
) -> torch.Tensor:
    """The logits of an output head (the specification of :func:`fastkd.linear_kd_loss`'s heads):
    z = hidden @ weight[:vocab_size]ᵀ (+ bias[:vocab_size]) in the inputs' dtype, then, with ``softcap`` c,
    c·tanh(z/c) in the math dtype (float32, float64 for float64 inputs). Shape (*, vocab_size)."""
    logits = F.linear(hidden, weight[:vocab_size], None if bias is None else bias[:vocab_size])
    if softcap is None:
        return logits
    logits = logits.to(_math_dtype(logits))
    return softcap * torch.tanh(logits / softcap)


def _sparse_rows(student_logits, values, indices, temperature, teacher_temperature):
    """The parts every sparse-teacher formula shares: z = s/T and its log-sum-exp, which slots hold an entry
    (index ≥ 0), log p_s at them (−inf at empty slots), the teacher's log-weights v/T_t there (−inf at empty
    slots), which columns are entries (N, V), and the rest's class count V − n."""
    math_dtype = _math_dtype(student_logits, values)
    num_classes = student_logits.shape[-1]
    z = student_logits.to(math_dtype) / temperature
    log_sum = torch.logsumexp(z, dim=-1, keepdim=True)
    present = indices >= 0  # −1: an empty slot; other negative indices make the row NaN (kd_topk_rows)
    columns = torch.where(present, indices, num_classes)  # empty slots point one past the last class
    log_p_s = torch.where(present, F.pad(z, (0, 1)).gather(-1, columns) - log_sum, -math.inf)
    weights = torch.where(present, values.to(math_dtype) / teacher_temperature, -math.inf)
    entry_columns = torch.zeros((*z.shape[:-1], num_classes + 1), dtype=torch.bool, device=z.device)
    entry_columns = entry_columns.scatter(-1, columns, True)[..., :num_classes]
    rest_classes = num_classes - present.sum(-1, keepdim=True)
    return z, log_sum, present, log_p_s, weights, entry_columns, rest_classes


def _tail_log_mass(values, present):
    """log(1 − Σ_k exp v_k) of log-probabilities v over a row's entries, −inf where they hold all the mass; the sum
    in float64 (K values a row): in float32 a tail of 1e-3 carries 6e-5 of rounding."""
    log_mass = torch.logsumexp(torch.where(present, values.double(), -math.inf), dim=-1, keepdim=True)
    return torch.log(-torch.expm1(log_mass.clamp(max=0.0)))


def _topk_log_probs(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    tail: str,
    temperature: float,
    teacher_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_t, log p_s) over the K slots of a sparse teacher, plus the bucket of the rest with ``tail="bucket"``
    (and K < V): see :func:`kd_topk_rows`. A row whose p_t is empty (no entries and no bucket) gets log p_t = −inf
    throughout."""
    z, log_sum, present, log_p_s, weights, entry_columns, _ = _sparse_rows(
        student_logits, values, indices, temperature, teacher_temperature
    )
    if tail in ("bucket", "spread") and indices.shape[-1] < z.shape[-1]:  # K = V: no rest, the bucket is empty
        log_tail = _tail_log_mass(values, present).to(weights.dtype)
        weights = torch.cat([weights, log_tail / teacher_temperature], dim=-1)
        rest = torch.logsumexp(torch.where(entry_columns, -math.inf, z), dim=-1, keepdim=True)
        log_p_s = torch.cat([log_p_s, rest - log_sum], dim=-1)
    empty = (weights == -math.inf).all(-1, keepdim=True)  # no entries, no bucket: no softmax (never NaN)
    log_p_t = torch.where(empty, -math.inf, F.log_softmax(torch.where(empty, 0, weights), dim=-1))
    return log_p_t, log_p_s


def kd_topk_rows(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    tail: str,
    temperature: float,
    teacher_temperature: Optional[float] = None,
) -> torch.Tensor:
    """Per-row KL(p_t‖p_s) of (N, V) student logits against a sparse teacher given by its top-K entries
    ``values`` / ``indices`` (N, K), float32 (float64 for float64 inputs), before the T² and weights.

    A slot whose index is −1 is empty (a ragged teacher: top-p truncation, sampled draws): it takes no part, so a
    row has n ≤ K entries. The teacher's log-weights are v_k/T_t on its n classes (v: logits or log-probabilities;
    T_t = ``teacher_temperature``, T by default; 1 for sampled teachers, whose v are the target itself); with
    ``tail="bucket"`` (log-probabilities only) an extra pseudo-class, the rest of the vocabulary, has log-weight
    log(1 − Σ_k exp v_k)/T_t; p_t is their softmax (at T = 1 exactly the given probabilities and the remaining
    mass). With ``tail="renormalize"`` p_t is the softmax over the n classes alone, and a row without entries
    has no teacher: its KL is 0. The student keeps its full-row normalisation: log p_s,k = s_k/T − logsumexp(s/T),
    and its bucket probability is the mass of every class outside the entries (a log-sum-exp over those columns).

    ``tail="spread"`` (log-probabilities only) makes the teacher a full distribution: the rest's mass
    r = 1 − Σ_k exp v_k spread evenly over its V − n classes, each of log-probability log(r/(V − n)), then
    tempered like the entries: log-weights v_k/T and log(r/(V − n))/T. The loss is the full KL over all V
    classes, Σ_k p_k (log p_k − log p_s,k) + p_j·((V − n)·log p_j − Σ_{i∉K} log p_s,i) with p_j the probability
    of each class of the rest, so it also measures how far the student's rest is from even, and at T > 1 it keeps
    the scale of full-logit KD, where the bucket tempers V − n classes as if they were one (bench/topk_tail.py).
    Tempering inflates a small rest ((V − n)·(r/(V − n))^(1/T) against the K's p_k^(1/T)), also its rounding: where
    the K hold nearly all the mass and T > 1, store the log-probabilities in float32 rather than bfloat16.

    With K = V the rest is empty whatever the tail (the bucket and the spread drop out).
    """
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    invalid = (indices < -1).any(-1)  # as the kernels: an index below −1 is no empty slot but a bad one
    if tail == "spread" and indices.shape[-1] < student_logits.shape[-1]:
        rows = _spread_topk_rows(student_logits, values, indices, temperature, teacher_temperature)
    else:
        log_p_t, log_p_s = _topk_log_probs(
            student_logits, values, indices, tail=tail, temperature=temperature, teacher_temperature=teacher_temperature
        )
        rows = _weighted(log_p_t.exp(), log_p_t - log_p_s).sum(-1)
    return torch.where(invalid, math.nan, rows)


def _spread_topk_rows(student_logits, values, indices, temperature, teacher_temperature):
    """:func:`kd_topk_rows` with ``tail="spread"`` and K < V."""
    z, log_sum, present, log_q_top, w_top, entry_columns, rest_classes = _sparse_rows(
        student_logits, values, indices, temperature, teacher_temperature
    )
    rest_count = rest_classes.to(z.dtype)
    log_q_rest_sum = torch.where(entry_columns, 0, z).sum(-1, keepdim=True) - rest_count * log_sum
    log_rest = _tail_log_mass(values, present).to(z.dtype)  # −inf when the entries hold all the mass
    w_each = (log_rest - torch.log(rest_count)) / teacher_temperature
    log_norm = torch.logsumexp(torch.cat([w_top, w_each + torch.log(rest_count)], dim=-1), dim=-1, keepdim=True)
    log_p_top, log_p_each = w_top - log_norm, w_each - log_norm
    kl_top = _weighted(log_p_top.exp(), log_p_top - log_q_top).sum(-1)
    p_each = log_p_each.exp()
    kl_rest = torch.where(p_each > 0, p_each * (rest_count * log_p_each - log_q_rest_sum), 0.0)
    return kl_top + kl_rest.squeeze(-1)


def kd_topk_fidelity_rows(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    tail: str,
    ignore_index: int,
) -> torch.Tensor:
    """The fidelity metrics of :func:`kd_fidelity_rows` against a sparse teacher, (4, N), no gradient: top-1
    agreement (argmax s = the teacher's top class, the smaller index on ties), KL(p_t‖p_s) at T = 1 and H(p_t) of
    the sparse teacher (over its K classes and, with ``tail="bucket"``, the rest as one class: a lower bound of
    the full teacher's entropy), and H(p_s) of the full student row at T = 1; 0 at ignored rows."""
    with torch.no_grad():
        log_p_t, log_p_s = _topk_log_probs(
            student_logits, values, indices, tail=tail, temperature=1.0, teacher_temperature=1.0
        )
        math_dtype = log_p_t.dtype
        s = student_logits.to(math_dtype)
        v = torch.where(indices >= 0, values.to(math_dtype), -math.inf)
        top_slots = (v == v.amax(-1, keepdim=True)) & (indices >= 0)
        top = torch.where(top_slots, indices, student_logits.shape[-1]).amin(-1)
        log_q = F.log_softmax(s, dim=-1)
        rows = torch.stack(
            [
                (s.argmax(-1) == top).to(math_dtype),
                _weighted(log_p_t.exp(), log_p_t - log_p_s).sum(-1),
                -_weighted(log_p_t.exp(), log_p_t).sum(-1),
                -_weighted(log_q.exp(), log_q).sum(-1),
            ]
        )
        if labels is not None:
            rows = torch.where(labels != ignore_index, rows, 0)
        return rows


def _unit_or_kept(x: torch.Tensor, previous: torch.Tensor, eps: float) -> torch.Tensor:
    """x/‖x‖, or ``previous`` where ‖x‖ ≤ eps."""
    norm = x.norm()
    return torch.where(norm > eps, x / norm.clamp_min(eps), previous)


def power_iteration(matrices: list, u: torch.Tensor, v: torch.Tensor, *, n_iter: int, eps: float):
    """``n_iter`` power iterations on each matrix W (m × n) of ``matrices`` from the flat vectors u (Σ m) and v
    (Σ n), without gradient: a = W v, b = Wᵀ u, σ = ‖a‖, u ← a/σ, v ← b/‖b‖ (both from the previous vectors: one
    read of W per iteration). Returns σ (L,) of the last iteration, the new u and v, and
    the v that the last iteration started from. A vector whose new norm is ≤ eps is kept unchanged (a zero weight
    must not zero its state for good)."""
    dtype = _math_dtype(*matrices)
    with torch.no_grad():
        u_parts = list(u.to(dtype).split([w.shape[0] for w in matrices]))
        v_parts = list(v.to(dtype).split([w.shape[1] for w in matrices]))
        sigma = torch.zeros(len(matrices), dtype=dtype, device=u.device)
        v_prev = v_parts
        for _ in range(n_iter):
            v_prev = v_parts
            products = [(w.to(dtype) @ v_i, w.to(dtype).T @ u_i) for w, u_i, v_i in zip(matrices, u_parts, v_parts)]
            sigma = torch.stack([a.norm() for a, _ in products])
            u_parts = [_unit_or_kept(a, u_i, eps) for (a, _), u_i in zip(products, u_parts)]
            v_parts = [_unit_or_kept(b, v_i, eps) for (_, b), v_i in zip(products, v_parts)]
    return sigma, torch.cat(u_parts), torch.cat(v_parts), torch.cat(v_prev)


def spectral_norms(matrices: list, u: torch.Tensor, v: torch.Tensor, *, n_iter: int, eps: float):
    """σ_max estimates of ``matrices`` after :func:`power_iteration`, differentiable in the matrices:
    σ_i = uᵢᵀ W_i vₚᵣₑᵥ,ᵢ (= ‖W_i vₚᵣₑᵥ,ᵢ‖) with the vectors held constant, so ∂σ_i/∂W_i = uᵢ vₚᵣₑᵥ,ᵢᵀ (as in
    ``torch.nn.utils.spectral_norm``). Returns σ (L,) and the new u and v."""
    _, u, v, v_prev = power_iteration(matrices, u, v, n_iter=n_iter, eps=eps)
    u_parts = u.split([w.shape[0] for w in matrices])
    v_parts = v_prev.split([w.shape[1] for w in matrices])
    sigma = torch.stack([u_i @ (w.to(u.dtype) @ v_i) for w, u_i, v_i in zip(matrices, u_parts, v_parts)])
    return sigma, u, v


def transmitting_singular_values(
    features: list, *, n_iter: int, init: str, eps: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """LONDON's σ_i per sample for adjacent features F_i → F_{i+1} of shape (B, C, H, W): G_i =
    pool(F_i)·F_{i+1}ᵀ/(H_{i+1}W_{i+1}) (C_i × C_{i+1}, F_i average-pooled to F_{i+1}'s size), K = G Gᵀ, and
    ``n_iter`` steps of v ← Kv/‖Kv‖ from v₀ = 1 (``init="ones"``) or v₀ ~ U(0, 1) (``"uniform"``), normalised;
    σ_i = sqrt(max(‖K v‖, eps)) of the last step. Autograd differentiates through the iterations. Returns
    (L − 1, B)."""
    dtype = _math_dtype(*features)
    sigmas = []
    for early, late in zip(features[:-1], features[1:]):
        early, late = early.to(dtype), late.to(dtype)
        size = late.shape[2:]
        pooled = F.adaptive_avg_pool2d(early, size).flatten(2)  # (B, C_i, HW)
        gram = pooled @ late.flatten(2).transpose(1, 2) / (size[0] * size[1])  # (B, C_i, C_{i+1})
        kernel = gram @ gram.transpose(1, 2)  # (B, C_i, C_i)
        shape = (gram.shape[0], gram.shape[1], 1)
        vec = (
            torch.ones(shape, dtype=dtype, device=gram.device)
            if init == "ones"
            else torch.rand(shape, generator=generator, dtype=dtype, device=gram.device)
        )
        vec = vec / vec.norm(dim=1, keepdim=True).clamp_min(eps)
        for _ in range(n_iter):
            product = kernel @ vec
            norm = product.norm(dim=1, keepdim=True)
            vec = product / norm.clamp_min(eps)
        sigmas.append(norm.flatten().clamp_min(eps).sqrt())
    return torch.stack(sigmas)


FEATURE_NORM_EPS = 1e-5  # standardisation: (x − mean)/sqrt(var + eps), as BatchNorm/LayerNorm
FEATURE_L2_EPS = 1e-12  # l2: x/max(‖x‖, eps), as F.normalize
FEATURE_COSINE_EPS = 1e-8  # cosine: ⟨s, t⟩/(max(‖s‖, eps)·max(‖t‖, eps))


def _standardize(x: torch.Tensor, present: torch.Tensor, dims: tuple) -> torch.Tensor:
    """(x − mean)/sqrt(var + eps) over ``dims``, statistics over the present elements only, 0 where absent; x must
    already be 0 where absent."""
    count = present.sum(dims, keepdim=True).clamp_min(1)
    centered = torch.where(present, x - x.sum(dims, keepdim=True) / count, 0)
    return centered / torch.sqrt((centered**2).sum(dims, keepdim=True) / count + FEATURE_NORM_EPS)


def feature_loss_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str,
    beta: float,
    normalize: Optional[str],
    margin: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted loss terms and their weights of :func:`fastkd.feature_loss`, on features already in the
    (N, C, S) layout (channels in dim 1, the spatial/token dims flattened into S) and a float mask broadcast to
    it. Elements with mask 0 are absent: they enter no statistic and no loss. Returns ``(terms, weights)``, both
    (N, C, S) for element-wise kinds and (N, 1, S) for ``"cosine"``; the loss is Σ terms (÷ Σ weights for
    ``"mean"``)."""
    dtype = _math_dtype(student, teacher)
    m = mask.to(dtype)
    present = m != 0
    # absent elements are zeroed first: a NaN or inf there must reach neither the loss nor the gradient
    s, t = torch.where(present, student.to(dtype), 0), torch.where(present, teacher.to(dtype), 0)
    if normalize == "channel":
        s, t = _standardize(s, present, (2,)), _standardize(t, present, (2,))
    elif normalize == "sample":
        s, t = _standardize(s, present, (1, 2)), _standardize(t, present, (1, 2))
    elif normalize == "l2" and kind != "cosine":  # cosine does not change when its inputs are rescaled
        s = s / s.norm(dim=1, keepdim=True).clamp_min(FEATURE_L2_EPS)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(FEATURE_L2_EPS)
    if kind == "cosine":
        m = m[:, :1]  # the mask is constant along the channels (checked by feature_loss)
        dot = (s * t).sum(1, keepdim=True)
        norms = s.norm(dim=1, keepdim=True).clamp_min(FEATURE_COSINE_EPS) * t.norm(dim=1, keepdim=True).clamp_min(
            FEATURE_COSINE_EPS
        )
        return torch.where(m != 0, m * (1 - dot / norms), 0), m
    counted = None
    if margin is not None:
        margin = margin.to(dtype).view(1, -1, 1)
        t = torch.where(t > margin, t, margin)  # at a tie the margin is the target
        counted = present & ((s > t) | (t > 0))
    diff = s - t
    if kind == "mse":
        term = diff**2
    elif kind == "l1":
        term = diff.abs()
    else:  # smooth_l1
        term = torch.where(diff.abs() < beta, 0.5 * diff**2 / beta, diff.abs() - 0.5 * beta)
    terms = m * term  # 0 where absent: m = 0 there and the zeroed inputs keep the term finite
    return (terms if counted is None else torch.where(counted, terms, 0)), m


def rkd_pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """‖x_i − x_j‖₂ of (B, D) embeddings, (B, B), from the differences themselves (exactly 0 for equal rows); the
    gradient at a zero distance is 0."""
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1)
    positive = squared > 0
    return torch.where(positive, torch.where(positive, squared, 1).sqrt(), 0)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD's distance-wise loss (Park et al., CVPR 2019, as their code computes it): ψ = d/μ with d the (B, B)
    pairwise distances and μ the mean of the positive ones (1 if there are none), on each side; the mean over all
    B² entries of smooth_l1(ψ_s − ψ_t) (δ = 1). The teacher gets no gradient. Math in float32 (float64 for float64
    inputs)."""
    dtype = _math_dtype(student, teacher)
    parts = []
    for x in (student.to(dtype), teacher.detach().to(dtype)):
        d = rkd_pairwise_distances(x)
        positive = d > 0
        mean = torch.where(positive, d, 0).sum() / positive.sum().clamp_min(1)
        parts.append(d / torch.where(positive.any(), mean, 1))
    return F.smooth_l1_loss(parts[0], parts[1], reduction="mean")


def rkd_angles(x: torch.Tensor) -> torch.Tensor:
    """(B, B, B) cosines ⟨e_ij, e_ik⟩ of the unit differences e_ij = (x_j − x_i)/‖x_j − x_i‖ from each anchor i
    (e_ij = 0 where x_j = x_i), as RKD's code forms them (the (B, B, D) differences, normalised, then batched
    products; the gradient through a zero difference is 0)."""
    differences = x.unsqueeze(0) - x.unsqueeze(1)  # [i, j] = x_j − x_i
    norms = differences.norm(dim=-1, keepdim=True)
    units = torch.where(norms > 0, differences / torch.where(norms > 0, norms, 1), 0)
    return torch.bmm(units, units.transpose(1, 2))


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD's angle-wise loss: the mean over all B³ triplets of smooth_l1(ψ_A(s) − ψ_A(t)) with ψ_A the cosines of
    :func:`rkd_angles` (δ = 1). The teacher gets no gradient."""
    dtype = _math_dtype(student, teacher)
    return F.smooth_l1_loss(rkd_angles(student.to(dtype)), rkd_angles(teacher.detach().to(dtype)), reduction="mean")


def graph_adjacency(features: torch.Tensor, knn: Optional[int] = None) -> torch.Tensor:
    """The normalised similarity graph of a batch (Lassance et al., ICASSP 2020, as their code builds it): the
    features flattened to (B, D) and L2-normalised (eps 1e-12), A = cosine similarities with a zero diagonal,
    optionally sparsified to each row's ``knn`` largest entries (kept where i is among j's or j among i's), then
    D^{-1/2} A D^{-1/2} with the degrees d_i = Σ_j A_ij; a row of degree ≤ 0 (possible with negative
    similarities) is 0. Math in float32 (float64 for float64 input)."""
    x = F.normalize(features.flatten(1).to(_math_dtype(features)), p=2, dim=1, eps=1e-12)
    batch = x.shape[0]
    adjacency = (x @ x.T) * (1 - torch.eye(batch, dtype=x.dtype, device=x.device))
    if knn is not None and knn < batch - 1:
        off_diagonal = adjacency - torch.diag(torch.full((batch,), math.inf, dtype=x.dtype, device=x.device))
        kept = torch.zeros_like(adjacency, dtype=torch.bool).scatter(1, off_diagonal.topk(knn, dim=1).indices, True)
        adjacency = torch.where(kept | kept.T, adjacency, 0)
    degree = adjacency.sum(1)
    positive = degree > 0
    scale = torch.where(positive, torch.where(positive, degree, 1).rsqrt(), 0)
    return scale.unsqueeze(1) * adjacency * scale.unsqueeze(0)


CRD_EPS = 1e-7  # the NCE loss's eps, as RepDistiller's crd/criterion.py


def crd_scores(bank: torch.Tensor, contrast_index: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B, K+1) scores ⟨bank[contrast_index[b, k]], anchors[b]⟩ by gathering the (B, K+1, d) rows, as CRD's code
    does (the bank gets no gradient)."""
    rows = bank.detach()[contrast_index]  # (B, K+1, d)
    return torch.bmm(rows, anchors.unsqueeze(-1)).squeeze(-1)


def crd_nce_loss(scores: torch.Tensor, normalizer, *, temperature: float, num_samples: int) -> torch.Tensor:
    """CRD's NCE loss (Tian et al., ICLR 2020, Eq. 18 as crd/criterion.py computes it) of (B, K+1) scores u, column
    0 the positive: x = exp(u/τ)/Z, c = K/N + eps; −(Σ_b log(x_b0/(x_b0 + c)) + Σ_{b,k≥1} log((K/N)/(x_bk + c)))/B."""
    x = torch.exp(scores / temperature) / normalizer
    negatives = scores.shape[1] - 1
    noise = negatives / num_samples
    log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + CRD_EPS))
    log_d0 = torch.log(noise / (x[:, 1:] + noise + CRD_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]
