r"""Vocabulary-parallel :func:`fastkd.kd_loss` over ``torch.distributed``: each rank holds a contiguous slice of the
vocabulary of the student and teacher logits (tensor parallelism: Megatron, torchtitan, DTensor ``Shard(-1)``),
every rank returns the loss of the whole rows, and each rank's gradient is its slice of the full gradient.

Row statistics are merged, never the logits: each rank reduces its slice of a row to eight float32 numbers, one
all-gather shares them, and every rank merges the W messages itself (an online-softmax merge), so that

- forward: **one** collective per call, an all-gather of 8 float32 per row per rank (each rank receives
  32·W bytes per row; also one extra row carrying each rank's slice size and start, which are checked to tile the
  vocabulary), for ``divergence="kl"`` and ``"reverse_kl"`` with or without the CE term; with ``return_stats``
  the same message carries 7 more numbers per row (the T = 1 sums of the metrics and each slice's first
  argmax: 60·W bytes per row); ``"cosine"`` sends ‖e_a‖², ‖e_b‖² and ⟨e_a, e_b⟩ in the same slots (one
  collective); ``"jsd"`` and ``"tvd"`` need the merged normalisers before their terms, so a second all-gather
  of 2 (jsd) or 3 (tvd) numbers per row follows (two collectives);
- backward: **no** collective: each rank's gradient needs the merged normalisers of its rows only, saved by the
  forward.

Megatron's and ModelOpt's vocab-parallel KL reduce the maxima, the two sums and the weighted log ratio in separate
all-reduces (four in the forward, one in the backward; bench/RESULTS.md has the comparison).

The message of a row on rank r, with a = s/T and b = t/T over its columns j (m: the slice's max, e: exp(x − m))::

    m_a, S_a = Σ e_a, m_b, S_b = Σ e_b,
    w = Σ e_b·[(b − m_b) − (a − m_a)]        (kl; reverse_kl: Σ e_a·[(a − m_a) − (b − m_b)])
    m_1, S_1 (of s at T = 1, the CE term), s at the label if this rank holds it (else 0)

Merged over ranks with M = max_r m_r, c_r = exp(m_r − M): S = Σ_r c_r·S_r, and the centred w moves with its
maxima, w = Σ_r c_b,r·(w_r + S_b,r·((m_b,r − M_b) − (m_a,r − M_a))). Then KL(p_t‖p_s) = w/S_b − log S_b + log S_a,
exactly the single-process formula of the kernels (kernels/kd.py), and CE = M_1 + log S_1 − s_label.

This first version computes the slices' statistics and gradients with PyTorch operations in float32 (the merge is
what this module adds; the fused row kernels per slice come next): ensembles and sparse teachers are refused with
``group``. :func:`fastkd.linear_kd_loss` takes ``group`` for vocabulary-sharded heads
(:func:`vocab_parallel_linear_kd_loss`, every divergence). :func:`fastkd.dkd_loss` takes ``group``
too: its message holds the non-target classes' statistics and both target logits (9 numbers a row, one
all-gather), and NCKD, TCKD and their gradients follow as in the single-process kernels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import kd, reference
from .topk import TopK

DIVERGENCES = ("kl", "reverse_kl", "jsd", "cosine", "tvd")  # kd_loss's; dkd_loss takes the same path as "dkd"
# the message of a row: slots of the (N + 1, fields) float32 tensor each rank sends; the last 7 only for return_stats
M_A, S_A, M_B, S_B, W, M_1, S_1, LABEL_LOGIT = range(8)
M_T1, S_T1, W_1, U_T, U_S, ARGMAX_S, ARGMAX_T = range(8, 15)
TEACHER_LABEL_LOGIT = 8  # dkd (no return_stats): t at the label, beside s's in LABEL_LOGIT
SLICE_SIZE, SLICE_START = 0, 1  # slots of the extra last row: this rank's slice of the vocabulary


def _all_gather(local: torch.Tensor, group) -> torch.Tensor:
    """(world, *local.shape): every rank's ``local``, in one collective."""
    world = dist.get_world_size(group)
    out = torch.empty((world * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.contiguous(), group=group)
    return out.reshape(world, *local.shape)


def _centred(x: torch.Tensor):
    """(max x, x − max x (max 0 where the row is all −inf), its exponentials) along the last dim (an empty slice:
    max −inf, no exponentials)."""
    if x.shape[-1] == 0:
        top = x.new_full(x.shape[:-1], -math.inf)
        return top, x, x
    top = x.amax(-1)
    centred = x - _finite_or_zero(top).unsqueeze(-1)
    return top, centred, centred.exp()


def _slice_message(s, t, local_labels, vocab_start: int, options: dict, with_stats: bool) -> torch.Tensor:
    """The (N, 8) statistics of this rank's slices of s and t (float32) at T, (N, 15) with the metrics' at T = 1."""
    inv_t = 1.0 / options["temperature"]
    dkd = options["divergence"] == "dkd"
    target = _target_columns(local_labels, s.shape[-1]) if dkd else None
    m_a, centred_a, e_a = _centred(_without(s * inv_t, target))  # dkd: the non-target classes only
    m_b, centred_b, e_b = _centred(_without(t * inv_t, target))
    m_1, centred_1, e_1 = _centred(s)
    if options["divergence"] in ("kl", "dkd"):  # dkd: NCKD, KL(p̂_t‖p̂_s)
        w = _weighted(e_b, centred_b - centred_a).sum(-1)
    elif options["divergence"] == "reverse_kl":
        w = _weighted(e_a, centred_a - centred_b).sum(-1)
    elif options["divergence"] == "cosine":  # ⟨e_a, e_b⟩, and ‖e‖² in the sums' slots (the normalisers cancel)
        w = (e_a * e_b).sum(-1)
    else:  # jsd, tvd: a second exchange, once the normalisers are known
        w = torch.zeros_like(m_a)
    owned = local_labels >= 0
    label_logit = torch.zeros_like(m_a)
    if s.shape[-1]:
        label_logit = torch.where(owned, s.gather(-1, local_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    power = 2 if options["divergence"] == "cosine" else 1
    fields = [m_a, e_a.pow(power).sum(-1), m_b, e_b.pow(power).sum(-1), w, m_1, e_1.sum(-1), label_logit]
    if dkd:
        fields.append(
            torch.where(owned, t.gather(-1, local_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
            if t.shape[-1]
            else torch.zeros_like(m_a)
        )
    if with_stats:
        m_t1, centred_t1, e_t1 = _centred(t)
        fields += [
            m_t1,
            e_t1.sum(-1),
            _weighted(e_t1, centred_t1 - centred_1).sum(-1),
            _weighted(e_t1, centred_t1).sum(-1),
            _weighted(e_1, centred_1).sum(-1),
            _first_argmax(s, vocab_start),  # the first maximum: exact in float32 up to V = 2^24
            _first_argmax(t, vocab_start),
        ]
    return torch.stack(fields, dim=-1)


def _target_columns(local_labels: torch.Tensor, num_columns: int) -> torch.Tensor:
    """(N, V_slice) bool: the column of each row's label, where this rank holds it."""
    columns = torch.arange(num_columns, device=local_labels.device)
    return columns == local_labels.unsqueeze(-1)


def _without(x: torch.Tensor, target) -> torch.Tensor:
    """``x`` with the target columns at −inf (``target`` None: ``x``)."""
    return x if target is None else x.masked_fill(target, -math.inf)


def _first_argmax(x: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """The class of each row's first maximum in the message's dtype (an empty slice: never the first)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], torch.finfo(x.dtype).max)
    return (x.argmax(-1) + vocab_start).to(x.dtype)


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == -math.inf, 0.0, m)


def _weighted(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p·x, 0 where p = 0."""
    return torch.where(p == 0, 0.0, p * x)


def _merged_sum(m: torch.Tensor, total: torch.Tensor):
    """(M = max_r m_r, Σ_r exp(m_r − M)·total_r, the factors exp(m_r − M)) over the ranks (dim 0)."""
    top = m.amax(0)
    scale = torch.exp(m - _finite_or_zero(top))  # 0 for a slice whose entries are all −inf
    return top, (scale * total).sum(0), scale


def _moved(messages, m_field, top, sum_field, scale):
    """Σ_r scale_r·S_r·(m_r − M): what re-centring a bracket sum from the ranks' maxima onto M adds."""
    return (scale * _weighted(messages[..., sum_field], messages[..., m_field] - _finite_or_zero(top))).sum(0)


class _Merged(NamedTuple):
    """A row's merged statistics: maxima and log-sums at T (a = s/T, b = t/T) and of s at T = 1, the divergence
    where one exchange gives it (kl, reverse_kl), s at the label."""

    m_a: torch.Tensor
    log_s_a: torch.Tensor
    m_b: torch.Tensor
    log_s_b: torch.Tensor
    divergence: torch.Tensor
    m_1: torch.Tensor
    log_s_1: torch.Tensor
    label_logit: torch.Tensor


def _merge(messages: torch.Tensor, divergence: str) -> _Merged:
    """The rows' merged statistics from the (world, N, fields) messages (cosine: log ‖e‖₂ in the log-sums' place,
    the cosine as the divergence)."""
    if divergence == "cosine":
        return _merge_cosine(messages)
    m_a, s_a, scale_a = _merged_sum(messages[..., M_A], messages[..., S_A])
    m_b, s_b, scale_b = _merged_sum(messages[..., M_B], messages[..., S_B])
    m_1, s_1, _ = _merged_sum(messages[..., M_1], messages[..., S_1])
    # w's brackets [(b − m_b) − (a − m_a)] move by (m_b,r − M_b) − (m_a,r − M_a) onto the merged maxima
    moved_b = _moved(messages, M_B, m_b, S_B, scale_b)
    moved_a = _moved(messages, M_A, m_a, S_A, scale_a)
    if divergence in ("kl", "dkd"):
        w = (
            (scale_b * messages[..., W]).sum(0)
            + moved_b
            - (scale_b * _weighted(messages[..., S_B], messages[..., M_A] - _finite_or_zero(m_a))).sum(0)
        )
        value = w / s_b - s_b.log() + s_a.log()
    elif divergence == "reverse_kl":
        w = (
            (scale_a * messages[..., W]).sum(0)
            + moved_a
            - (scale_a * _weighted(messages[..., S_A], messages[..., M_B] - _finite_or_zero(m_b))).sum(0)
        )
        value = w / s_a - s_a.log() + s_b.log()
    else:
        value = torch.zeros_like(m_a)
    return _Merged(m_a, s_a.log(), m_b, s_b.log(), value, m_1, s_1.log(), messages[..., LABEL_LOGIT].sum(0))


def _merge_cosine(messages: torch.Tensor) -> _Merged:
    """Cosine: ‖e_a‖², ‖e_b‖² and ⟨e_a, e_b⟩ move onto the merged maxima by the squared and the mixed factors."""
    m_a, _, scale_a = _merged_sum(messages[..., M_A], messages[..., S_A])
    m_b, _, scale_b = _merged_sum(messages[..., M_B], messages[..., S_B])
    m_1, s_1, _ = _merged_sum(messages[..., M_1], messages[..., S_1])
    s_aa = (scale_a * scale_a * messages[..., S_A]).sum(0)
    s_bb = (scale_b * scale_b * messages[..., S_B]).sum(0)
    s_ab = (scale_a * scale_b * messages[..., W]).sum(0)
    cosine = s_ab / (s_aa * s_bb).sqrt()
    label_logit = messages[..., LABEL_LOGIT].sum(0)
    return _Merged(m_a, 0.5 * s_aa.log(), m_b, 0.5 * s_bb.log(), cosine, m_1, s_1.log(), label_logit)


def _sign_of_difference(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """sign(p_s − p_t): 0 where equal (autograd's subgradient of |x| at 0), NaN where either is NaN."""
    difference = p_s - p_t
    return torch.where(difference.isnan(), math.nan, torch.sign(difference))


def _merged_metrics(messages: torch.Tensor, merged: _Merged) -> torch.Tensor:
    """(4, N) fidelity metrics at T = 1 (:data:`fastkd.kd.FIDELITY_METRICS`) from the messages' last 7 fields."""
    m_1, log_s_1 = merged.m_1, merged.log_s_1
    m_t1, s_t1, scale_t1 = _merged_sum(messages[..., M_T1], messages[..., S_T1])
    _, _, scale_1 = _merged_sum(messages[..., M_1], messages[..., S_1])
    moved_t = _moved(messages, M_T1, m_t1, S_T1, scale_t1)
    # W_1's brackets [(t − m_t1) − (s − m_1)]: the teacher's shift, minus the student's weighted by e_t1
    student_shift = (scale_t1 * _weighted(messages[..., S_T1], messages[..., M_1] - _finite_or_zero(m_1))).sum(0)
    w_1 = (scale_t1 * messages[..., W_1]).sum(0) + moved_t - student_shift
    u_t = (scale_t1 * messages[..., U_T]).sum(0) + moved_t
    u_s = (scale_1 * messages[..., U_S]).sum(0) + _moved(messages, M_1, m_1, S_1, scale_1)
    s_1 = log_s_1.exp()
    log_s_t1 = s_t1.log()
    first = torch.finfo(messages.dtype).max
    argmax_s = torch.where(messages[..., M_1] == m_1, messages[..., ARGMAX_S], first).amin(0)
    argmax_t = torch.where(messages[..., M_T1] == m_t1, messages[..., ARGMAX_T], first).amin(0)
    return torch.stack(
        [
            (argmax_s == argmax_t).to(messages.dtype),
            w_1 / s_t1 - log_s_t1 + log_s_1,
            log_s_t1 - u_t / s_t1,
            log_s_1 - u_s / s_1,
        ]
    )


def _tckd(messages: torch.Tensor, merged: _Merged, temperature: float):
    """(p_t,gt − p_s,gt, TCKD = KL(b_t‖b_s)) with b = [p_gt, 1 − p_gt] at T, from the target logits and the
    non-target log-sum-exps: log p_gt = −softplus(r − z_gt), log(1 − p_gt) = −softplus(z_gt − r)."""
    gap_s = merged.label_logit / temperature - (merged.m_a + merged.log_s_a)
    gap_t = messages[..., TEACHER_LABEL_LOGIT].sum(0) / temperature - (merged.m_b + merged.log_s_b)
    softplus = torch.nn.functional.softplus
    log_p_s, log_q_s, log_p_t, log_q_t = -softplus(-gap_s), -softplus(gap_s), -softplus(-gap_t), -softplus(gap_t)
    p_t, q_t = log_p_t.exp(), log_q_t.exp()
    tckd = _weighted(p_t, log_p_t - log_p_s) + _weighted(q_t, log_q_t - log_q_s)
    return p_t - log_p_s.exp(), tckd


def _slice_log_probs(student, teacher, merged: _Merged, temperature: float):
    """(log p_s, log p_t) of this rank's slices with the merged normalisers."""
    dtype = merged.m_a.dtype
    log_p_s = (student.to(dtype) / temperature - merged.m_a.unsqueeze(-1)) - merged.log_s_a.unsqueeze(-1)
    log_p_t = (teacher.to(dtype) / temperature - merged.m_b.unsqueeze(-1)) - merged.log_s_b.unsqueeze(-1)
    return log_p_s, log_p_t


def _jsd_parts(student, teacher, merged: _Merged, options: dict):
    """(log p_s, log p_t, log(p_s/m), log(p_t/m)) of this rank's slices with the merged normalisers (JSD)."""
    beta = options["beta"]
    log_p_s, log_p_t = _slice_log_probs(student, teacher, merged, options["temperature"])
    both_zero = (log_p_t == -math.inf) & (log_p_s == -math.inf)
    log_ratio = torch.where(both_zero, 0, log_p_t - log_p_s)
    ratio_s = -reference.log_mixture_ratio(log_ratio, beta)  # log(p_s/m), m = β p_t + (1 − β) p_s
    ratio_t = -reference.log_mixture_ratio(-log_ratio, 1 - beta)  # log(p_t/m)
    return log_p_s, log_p_t, ratio_s, ratio_t


def _local_labels(labels, num_rows: int, local_classes: int, vocab_start: int, ignore_index: int, device):
    """(counted rows, each row's label column in this slice or −1)."""
    if labels is None:
        return (
            torch.ones(num_rows, dtype=torch.bool, device=device),
            torch.full((num_rows,), -1, dtype=torch.int64, device=device),
        )
    counted = labels != ignore_index
    shifted = labels.long() - vocab_start
    return counted, torch.where(counted & (shifted >= 0) & (shifted < local_classes), shifted, -1)


def _exchange(local: torch.Tensor, local_classes: int, vocab_start: int, group) -> tuple:
    """The one all-gather of the forward: every rank's (N, fields) statistics and its slice; returns the (world, N,
    fields) messages and V (a tensor: no host read on CUDA), after checking that the slices tile [0, V)."""
    num_rows = local.shape[0]
    message = torch.zeros(num_rows + 1, local.shape[1], dtype=local.dtype, device=local.device)
    message[:num_rows] = local
    message[num_rows, SLICE_SIZE], message[num_rows, SLICE_START] = local_classes, vocab_start
    gathered = _all_gather(message, group)
    _check_tiling(gathered[:, num_rows], group, local_classes, vocab_start)
    return gathered[:, :num_rows], gathered[:, num_rows, SLICE_SIZE].sum()


def _second_parts(s, t, merged, options: dict) -> torch.Tensor:
    """This slice's share of what JSD and TVD sum once the normalisers are merged: (n, 2) Σ p_t log(p_t/m) and
    Σ p_s log(p_s/m) (jsd), (n, 3) Σ|p_s − p_t|, Σ p_s·σ and Σ p_t·σ (tvd)."""
    if options["divergence"] == "jsd":
        log_p_s, log_p_t, ratio_s, ratio_t = _jsd_parts(s, t, merged, options)
        return torch.stack(
            [_weighted(log_p_t.exp(), ratio_t).sum(-1), _weighted(log_p_s.exp(), ratio_s).sum(-1)], dim=-1
        )
    p_s, p_t = (x.exp() for x in _slice_log_probs(s, t, merged, options["temperature"]))
    sign = _sign_of_difference(p_s, p_t)
    return torch.stack([(p_s - p_t).abs().sum(-1), (p_s * sign).sum(-1), (p_t * sign).sum(-1)], dim=-1)


def _row_losses(messages, num_classes, second_parts, labels, counted, options: dict, with_stats: bool, group):
    """(row losses, metrics, saved statistics) from the gathered messages; ``second_parts(merged)`` gives this
    rank's :func:`_second_parts` of every row for JSD's and TVD's second exchange."""
    merged = _merge(messages, options["divergence"])
    divergence, d_student = merged.divergence, torch.zeros_like(merged.divergence)
    if options["divergence"] in ("jsd", "tvd"):  # the second exchange, once the normalisers are merged
        sums = _all_gather(second_parts(merged), group).sum(0)
        if options["divergence"] == "jsd":
            divergence, d_student = sums.unbind(-1)
            beta = options["beta"]
            value = (beta * divergence if beta > 0 else 0) + ((1 - beta) * d_student if beta < 1 else 0)
        else:
            total, divergence, d_student = sums.unbind(-1)
            value = 0.5 * total
    elif options["divergence"] == "dkd":  # α·TCKD + β·NCKD from the merged target logits
        d_student, tckd = _tckd(messages, merged, options["temperature"])
        value = options["alpha"] * tckd + options["beta"] * divergence
    elif options["divergence"] == "cosine":
        value = 1 - divergence
    else:
        value = divergence
    rows = options["kd_scale"] * value
    bad = torch.zeros_like(counted)
    if labels is not None:
        bad = counted & ((labels < 0) | (labels >= num_classes))
        if labels.device.type == "cpu" and bool(bad.any()):
            raise ValueError(
                f"labels must lie in [0, {int(num_classes)}) or equal ignore_index={options['ignore_index']}, "
                f"got {int(labels[bad][0])}"
            )
        if options["ce_weight"] != 0:
            rows = rows + options["ce_weight"] * ((merged.m_1 + merged.log_s_1) - merged.label_logit)
    rows = torch.where(counted, torch.where(bad, math.nan, rows), 0.0)
    metrics = rows.new_empty(0)
    if with_stats:
        metrics = torch.where(counted, _merged_metrics(messages, merged), 0.0)
    saved = torch.stack(
        [merged.m_a, merged.log_s_a, merged.m_b, merged.log_s_b, divergence, d_student, merged.m_1, merged.log_s_1]
    )
    return rows, metrics, saved, bad


def _slice_gradients(s, t, local_labels, saved, grad_rows, counted, bad, options: dict):
    """(∂/∂s, ∂/∂t) of Σ grad_rows·row_loss for this rank's slices s and t (math dtype) from the rows' saved
    statistics: no collective. ∂/∂t is None for DKD (no teacher gradient)."""
    m_a, log_s_a, m_b, log_s_b, d_teacher, d_student, m_1, log_s_1 = (x.unsqueeze(-1) for x in saved)
    temperature, beta = options["temperature"], options["beta"]
    grad = torch.where(counted, torch.where(bad, math.nan, grad_rows.to(s.dtype)), 0.0).unsqueeze(-1)
    target = _target_columns(local_labels, s.shape[-1]) if options["divergence"] == "dkd" else None
    log_p_s = (_without(s / temperature, target) - m_a) - log_s_a  # dkd: p̂, the non-target classes
    log_p_t = (_without(t / temperature, target) - m_b) - log_s_b
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    kd_factor = grad * (options["kd_scale"] / temperature)
    divergence = options["divergence"]
    if divergence == "kl":
        grad_s = kd_factor * (p_s - p_t)
        grad_t = kd_factor * _weighted(p_t, (log_p_t - log_p_s) - d_teacher)
    elif divergence == "reverse_kl":
        grad_s = kd_factor * _weighted(p_s, (log_p_s - log_p_t) - d_teacher)
        grad_t = kd_factor * (p_t - p_s)
    elif divergence == "cosine":  # p is p/‖p‖ here: ∂(1 − cos)/∂a = −p_s (p_t − cos·p_s)
        grad_s = -kd_factor * (p_s * (p_t - d_teacher * p_s))
        grad_t = -kd_factor * (p_t * (p_s - d_teacher * p_t))
    elif divergence == "tvd":  # ∂/∂a = ½ p_s (σ − Σ p_s σ), ∂/∂b = ½ p_t (Σ p_t σ − σ)
        sign = _sign_of_difference(p_s, p_t)
        grad_s = (0.5 * kd_factor) * (p_s * (sign - d_teacher))
        grad_t = (0.5 * kd_factor) * (p_t * (d_student - sign))
    elif divergence == "dkd":  # non-target: β(p̂_s − p̂_t) + α·d1·p̂_s; the target: −α·d1
        alpha, d1 = options["alpha"], d_student
        grad_s = kd_factor * torch.where(target, -alpha * d1, beta * (p_s - p_t) + alpha * d1 * p_s)
        grad_t = None
    else:  # ∂JSD/∂a = (1 − β) p_s (log(p_s/m) − KL(p_s‖m)), likewise for b with β and KL(p_t‖m)
        merged = _Merged(m_a[:, 0], log_s_a[:, 0], m_b[:, 0], log_s_b[:, 0], d_teacher, m_1, log_s_1, m_1)
        _, _, ratio_s, ratio_t = _jsd_parts(s, t, merged, options)
        grad_s = (kd_factor * (1 - beta)) * _weighted(p_s, ratio_s - d_student)
        grad_t = (kd_factor * beta) * _weighted(p_t, ratio_t - d_teacher)
    if options["ce_weight"] != 0 and s.shape[-1]:
        one_hot = torch.zeros_like(s).scatter_(-1, local_labels.clamp_min(0).unsqueeze(-1), 1.0)
        one_hot = torch.where(local_labels.unsqueeze(-1) >= 0, one_hot, 0.0)
        grad_s = grad_s + grad * options["ce_weight"] * (((s - m_1) - log_s_1).exp() - one_hot)
    return grad_s, grad_t


def _math_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


class _VocabParallelRows(torch.autograd.Function):
    """Row losses (and metrics) of vocabulary slices: one all-gather in the forward (two for JSD and TVD), none in
    the backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, group, vocab_start, options, with_stats):
        dtype = _math_dtype(student, teacher)
        s, t = student.to(dtype), teacher.to(dtype)
        counted, local_labels = _local_labels(
            labels, s.shape[0], s.shape[1], vocab_start, options["ignore_index"], s.device
        )
        local = _slice_message(s, t, local_labels, vocab_start, options, with_stats)
        messages, num_classes = _exchange(local, s.shape[1], vocab_start, group)
        rows, metrics, saved, bad = _row_losses(
            messages,
            num_classes,
            lambda merged: _second_parts(s, t, merged, options),
            labels,
            counted,
            options,
            with_stats,
            group,
        )
        ctx.save_for_backward(student, teacher, local_labels, saved, bad, counted)
        ctx.options = options
        ctx.mark_non_differentiable(metrics)
        return rows, metrics

    @staticmethod
    def backward(ctx, grad_rows, _grad_metrics):
        student, teacher, local_labels, saved, bad, counted = ctx.saved_tensors
        s, t = student.to(saved.dtype), teacher.to(saved.dtype)
        grad_s, grad_t = _slice_gradients(s, t, local_labels, saved, grad_rows, counted, bad, ctx.options)
        return (
            grad_s.to(student.dtype) if ctx.needs_input_grad[0] else None,
            grad_t.to(teacher.dtype) if ctx.needs_input_grad[1] and grad_t is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


_TILINGS_CHECKED = set()  # (group, rank, slice size, start) of the layouts checked on CUDA


def _check_tiling(slices: torch.Tensor, group, local_classes: int, vocab_start: int) -> None:
    """Every rank's (slice size, slice start), gathered: the slices must tile [0, V) in rank order. All ranks see
    the same table, so all of them raise together (no rank is left waiting in a later collective). On CUDA the
    check reads the table on the host once per layout of this rank (a sync), not on every call."""
    rank = dist.get_rank(group)
    key = (id(group), rank, local_classes, vocab_start)
    if slices.device.type != "cpu":
        if key in _TILINGS_CHECKED:
            return
        _TILINGS_CHECKED.add(key)
    sizes, starts = slices[:, SLICE_SIZE].long(), slices[:, SLICE_START].long()
    expected = torch.cumsum(sizes, 0) - sizes
    if not torch.equal(starts, expected):
        raise ValueError(
            f"the ranks' vocabulary slices must be contiguous in rank order: sizes {sizes.tolist()} start at "
            f"{expected.tolist()}, but the ranks gave vocab_start {starts.tolist()} (this is rank {rank}; pass "
            "vocab_start= when the slices differ in size)"
        )


def vocab_parallel_kd_loss(
    student_logits,
    teacher_logits,
    *,
    group,
    vocab_start,
    labels,
    options: dict,
    return_stats: bool,
    teacher_weights,
    ensemble: str,
    tail,
):
    """:func:`fastkd.kd_loss` with ``group`` (or DTensor logits): see the module docstring. ``options`` are kd_loss's,
    validated."""
    if options["divergence"] not in DIVERGENCES + ("dkd",):
        raise ValueError(
            f"kd_loss with group= takes divergence in {DIVERGENCES} for now, got {options['divergence']!r}"
        )
    if teacher_weights is not None or ensemble != "prob" or tail is not None or isinstance(teacher_logits, TopK):
        raise ValueError("kd_loss with group= takes one full teacher for now (no ensembles, no TopK)")
    if options["divergence"] == "dkd" and torch.is_grad_enabled() and teacher_logits.requires_grad:
        raise ValueError("dkd_loss with group= gives teacher_logits no gradient: detach them")
    if _is_dtensor(student_logits) or _is_dtensor(teacher_logits):
        if group is not None or vocab_start is not None:
            raise ValueError("DTensor logits carry their group and slices: pass neither group nor vocab_start")
        student_logits, teacher_logits, group, vocab_start = dtensor_slices(student_logits, teacher_logits)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("kd_loss with group= needs torch.distributed initialised (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    _check_slices(student_logits, teacher_logits, options["temperature"])
    num_classes = student_logits.shape[-1]
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * num_classes
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (this rank's first class), got {vocab_start!r}")
    # label values are checked against V once the slices are gathered
    kd.check_labels(
        labels,
        student_logits.shape[:-1],
        None,
        student_logits.device,
        ce_weight=options["ce_weight"],
        ignore_index=options["ignore_index"],
    )
    num_rows = student_logits.shape[:-1].numel()  # not reshape(-1, ·): an empty slice has no size to infer from
    student = student_logits.reshape(num_rows, num_classes)
    teacher = teacher_logits.reshape(num_rows, num_classes)
    flat_labels = None if labels is None else labels.reshape(-1)
    options = dict(options, kd_scale=kd._kd_scale(options))
    rows, metrics = _VocabParallelRows.apply(student, teacher, flat_labels, group, vocab_start, options, return_stats)
    divisor = kd._divisor(options, flat_labels, student.shape[0])
    loss = kd._reduce(rows, student_logits.shape[:-1], options["reduction"], divisor)
    return kd._with_stats(loss, metrics, flat_labels, student.shape[0], options) if return_stats else loss


def _check_slices(student, teacher, temperature: float) -> None:
    """kd_loss's tensor checks, except that a rank's slice may be empty (a split of V over more ranks than V
    divides into): that rank still takes part in the collectives."""
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        kd.check_float_tensor(name, x)
        if x.dim() == 0:
            raise ValueError(f"{name} must have shape (*, V_slice), got a 0-dim tensor")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on one device, got {student.device}, {teacher.device}"
        )
    kd.check_temperature(temperature, reference._math_dtype(student, teacher))


def _is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor"


def dtensor_slices(student_logits, teacher_logits):
    """(local student, local teacher, group, vocab_start) of DTensor logits placed ``Shard(-1)`` on a 1-D mesh."""
    from torch.distributed.tensor import DTensor, Shard

    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, DTensor):
            raise TypeError(f"{name} must be a DTensor like the other logits, got {type(x).__name__}")
        placements = x.placements
        if x.device_mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard):
            raise ValueError(f"{name}: a DTensor must be placed Shard(-1) on a 1-D mesh, got {placements}")
        if placements[0].dim % x.dim() != x.dim() - 1:
            raise ValueError(f"{name}: a DTensor must be sharded along its last dim (the vocabulary), got {placements}")
    if student_logits.shape != teacher_logits.shape or student_logits.device_mesh != teacher_logits.device_mesh:
        raise ValueError("student_logits and teacher_logits must be DTensors of one shape on one mesh")
    mesh = student_logits.device_mesh
    num_classes, world, rank = student_logits.shape[-1], mesh.size(), mesh.get_local_rank()
    chunk = -(-num_classes // world)  # torch.chunk's split, as Shard places it
    return student_logits.to_local(), teacher_logits.to_local(), mesh.get_group(), min(rank * chunk, num_classes)


class _VocabParallelLinear(torch.autograd.Function):
    """linear_kd_loss over vocabulary-sharded heads: this rank's slice of the logits is made chunk by chunk of rows
    (never the N×V_slice logits at once), twice: for the statistics of the one all-gather, and in the backward
    for the gradients. The hidden states' gradient is this rank's part of it: the sum over the group is the full
    gradient, which the tensor-parallel layer that made the hidden states reduces (Megatron's and torch's
    column-parallel heads do)."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        teacher_logits,
        labels,
        group,
        vocab_start,
        options,
        chunk_rows,
        with_stats,
    ):
        def logits(rows):
            z_s = F.linear(hidden[rows], weight, bias)
            z_t = (
                teacher_logits[rows]
                if teacher_logits is not None
                else F.linear(teacher_hidden[rows], teacher_weight, teacher_bias)
            )
            return z_s, z_t

        dtype = _math_dtype(hidden, weight)
        num_rows, local_classes = hidden.shape[0], weight.shape[0]
        counted, local_labels = _local_labels(
            labels, num_rows, local_classes, vocab_start, options["ignore_index"], hidden.device
        )
        parts = []
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_rows))
            z_s, z_t = (z.to(dtype) for z in logits(rows))
            parts.append(_slice_message(z_s, z_t, local_labels[rows], vocab_start, options, with_stats))
        local = torch.cat(parts) if parts else hidden.new_zeros((0, 15 if with_stats else 8), dtype=dtype)
        messages, num_classes = _exchange(local, local_classes, vocab_start, group)

        def second_parts(merged):  # JSD, TVD: the slice's logits once more, chunk by chunk
            parts = []
            for start in range(0, num_rows, chunk_rows):
                rows = slice(start, min(start + chunk_rows, num_rows))
                z_s, z_t = (z.to(dtype) for z in logits(rows))
                parts.append(_second_parts(z_s, z_t, _Merged(*(x[rows] for x in merged)), options))
            return torch.cat(parts)

        row_loss, metrics, saved, bad = _row_losses(
            messages, num_classes, second_parts, labels, counted, options, with_stats, group
        )
        ctx.save_for_backward(
            hidden,
            weight,
            bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            teacher_logits,
            local_labels,
            saved,
            bad,
            counted,
        )
        ctx.options, ctx.chunk_rows = options, chunk_rows
        ctx.mark_non_differentiable(metrics)
        return row_loss, metrics

    @staticmethod
    def backward(ctx, grad_rows, _grad_metrics):
        (
            hidden,
            weight,
            bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            teacher_logits,
            local_labels,
            saved,
            bad,
            counted,
        ) = ctx.saved_tensors
        dtype = saved.dtype
        grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        grad_bias = None if bias is None else torch.zeros(bias.shape, dtype=dtype, device=bias.device)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, hidden.shape[0]))
            z_s = F.linear(hidden[rows], weight, bias).to(dtype)
            z_t = (
                teacher_logits[rows]
                if teacher_logits is not None
                else F.linear(teacher_hidden[rows], teacher_weight, teacher_bias)
            ).to(dtype)
            grad_z, _ = _slice_gradients(
                z_s, z_t, local_labels[rows], saved[:, rows], grad_rows[rows], counted[rows], bad[rows], ctx.options
            )
            grad_hidden[rows] = grad_z @ weight.to(dtype)
            grad_weight += grad_z.T @ hidden[rows].to(dtype)
            if grad_bias is not None:
                grad_bias += grad_z.sum(0)
        return (
            grad_hidden.to(hidden.dtype),
            grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            *([None] * 10),
        )


def vocab_parallel_linear_kd_loss(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    teacher_logits,
    labels,
    *,
    group,
    vocab_start,
    options: dict,
    chunk_rows,
    return_stats: bool,
):
    """:func:`fastkd.linear_kd_loss` with ``group``: ``student_weight`` (and ``teacher_weight``, or the columns of
    ``teacher_logits``) hold this rank's contiguous slice of the vocabulary; ``options`` are linear_kd_loss's,
    validated. One all-gather in the forward (two for jsd and tvd, whose second pass over the chunks follows the
    first exchange), none in the backward."""
    if options["divergence"] not in DIVERGENCES:
        raise ValueError(f"linear_kd_loss with group= takes divergence in {DIVERGENCES}, got {options['divergence']!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("linear_kd_loss with group= needs torch.distributed initialised (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    for name, x in (
        ("teacher_weight", teacher_weight),
        ("teacher_bias", teacher_bias),
        ("teacher_logits", teacher_logits),
    ):
        if isinstance(x, torch.Tensor) and torch.is_grad_enabled() and x.requires_grad:
            raise ValueError(f"linear_kd_loss with group= gives {name} no gradient: detach it")
    local_classes = student_weight.shape[0]
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * local_classes
    elif isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (this rank's first class), got {vocab_start!r}")
    row_shape = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_labels = None if labels is None else labels.reshape(-1)
    t_hidden = None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    t_logits = None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.shape[-1])
    options = dict(options, kd_scale=kd._kd_scale(options))
    rows, metrics = _VocabParallelLinear.apply(
        hidden,
        student_weight,
        student_bias,
        t_hidden,
        teacher_weight,
        teacher_bias,
        t_logits,
        flat_labels,
        group,
        vocab_start,
        options,
        max(1, int(chunk_rows)),
        return_stats,
    )
    divisor = kd._divisor(options, flat_labels, hidden.shape[0])
    loss = kd._reduce(rows, row_shape, options["reduction"], divisor)
    return kd._with_stats(loss, metrics, flat_labels, hidden.shape[0], options) if return_stats else loss
