r"""Vocabulary-parallel :func:`fastkd.kd_loss` over ``torch.distributed``: each rank holds a contiguous slice of the
vocabulary of the student and teacher logits (tensor parallelism: Megatron, torchtitan, DTensor ``Shard(-1)``),
every rank returns the loss of the whole rows, and each rank's gradient is its slice of the full gradient.

Row statistics are merged, never the logits: each rank reduces its slice of a row to eight float32 numbers, one
all-gather shares them, and every rank merges the W messages itself (an online-softmax merge), so that

- forward: **one** collective per call, an all-gather of 8 float32 per row per rank (each rank receives
  32·W bytes per row; also one extra row carrying each rank's slice size and start, which are checked to tile the
  vocabulary), for ``divergence="kl"`` and ``"reverse_kl"`` with or without the CE term;
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
what this module adds; the fused row kernels per slice come next): JSD, cosine, TVD, DKD, ensembles, sparse
teachers and ``return_stats`` are refused with ``group``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import kd

DIVERGENCES = ("kl", "reverse_kl")
# the message of a row: slots of the (N + 1, FIELDS) float32 tensor each rank sends
M_A, S_A, M_B, S_B, W, M_1, S_1, LABEL_LOGIT = range(8)
FIELDS = 8
SLICE_SIZE, SLICE_START = 0, 1  # slots of the extra last row: this rank's slice of the vocabulary


def _all_gather(local: torch.Tensor, group) -> torch.Tensor:
    """(world, *local.shape): every rank's ``local``, in one collective."""
    world = dist.get_world_size(group)
    out = torch.empty((world * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.contiguous(), group=group)
    return out.reshape(world, *local.shape)


def _slice_message(a, b, s, local_labels, divergence: str) -> torch.Tensor:
    """The (N, FIELDS) statistics of this rank's slices a = s/T, b = t/T and s (float32)."""
    m_a, m_b, m_1 = a.amax(-1), b.amax(-1), s.amax(-1)
    centred_a = a - _finite_or_zero(m_a).unsqueeze(-1)
    centred_b = b - _finite_or_zero(m_b).unsqueeze(-1)
    e_a, e_b = centred_a.exp(), centred_b.exp()
    if divergence == "kl":
        w = _weighted(e_b, centred_b - centred_a).sum(-1)
    else:
        w = _weighted(e_a, centred_a - centred_b).sum(-1)
    s_1 = (s - _finite_or_zero(m_1).unsqueeze(-1)).exp().sum(-1)
    owned = local_labels >= 0
    label_logit = torch.where(owned, s.gather(-1, local_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    return torch.stack([m_a, e_a.sum(-1), m_b, e_b.sum(-1), w, m_1, s_1, label_logit], dim=-1)


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(m == -math.inf, 0.0, m)


def _weighted(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p·x, 0 where p = 0."""
    return torch.where(p == 0, 0.0, p * x)


def _merge(messages: torch.Tensor, divergence: str):
    """The rows' merged statistics from the (world, N, FIELDS) messages: (max a, log Σ e_a, max b, log Σ e_b,
    the divergence, max s, log Σ e_s, s at the label)."""

    def merged_sum(m, total):
        top = m.amax(0)
        scale = torch.exp(m - _finite_or_zero(top))  # 0 for a slice whose entries are all −inf
        return top, (scale * total).sum(0), scale

    m_a, s_a, scale_a = merged_sum(messages[..., M_A], messages[..., S_A])
    m_b, s_b, scale_b = merged_sum(messages[..., M_B], messages[..., S_B])
    m_1, s_1, _ = merged_sum(messages[..., M_1], messages[..., S_1])
    moved = (messages[..., M_B] - _finite_or_zero(m_b)) - (messages[..., M_A] - _finite_or_zero(m_a))
    if divergence == "kl":
        parts = scale_b * (messages[..., W] + _weighted(messages[..., S_B], moved))
        divergence_value = parts.sum(0) / s_b - s_b.log() + s_a.log()
    else:
        parts = scale_a * (messages[..., W] - _weighted(messages[..., S_A], moved))
        divergence_value = parts.sum(0) / s_a - s_a.log() + s_b.log()
    return m_a, s_a.log(), m_b, s_b.log(), divergence_value, m_1, s_1.log(), messages[..., LABEL_LOGIT].sum(0)


class _VocabParallelRows(torch.autograd.Function):
    """Row losses of vocabulary slices: one all-gather in the forward, none in the backward."""

    @staticmethod
    def forward(ctx, student, teacher, labels, group, vocab_start, options):
        t = options["temperature"]
        s = student.float()
        a, b = s / t, teacher.float() / t
        num_rows, local_classes = s.shape
        if labels is None:
            counted = torch.ones(num_rows, dtype=torch.bool, device=s.device)
            local_labels = torch.full((num_rows,), -1, dtype=torch.int64, device=s.device)
        else:
            counted = labels != options["ignore_index"]
            shifted = labels.long() - vocab_start
            local_labels = torch.where(counted & (shifted >= 0) & (shifted < local_classes), shifted, -1)
        message = torch.zeros(num_rows + 1, FIELDS, dtype=torch.float32, device=s.device)
        message[:num_rows] = _slice_message(a, b, s, local_labels, options["divergence"])
        message[num_rows, SLICE_SIZE], message[num_rows, SLICE_START] = local_classes, vocab_start
        gathered = _all_gather(message, group)
        _check_tiling(gathered[:, num_rows], dist.get_rank(group))
        num_classes = int(gathered[:, num_rows, SLICE_SIZE].sum())
        stats = _merge(gathered[:, :num_rows], options["divergence"])
        m_a, log_s_a, m_b, log_s_b, divergence_value, m_1, log_s_1, label_logit = stats
        rows = options["kd_scale"] * divergence_value
        bad = torch.zeros_like(counted)
        if labels is not None:
            bad = counted & ((labels < 0) | (labels >= num_classes))
            if labels.device.type == "cpu" and bool(bad.any()):
                raise ValueError(
                    f"labels must lie in [0, {num_classes}) or equal ignore_index={options['ignore_index']}, "
                    f"got {int(labels[bad][0])}"
                )
            if options["ce_weight"] != 0:
                rows = rows + options["ce_weight"] * ((m_1 + log_s_1) - label_logit)
        rows = torch.where(counted, torch.where(bad, math.nan, rows), 0.0)
        merged = torch.stack([m_a, log_s_a, m_b, log_s_b, divergence_value, m_1, log_s_1])
        ctx.save_for_backward(student, teacher, local_labels, merged, bad, counted)
        ctx.options = options
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, local_labels, stats, bad, counted = ctx.saved_tensors
        options = ctx.options
        m_a, log_s_a, m_b, log_s_b, divergence_value, m_1, log_s_1 = (x.unsqueeze(-1) for x in stats)
        t = options["temperature"]
        grad = torch.where(counted, torch.where(bad, math.nan, grad_rows.float()), 0.0).unsqueeze(-1)
        s = student.float()
        log_p_s = (s / t - m_a) - log_s_a
        log_p_t = (teacher.float() / t - m_b) - log_s_b
        p_s, p_t = log_p_s.exp(), log_p_t.exp()
        kd_factor = grad * (options["kd_scale"] / t)
        if options["divergence"] == "kl":
            grad_s = kd_factor * (p_s - p_t)
            grad_t = kd_factor * _weighted(p_t, (log_p_t - log_p_s) - divergence_value)
        else:
            grad_s = kd_factor * _weighted(p_s, (log_p_s - log_p_t) - divergence_value)
            grad_t = kd_factor * (p_t - p_s)
        if options["ce_weight"] != 0:
            one_hot = torch.zeros_like(s).scatter_(-1, local_labels.clamp_min(0).unsqueeze(-1), 1.0)
            one_hot = torch.where(local_labels.unsqueeze(-1) >= 0, one_hot, 0.0)
            grad_s = grad_s + grad * options["ce_weight"] * (((s - m_1) - log_s_1).exp() - one_hot)
        return (
            grad_s.to(student.dtype) if ctx.needs_input_grad[0] else None,
            grad_t.to(teacher.dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
            None,
            None,
        )


def _check_tiling(slices: torch.Tensor, rank: int) -> None:
    """Every rank's (slice size, slice start), gathered: the slices must tile [0, V) in rank order. All ranks see
    the same table, so all of them raise together (no rank is left waiting in a later collective)."""
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
    if options["divergence"] not in DIVERGENCES:
        raise ValueError(
            f"kd_loss with group= takes divergence in {DIVERGENCES} for now, got {options['divergence']!r}"
        )
    if return_stats or teacher_weights is not None or ensemble != "prob" or tail is not None:
        raise ValueError("kd_loss with group= takes one full teacher, without return_stats, for now")
    if _is_dtensor(student_logits) or _is_dtensor(teacher_logits):
        if group is not None or vocab_start is not None:
            raise ValueError("DTensor logits carry their group and slices: pass neither group nor vocab_start")
        student_logits, teacher_logits, group, vocab_start = dtensor_slices(student_logits, teacher_logits)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("kd_loss with group= needs torch.distributed initialised (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    kd._check_tensors(
        student_logits,
        teacher_logits,
        None,
        ce_weight=0.0,
        ignore_index=options["ignore_index"],
        temperature=options["temperature"],
    )
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
    student = student_logits.reshape(-1, num_classes)
    teacher = teacher_logits.reshape(-1, num_classes)
    flat_labels = None if labels is None else labels.reshape(-1)
    options = dict(options, kd_scale=kd._kd_scale(options))
    rows = _VocabParallelRows.apply(student, teacher, flat_labels, group, vocab_start, options)
    divisor = kd._divisor(options, flat_labels, student.shape[0])
    return kd._reduce(rows, student_logits.shape[:-1], options["reduction"], divisor)


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
