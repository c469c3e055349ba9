"""Ragged and sampled sparse teachers: empty slots (index −1) are the same as a shorter TopK on every tail, rows
without entries, top-p truncation, sampled teachers (counts, the temperature check, and the estimator's mean
converging to the full KD gradient), and the Triton kernels against the reference on all of it."""

import math

import pytest
import torch

import fastkd
from fastkd import TopK, sampled_teacher, topk_teacher

from conftest import DEVICE, assert_rel_close, logits, skip_unless_available

TAILS = ("bucket", "spread", "renormalize")


def ragged(gen, num_rows, num_classes, k, counts):
    """A top-k teacher of random logits with row i cut to counts[i] entries (slots past it empty)."""
    teacher = topk_teacher(logits(gen, (num_rows, num_classes)), k)
    return TopK.from_counts(teacher.values, teacher.indices, torch.tensor(counts))


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_empty_slots_are_a_shorter_topk(gen, tail, temperature):
    """Row by row, a ragged teacher's loss and gradient are those of the TopK of its entries alone (wherever the
    empty slots sit). In float64: the two computations sum in different orders, which float32 rounding shows."""
    counts = [6, 2, 1, 4]
    teacher = ragged(gen, 4, 30, 6, counts)
    teacher = TopK(teacher.values.double(), teacher.indices)
    order = torch.randperm(6, generator=gen)  # the empty slots in any position
    shuffled = TopK(teacher.values[:, order], teacher.indices[:, order])
    s = logits(gen, (4, 30), torch.float64).requires_grad_()
    loss = fastkd.kd_loss(s, shuffled, temperature=temperature, tail=tail, reduction="none", backend="reference")
    (grad,) = torch.autograd.grad(loss.sum(), s)
    for row, n in enumerate(counts):
        alone = TopK(teacher.values[row : row + 1, :n], teacher.indices[row : row + 1, :n])
        leaf = s.detach()[row : row + 1].clone().requires_grad_()
        want = fastkd.kd_loss(leaf, alone, temperature=temperature, tail=tail, reduction="none", backend="reference")
        want.sum().backward()
        assert_rel_close(loss[row : row + 1], want, 1e-12)
        assert_rel_close(grad[row : row + 1], leaf.grad, 1e-12)


def test_rows_without_entries(gen):
    """No teacher (renormalize): no KD loss, no gradient. The bucket holds all the mass, where the student holds
    all of its own: 0. Spread: the even distribution over all V, i.e. KD against constant teacher logits."""
    s = logits(gen, (3, 20))
    empty = TopK(torch.zeros(3, 4), torch.full((3, 4), -1))
    for tail in ("renormalize", "bucket"):
        leaf = s.clone().requires_grad_()
        loss = fastkd.kd_loss(leaf, empty, tail=tail, temperature=2.0, reduction="none", backend="reference")
        loss.sum().backward()
        assert torch.equal(loss, torch.zeros(3)) and leaf.grad.abs().max() < 1e-7
    s64, empty64 = s.double(), TopK(empty.values.double(), empty.indices)  # two computations: compare in float64
    spread = fastkd.kd_loss(s64, empty64, tail="spread", temperature=2.0, reduction="none", backend="reference")
    want = fastkd.kd_loss(s64, torch.zeros(3, 20, dtype=torch.float64), temperature=2.0, reduction="none")
    assert_rel_close(spread, want, 1e-12)


def test_ragged_reference_gradcheck_in_float64(gen):
    teacher = ragged(gen, 3, 9, 4, [4, 0, 2])
    teacher = TopK(teacher.values.double(), teacher.indices)
    s = logits(gen, (3, 9), torch.float64).requires_grad_()
    for tail in TAILS:
        assert torch.autograd.gradcheck(
            lambda x, tail=tail: fastkd.kd_loss(x, teacher, temperature=2.0, tail=tail), (s,)
        )


def test_top_p_keeps_the_smallest_prefix_reaching_p(gen):
    t = logits(gen, (5, 50))
    teacher = topk_teacher(t, 10, top_p=0.7)
    p = torch.softmax(t.double(), -1).sort(-1, descending=True).values[:, :10]
    want = torch.minimum((p.cumsum(-1) < 0.7).sum(-1) + 1, torch.tensor(10))
    assert torch.equal(teacher.counts, want)
    kept = teacher.indices >= 0
    assert torch.equal(teacher.indices[kept], topk_teacher(t, 10).indices[kept])
    assert torch.equal(topk_teacher(t, 10, top_p=1.0).indices, topk_teacher(t, 10).indices)
    with pytest.raises(ValueError, match="top_p must be a float in"):
        topk_teacher(t, 10, top_p=0.0)


def test_ragged_refusals(gen):
    s = logits(gen, (2, 5))
    full = topk_teacher(logits(gen, (2, 5)), 5)
    cut = TopK.from_counts(full.values, full.indices, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="leaves no class outside it"):
        fastkd.kd_loss(s, cut)
    fastkd.kd_loss(s, cut, tail="renormalize")  # renormalised over its entries: fine
    with pytest.raises(ValueError, match=r"or be -1 for an empty slot"):
        fastkd.kd_loss(s, TopK(full.values, full.indices - 2))
    with pytest.raises(ValueError, match="counts must be an integer tensor"):
        TopK.from_counts(full.values, full.indices, torch.tensor([1.0, 2.0]))


def test_sampled_teacher_holds_the_draw_counts(gen):
    t = logits(gen, (4, 30))
    teacher = sampled_teacher(t, 12, generator=gen)
    assert teacher.kind == "sampled" and teacher.draw_temperature == 1.0
    kept = teacher.indices >= 0
    counts = torch.where(kept, teacher.values.exp() * 12, 0)
    assert torch.allclose(counts, counts.round(), atol=1e-4) and torch.equal(
        counts.round().sum(-1), torch.full((4,), 12.0)
    )
    assert (counts.diff(dim=-1) <= 1e-4).all()  # descending counts, empty slots last
    indices = teacher.indices.clone()
    indices[~kept] = -1 - torch.arange(12).expand(4, 12)[~kept]
    assert (indices.sort(-1).values.diff(dim=-1) != 0).all()


def test_a_sampled_teacher_at_another_temperature_is_refused(gen):
    s, t = logits(gen, (2, 10)), logits(gen, (2, 10))
    teacher = sampled_teacher(t, 5, temperature=2.0, generator=gen)
    fastkd.kd_loss(s, teacher, temperature=2.0)
    with pytest.raises(ValueError, match="drawn at temperature 2.0"):
        fastkd.kd_loss(s, teacher, temperature=1.0)
    with pytest.raises(ValueError, match="tail must be None"):
        fastkd.kd_loss(s, teacher, temperature=2.0, tail="bucket")
    with pytest.raises(ValueError, match="TopK temperature applies to kind 'sampled' or 'logprobs'"):
        TopK(teacher.values, teacher.indices, "logits", 2.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_sampled_gradient_is_unbiased(gen, temperature):
    """The mean of the gradient over M independent draws of k tokens converges to the full-logit KD gradient:
    each entry of T²·∂KL/∂s = T·(q − p̂) has standard deviation T·sqrt(p(1 − p)/k) per draw, so the mean over M
    draws is within 5·T·sqrt(p(1 − p)/(kM)) (+ float32 rounding) of T·(q − p)."""
    draws, k = 400, 8
    s, t = logits(gen, (3, 12), scale=1.0), logits(gen, (3, 12), scale=1.5)
    leaf = s.clone().requires_grad_()
    fastkd.kd_loss(leaf, t, temperature=temperature, reduction="sum").backward()
    want = leaf.grad.double()
    rows = s.expand(draws, 3, 12).reshape(-1, 12)
    teacher = sampled_teacher(t.expand(draws, 3, 12).reshape(-1, 12), k, temperature=temperature, generator=gen)
    leaf = rows.clone().requires_grad_()
    fastkd.kd_loss(leaf, teacher, temperature=temperature, reduction="sum").backward()
    total = leaf.grad.double().reshape(draws, 3, 12).mean(0)
    p = torch.softmax(t.double() / temperature, -1)
    bound = 5 * temperature * (p * (1 - p) / (k * draws)).sqrt() + 1e-6
    assert ((total - want).abs() <= bound).all(), float(((total - want).abs() / bound).max())
    # and the estimate is not trivially close: one draw alone is off by far more
    assert (leaf.grad.double().reshape(draws, 3, 12)[0] - want).abs().max() > bound.max()


def kernel_vs_reference(student, teacher, **options):
    """(loss, grad, stats) of the Triton kernels and of the reference."""
    results = []
    for backend in ("triton", "reference"):
        device = DEVICE if backend == "triton" else torch.device("cpu")
        leaf = student.detach().to(device).requires_grad_()
        top = TopK(teacher.values.to(device), teacher.indices.to(device), teacher.kind, teacher.temperature)
        labels = options.get("labels")
        kwargs = dict(options, labels=None if labels is None else labels.to(device))
        loss, stats = fastkd.kd_loss(leaf, top, reduction="none", return_stats=True, backend=backend, **kwargs)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        results.append((loss, grad, stats))
    return results


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_ragged_kernels_match_the_reference(gen, tail, dtype, rtol):
    skip_unless_available("triton")
    teacher = ragged(gen, 6, 40, 7, [7, 3, 0, 1, 5, 0])
    teacher = TopK(teacher.values.to(dtype), teacher.indices.int())
    s = logits(gen, (6, 40), dtype)
    labels = torch.tensor([3, -100, 0, 39, -100, 5])
    (loss, grad, stats), (want_loss, want_grad, want_stats) = kernel_vs_reference(
        s, teacher, labels=labels, ce_weight=0.3, temperature=2.5, tail=tail
    )
    assert_rel_close(loss, want_loss, rtol, what="loss")
    assert_rel_close(grad, want_grad, rtol, what="grad")
    for name in want_stats:
        assert_rel_close(stats[name], want_stats[name], rtol, what=name)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_kernels_match_the_reference(gen, temperature):
    skip_unless_available("triton")
    s, t = logits(gen, (5, 33)), logits(gen, (5, 33))
    teacher = sampled_teacher(t, 9, temperature=temperature, generator=gen)
    (loss, grad, stats), (want_loss, want_grad, want_stats) = kernel_vs_reference(s, teacher, temperature=temperature)
    assert_rel_close(loss, want_loss, 1e-5, what="loss")
    assert_rel_close(grad, want_grad, 1e-5, what="grad")
    for name in want_stats:
        assert_rel_close(stats[name], want_stats[name], 1e-5, what=name)


def test_an_all_ignored_batch_is_zero_on_every_backend(gen):
    s = logits(gen, (3, 16))
    teacher = TopK(torch.full((3, 4), math.nan), torch.full((3, 4), 99))  # garbage everywhere: never read
    labels = torch.full((3,), -100)
    backends = ["reference"] + (["triton"] if fastkd.backends()["triton_interpreter"] or DEVICE.type == "cuda" else [])
    for backend in backends:
        device = DEVICE if backend == "triton" else torch.device("cpu")
        leaf = s.to(device).requires_grad_()
        top = TopK(teacher.values.to(device), teacher.indices.to(device))
        loss = fastkd.kd_loss(leaf, top, labels=labels.to(device), ce_weight=0.5, backend=backend, reduction="sum")
        loss.backward()
        assert float(loss.detach()) == 0 and float(leaf.grad.abs().max()) == 0, backend


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("make", ["ragged", "sampled"])
def test_linear_kd_with_ragged_and_sampled_teachers_equals_kd_loss_on_the_logits(gen, backend, make):
    skip_unless_available(backend)
    device = DEVICE if backend == "triton" else torch.device("cpu")
    hidden, weight = logits(gen, (7, 5)).to(device), logits(gen, (23, 5)).to(device)
    t = logits(gen, (7, 23))
    if make == "ragged":
        top = topk_teacher(t, 4)
        top = TopK.from_counts(top.values, top.indices, torch.tensor([4, 0, 2, 1, 3, 0, 4]))
    else:
        top = sampled_teacher(t, 6, temperature=2.0, generator=gen)
    teacher = top.to(device)
    labels = torch.tensor([1, -100, 2, 22, 0, 5, -100], device=device)
    options = dict(labels=labels, temperature=2.0, tail=None if make == "sampled" else "bucket", ce_weight=0.5)
    h = hidden.clone().requires_grad_()
    got = fastkd.linear_kd_loss(h, weight, teacher_logits=teacher, chunk_rows=3, backend=backend, **options)
    (grad,) = torch.autograd.grad(got, h)
    h_ref = hidden.clone().requires_grad_()
    want = fastkd.kd_loss(h_ref @ weight.T, teacher, backend="reference", **options)
    assert_rel_close(got, want, 1e-5)
    assert_rel_close(grad, torch.autograd.grad(want, h_ref)[0], 1e-5)


def test_a_renormalized_row_whose_entries_are_all_minus_inf_has_no_teacher(gen):
    """Every backend: such a row adds no KD term (loss 0, no gradient), like a row without entries; never NaN."""
    s = logits(gen, (3, 12))
    values = torch.tensor([[-math.inf, -math.inf], [1.0, 2.0], [-math.inf, 0.5]])
    teacher = TopK(values, torch.tensor([[0, 1], [2, 3], [4, 5]]), "logits")
    results = []
    backends = ["reference"] + [
        b for b in ("triton", "cpu") if b != "triton" or fastkd.backends()["triton_interpreter"]
    ]
    for backend in backends:
        if backend == "cpu" and not fastkd.backends()["cpu"]:
            continue
        leaf = s.clone().requires_grad_()
        loss = fastkd.kd_loss(leaf, teacher, temperature=2.0, reduction="none", backend=backend)
        loss.sum().backward()
        assert loss[0] == 0 and leaf.grad[0].abs().max() == 0 and loss.isfinite().all(), backend
        results.append((loss.detach(), leaf.grad))
    for loss, grad in results[1:]:
        assert_rel_close(loss, results[0][0], 1e-5)
        assert_rel_close(grad, results[0][1], 1e-5)


def test_an_index_below_minus_one_makes_the_reference_row_nan(gen):
    s = logits(gen, (2, 6))
    rows = fastkd.reference.kd_topk_rows(
        s, torch.zeros(2, 2), torch.tensor([[0, -2], [1, -1]]), tail="bucket", temperature=1.0
    )
    assert rows[0].isnan() and rows[1].isfinite()


def test_log_probabilities_taken_at_a_temperature_are_weighed_back_to_the_loss_temperature(gen):
    """A TopK of log softmax(t/T_c) (a cache written at T_c) at loss temperature T is the TopK of log softmax(t)
    at T: the target is softmax(t/T) on the entries either way (tail renormalize: the entries alone)."""
    s, t = logits(gen, (4, 20)), logits(gen, (4, 20))
    at_one = topk_teacher(t, 5)
    at_two = topk_teacher(t / 2.0, 5)
    taken = TopK(at_two.values, at_two.indices, "logprobs", 2.0)
    for temperature in (2.0, 3.0):
        got = fastkd.kd_loss(s, taken, temperature=temperature, tail="renormalize", backend="reference")
        want = fastkd.kd_loss(s, at_one, temperature=temperature, tail="renormalize", backend="reference")
        assert_rel_close(got, want, 1e-5)
    with pytest.raises(ValueError, match="top_p with k = V"):
        topk_teacher(t, 20, top_p=0.9)
