"""kd_loss with a sparse (top-K) teacher: the bucket and renormalise semantics against float64 math written
independently, K = V equals the full teacher, gradients over all V student logits, the Triton kernels against the
reference (also where the student's mass outside the K is tiny), bad indices in the kernels, and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import TopK, reference, topk_teacher

from conftest import DEVICE, assert_rel_close, logits


def float64_topk_kl(s, t, k, tail, temperature):
    """Written out at T = 1 semantics generalised as documented: the teacher's K log-probabilities (and the
    remaining mass as one class) are weights at 1/T; the student's full-row probabilities, coarsened to the same
    partition. In float64 on the float32 top-K log-probabilities the loss receives (1 − Σ p over the K amplifies
    their rounding where the K hold nearly all the mass, so recomputing them in float64 would test other inputs)."""
    teacher = topk_teacher(t, k)
    values, idx = teacher.values.double(), teacher.indices
    p_s = F.softmax(s.double() / temperature, -1)
    q_s = p_s.gather(-1, idx)
    w = values / temperature
    if tail == "bucket":
        rest_t = 1 - values.exp().sum(-1, keepdim=True)
        w = torch.cat([w, rest_t.log() / temperature], -1)
        q_s = torch.cat([q_s, 1 - q_s.sum(-1, keepdim=True)], -1)
    p_t = F.softmax(w, -1)
    return (torch.xlogy(p_t, p_t) - torch.xlogy(p_t, q_s)).sum(-1)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_loss_matches_float64_math(gen, tail, temperature):
    s, t = logits(gen, (6, 200)), logits(gen, (6, 200))
    teacher = topk_teacher(t, 10)
    got = fastkd.kd_loss(s, teacher, temperature=temperature, tail=tail, reduction="none")
    want = temperature**2 * float64_topk_kl(s, t, 10, tail, temperature)
    assert got.dtype == torch.float32
    assert_rel_close(got, want, 1e-5)


def test_bucket_at_t1_is_the_kl_of_the_coarsened_distributions(gen):
    """At T = 1 the bucket teacher is exactly the teacher's distribution coarsened to K classes + the rest."""
    s, t = logits(gen, (4, 60)), logits(gen, (4, 60))
    teacher = topk_teacher(t, 7)
    got = fastkd.kd_loss(s, teacher, reduction="none")
    p_s = F.softmax(s.double(), -1)
    idx = teacher.indices
    top = teacher.values.double().exp()  # the float32 log-probabilities the loss receives, in float64
    a = torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)
    b = torch.cat([p_s.gather(-1, idx), 1 - p_s.gather(-1, idx).sum(-1, keepdim=True)], -1)
    assert_rel_close(got, (a * (a / b).log()).sum(-1), 1e-5)


def test_full_k_equals_the_full_teacher(gen):
    s, t = logits(gen, (5, 30)), logits(gen, (5, 30))
    for kind, tail in (("logprobs", "bucket"), ("logits", "renormalize")):
        got = fastkd.kd_loss(s, topk_teacher(t, 30, kind=kind), temperature=2.0, tail=tail)
        assert_rel_close(got, fastkd.kd_loss(s, t, temperature=2.0), 1e-5)


def test_student_gradient_reaches_all_classes_and_matches_float64(gen):
    s = logits(gen, (3, 40), dtype=torch.float64).requires_grad_(True)
    t = logits(gen, (3, 40))
    teacher = topk_teacher(t, 5)
    labels = torch.tensor([1, -100, 39])
    assert torch.autograd.gradcheck(
        lambda s: fastkd.kd_loss(
            s, TopK(teacher.values.double(), teacher.indices), temperature=2.0, labels=labels, ce_weight=0.3
        ),
        (s,),
    )
    s32 = s.detach().float().requires_grad_(True)
    fastkd.kd_loss(s32, teacher, temperature=2.0).backward()
    outside = torch.ones_like(s32, dtype=torch.bool).scatter_(-1, teacher.indices, False)
    assert s32.grad[outside].abs().sum() > 0  # the classes outside the K get a gradient too


def test_labels_ce_and_reductions(gen):
    s, t = logits(gen, (6, 25)), logits(gen, (6, 25))
    labels = torch.tensor([0, -100, 3, 4, -100, 24])
    teacher = topk_teacher(t, 4)
    rows = fastkd.kd_loss(s, teacher, labels=labels, ce_weight=0.5, reduction="none", temperature=2.0)
    assert rows[1] == 0 and rows[4] == 0
    kl = 4.0 * float64_topk_kl(s, t, 4, "bucket", 2.0)
    ce = F.cross_entropy(s.double(), labels.clamp(min=0), reduction="none")
    counted = labels != -100
    assert_rel_close(rows[counted], (kl + 0.5 * ce)[counted], 1e-5)
    assert_rel_close(fastkd.kd_loss(s, teacher, labels=labels, ce_weight=0.5, temperature=2.0), rows.sum() / 4, 1e-6)


def kernel_and_reference(s, teacher, **options):
    """(loss, student grad) from the Triton kernels and from the reference."""
    results = []
    for backend in ("triton", "reference"):
        leaf = s.detach().clone().requires_grad_(True)
        loss = fastkd.kd_loss(leaf, teacher, backend=backend, **options)
        loss.sum().backward()
        results.append((loss, leaf.grad))
    return results


@pytest.mark.parametrize("kind, tail", [("logprobs", "bucket"), ("logprobs", "renormalize"), ("logits", "renormalize")])
@pytest.mark.parametrize("k", [1, 7, 150])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_topk_kernels_match_the_reference(gen, kind, tail, k, dtype, rtol):
    """Strided student logits, int32 indices, labels with an ignored row and CE, V = 150 (K = V: no bucket)."""
    s = logits(gen, (5, 300), dtype).to(DEVICE)[:, ::2]
    teacher = topk_teacher(logits(gen, (5, 150)).to(DEVICE), k, kind=kind)
    teacher = TopK(teacher.values.to(dtype), teacher.indices.int(), kind)
    labels = torch.tensor([3, -100, 149, 0, 7], device=DEVICE)
    (loss, grad), (want_loss, want_grad) = kernel_and_reference(
        s, teacher, temperature=2.0, tail=tail, labels=labels, ce_weight=0.4
    )
    assert_rel_close(loss, want_loss, rtol, what="loss")
    assert_rel_close(grad, want_grad, rtol, what="grad")


def test_topk_kernels_stay_exact_when_the_student_mass_outside_the_k_is_tiny(gen):
    """The student puts all but ~1e-11 of its mass on the teacher's K classes while the teacher keeps 1e-3 outside:
    the bucket term is then large and rests on the student's tiny remainder, which the kernels sum over the
    columns outside the K (a subtraction 1 − Σ_K in float32 would leave only rounding)."""
    num_classes, k = 64, 4
    t = logits(gen, (3, num_classes))
    teacher = topk_teacher(t, k)
    lp = teacher.values.double()
    lp = lp - torch.logsumexp(lp, -1, keepdim=True) + math.log1p(-1e-3)  # the K hold 1 − 1e-3 of the teacher
    teacher = TopK(lp.float(), teacher.indices)
    s = torch.zeros(3, num_classes, dtype=torch.float64).scatter(-1, teacher.indices, 30.0)
    (loss, grad), _ = kernel_and_reference(
        s.float().to(DEVICE), TopK(teacher.values.to(DEVICE), teacher.indices.to(DEVICE)), reduction="none"
    )
    p_s = F.softmax(s, -1)
    q_s = torch.cat([p_s.gather(-1, teacher.indices), 1 - p_s.gather(-1, teacher.indices).sum(-1, keepdim=True)], -1)
    # the bucket is the mass the given (float32-rounded) values leave: 1e-3 up to their rounding, which moves it
    # by ~6e-8, 6e-5 of itself (a fixed 1e-3 here made the truth disagree with the inputs at some seeds)
    kept = teacher.values.double().exp()
    p_t = torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], -1)
    assert_rel_close(loss, (torch.xlogy(p_t, p_t) - torch.xlogy(p_t, q_s)).sum(-1), 1e-5)
    assert grad.isfinite().all()


def test_topk_bucket_gradient_stays_finite_when_the_student_tail_is_far_below_the_teachers(gen):
    """Student logits 40 on the K classes and −60 elsewhere, the teacher keeping 10% outside: the ratio of the
    two tails (e^100) overflows float32, the gradient computed from their log-difference does not."""
    num_classes, k = 50, 5
    indices = torch.stack([torch.randperm(num_classes, generator=gen)[:k] for _ in range(3)])
    s = torch.full((3, num_classes), -60.0).scatter(-1, indices, 40.0)
    values = torch.log(torch.full((3, k), 0.9 / k))
    teacher = TopK(values.to(DEVICE), indices.to(DEVICE))
    (loss, grad), _ = kernel_and_reference(s.to(DEVICE), teacher, temperature=1.0, reduction="sum")
    s64 = s.double().requires_grad_(True)
    want = reference.kd_topk_rows(s64, values.double(), indices, tail="bucket", temperature=1.0)
    (want_grad,) = torch.autograd.grad(want.sum(), s64)
    assert_rel_close(loss, want.sum(), 1e-5, what="loss")
    assert_rel_close(grad, want_grad, 1e-5, what="grad")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_stats_are_the_sparse_teachers_at_t1(gen, tail):
    """return_stats against a TopK teacher: float64 math written out here, for the reference and the kernels."""
    s, t = logits(gen, (7, 90)), logits(gen, (7, 90))
    labels = torch.tensor([0, 1, -100, 3, 4, 5, 6])
    teacher = topk_teacher(t, 6)
    p_t = teacher.values.double().exp()
    if tail == "bucket":
        p_t = torch.cat([p_t, 1 - p_t.sum(-1, keepdim=True)], -1)
    p_t = p_t / p_t.sum(-1, keepdim=True)
    log_q = F.log_softmax(s.double(), -1)
    rows = torch.stack(
        [
            (s.argmax(-1) == teacher.indices[:, 0]).double(),
            float64_topk_kl(s, t, 6, tail, 1.0),
            -torch.xlogy(p_t, p_t).sum(-1),
            -(log_q.exp() * log_q).sum(-1),
        ]
    )
    want = rows[:, labels != -100].mean(1)
    for backend in ("reference", "triton"):
        leaf = s.to(DEVICE).requires_grad_(True)
        loss, stats = fastkd.kd_loss(
            leaf,
            TopK(teacher.values.to(DEVICE), teacher.indices.to(DEVICE)),
            tail=tail,
            temperature=2.0,
            labels=labels.to(DEVICE),
            return_stats=True,
            backend=backend,
        )
        assert_rel_close(torch.stack(list(stats.values())), want, 1e-5, what=backend)
        assert not any(v.requires_grad for v in stats.values())
        loss.backward()  # the metrics leave the gradient alone
        assert leaf.grad.isfinite().all()


def test_topk_kernel_rows_with_bad_indices_are_nan(gen):
    """Where the host does not check (CUDA: it would cost a sync) the kernels mark such rows NaN."""
    s = logits(gen, (4, 10)).to(DEVICE)
    values = torch.full((4, 3), -2.0, device=DEVICE)
    indices = torch.tensor([[0, 1, -1], [0, 10, 2], [4, 5, 4], [9, 8, -2]], device=DEVICE)  # −1: an empty slot
    rows, _, _ = torch.ops.fastkd.kd_topk_rows(
        s, values, indices, None, 1.0, 1.0, "bucket", -100, 0.0, 1.0, "triton", False
    )
    assert rows[0].isfinite() and rows[1:].isnan().all()


def test_topk_values_that_require_grad_use_the_reference(gen):
    s = logits(gen, (3, 20)).to(DEVICE)
    teacher = topk_teacher(logits(gen, (3, 20)).to(DEVICE), 5)
    values = teacher.values.clone().requires_grad_(True)
    fastkd.kd_loss(s, TopK(values, teacher.indices), temperature=2.0).backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="give no gradient to the TopK values"):
        fastkd.kd_loss(s, TopK(values, teacher.indices), backend="triton")


def test_topk_torch_compile_fullgraph(gen):
    s = logits(gen, (4, 30)).to(DEVICE).requires_grad_(True)
    teacher = topk_teacher(logits(gen, (4, 30)).to(DEVICE), 6)
    labels = torch.tensor([1, 2, -100, 29], device=DEVICE)

    def step(s, values, indices):
        return fastkd.kd_loss(s, TopK(values, indices), temperature=2.0, labels=labels, ce_weight=0.5, backend="triton")

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(s, teacher.values, teacher.indices)
    (grad,) = torch.autograd.grad(got, s)
    want = step(s, teacher.values, teacher.indices)
    assert_rel_close(got, want, 1e-6)
    assert_rel_close(grad, torch.autograd.grad(want, s)[0], 1e-6)


S = torch.zeros(2, 5)
GOOD = TopK(torch.full((2, 2), -1.0), torch.tensor([[0, 1], [2, 3]]))


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: TopK(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), kind="probs"), {}, ValueError, "kind"),
        (lambda: TopK(torch.zeros(2, 2), torch.zeros(2, 3, dtype=torch.long)), {}, ValueError, "same shape"),
        (lambda: TopK(torch.zeros(2, 2), torch.zeros(2, 2)), {}, TypeError, "indices must be an int64"),
        (lambda: TopK(torch.zeros(2, 6), torch.arange(6).repeat(2, 1)), {}, ValueError, "more than the V=5"),
        (
            lambda: TopK(torch.zeros(2, 2), torch.tensor([[0, 5], [1, 2]])),
            {},
            ValueError,
            r"indices must lie in \[0, 5\)",
        ),
        (lambda: TopK(torch.zeros(2, 2), torch.tensor([[1, 1], [1, 2]])), {}, ValueError, "distinct"),
        (lambda: TopK(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long)), {}, ValueError, r"shape \(\*, K\)"),
        (
            lambda: TopK(torch.zeros(2, 2), torch.tensor([[0, 1], [1, 2]]), kind="logits"),
            dict(tail="bucket"),
            ValueError,
            "needs the teacher's log-probabilities",
        ),
        (lambda: GOOD, dict(divergence="jsd"), ValueError, "divergence='kl'"),
        (lambda: GOOD, dict(tail="middle"), ValueError, "tail must be one of"),
        (lambda: GOOD, dict(teacher_weights=[1.0, 2.0]), ValueError, "a TopK teacher is one"),
        (lambda: GOOD, dict(ensemble="logit"), ValueError, "a TopK teacher is one"),
    ],
)
def test_bad_topk_raises_clear_errors(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.kd_loss(S, make(), **kwargs)


def test_tail_without_a_topk_teacher_is_an_error():
    with pytest.raises(ValueError, match="tail applies to a TopK teacher only"):
        fastkd.kd_loss(S, S, tail="bucket")


def test_topk_teacher_helper_checks_k():
    with pytest.raises(ValueError, match=r"k must be an int in \[1, V=5\]"):
        topk_teacher(S, 6)
    assert math.isclose(topk_teacher(S, 5).values.exp().sum(-1)[0].item(), 1.0, rel_tol=1e-6)


# rows whose label is ignore_index need no valid entries; log-probabilities beyond one distribution are refused


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_ignored_rows_may_hold_any_entries(gen, backend):
    from conftest import skip_unless_available

    skip_unless_available(backend)
    s = logits(gen, (4, 12))
    teacher = topk_teacher(logits(gen, (4, 12)), 3)
    labels = torch.tensor([2, -100, 5, -100])
    garbage = TopK(
        teacher.values.clone().index_fill_(0, torch.tensor([1, 3]), float("nan")),
        teacher.indices.clone().index_put_((torch.tensor([1, 3]),), torch.tensor([-1, 99, -1])),
    )
    clean = TopK(teacher.values.clone(), teacher.indices.clone())
    for row in (1, 3):
        clean.values[row], clean.indices[row] = -math.log(3), torch.arange(3)
    device = DEVICE if backend == "triton" else "cpu"
    leaf = s.to(device).requires_grad_()
    options = dict(labels=labels.to(device), ce_weight=0.5, backend=backend)
    on_device = lambda top: TopK(top.values.to(device), top.indices.to(device))  # noqa: E731
    got = fastkd.kd_loss(leaf, on_device(garbage), **options)
    (grad,) = torch.autograd.grad(got, leaf)
    want = fastkd.kd_loss(leaf, on_device(clean), **options)
    assert torch.equal(got, want) and got.isfinite()
    assert torch.equal(grad, torch.autograd.grad(want, leaf)[0])


def test_ignored_rows_of_a_topk_teacher_may_hold_any_entries_in_linear_kd(gen):
    hidden, weight = logits(gen, (4, 6)), logits(gen, (12, 6))
    teacher = topk_teacher(logits(gen, (4, 12)), 3)
    labels = torch.tensor([2, -100, 5, 7])
    garbage = TopK(teacher.values.clone(), teacher.indices.clone().index_fill_(0, torch.tensor([1]), -1))
    got = fastkd.linear_kd_loss(hidden, weight, teacher_logits=garbage, labels=labels)
    counted = labels != -100
    want = fastkd.kd_loss(
        hidden[counted] @ weight.T, TopK(teacher.values[counted], teacher.indices[counted]), labels=labels[counted]
    )
    assert_rel_close(got, want, 1e-5)


def test_log_probabilities_summing_beyond_one_are_refused_on_cpu(gen):
    s = logits(gen, (3, 10))
    values = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.6, 0.5, 0.2], [0.2, 0.2, 0.2]]))
    indices = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    with pytest.raises(ValueError, match=r"row 1 sum to probability 1\.3 > 1"):
        fastkd.kd_loss(s, TopK(values, indices))
    fastkd.kd_loss(s, TopK(values, indices), labels=torch.tensor([1, -100, 2]))  # an ignored row is not checked
    fastkd.kd_loss(s, TopK(values, indices, kind="logits"), tail="renormalize")  # logits carry no mass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_whole_distribution_rounded_to_its_dtype_is_accepted(gen, dtype):
    t = logits(gen, (64, 40)) * 3
    full = topk_teacher(t, 40)  # K = V: the probabilities sum to 1 up to rounding
    rounded = TopK(full.values.to(dtype), full.indices)
    assert (rounded.values.double().exp().sum(-1) > 1).any() or dtype == torch.float32
    fastkd.kd_loss(logits(gen, (64, 40)).to(dtype), rounded)


# tail="spread": the rest's mass spread evenly over its V − K classes, the KL over all V


def float64_spread_kl(s, teacher, temperature):
    """The teacher as a full distribution (its K probabilities, the rest's mass evenly over the other classes),
    tempered as p^(1/T) renormalised, against softmax(s/T): written out over all V classes in float64."""
    v, idx = teacher.values.double(), teacher.indices
    num_classes = s.shape[-1]
    rest = (1 - v.exp().sum(-1, keepdim=True)).clamp_min(0)
    p = (rest / (num_classes - idx.shape[-1])).expand(*v.shape[:-1], num_classes).clone()
    p.scatter_(-1, idx, v.exp())
    p_t = F.softmax(torch.log(p) / temperature, -1)
    log_q = F.log_softmax(s.double() / temperature, -1)
    return (torch.xlogy(p_t, p_t) - p_t * log_q).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 7, 29])
def test_spread_tail_is_the_kl_against_an_even_tail_over_all_classes(gen, temperature, k):
    s, t = logits(gen, (5, 30)), logits(gen, (5, 30))
    teacher = topk_teacher(t, k)
    leaf = s.clone().requires_grad_()
    got = fastkd.kd_loss(leaf, teacher, temperature=temperature, tail="spread", reduction="none")
    s64 = s.double().requires_grad_()
    want = temperature**2 * float64_spread_kl(s64, teacher, temperature)
    assert_rel_close(got, want, 1e-5)
    (grad,) = torch.autograd.grad(got.sum(), leaf)
    assert_rel_close(grad, torch.autograd.grad(want.sum(), s64)[0], 1e-5)


def test_spread_tail_equals_bucket_on_the_k_and_full_kd_for_k_equal_v(gen):
    s, t = logits(gen, (4, 12)), logits(gen, (4, 12))
    full = fastkd.kd_loss(s, t, temperature=3.0)
    assert_rel_close(fastkd.kd_loss(s, topk_teacher(t, 12), temperature=3.0, tail="spread"), full, 1e-5)
    # K that hold all the mass (in float64: a float32 rounding residue of ~1e-8 would be tempered into ~1e-4 of
    # mass): an empty rest, the loss of the K classes alone
    indices = t.topk(4).indices
    closed = TopK(torch.log_softmax(t.double().gather(-1, indices), -1), indices)
    loss = fastkd.kd_loss(s, closed, temperature=2.0, tail="spread")
    alone = fastkd.kd_loss(s, TopK(closed.values, closed.indices, "logits"), temperature=2.0, tail="renormalize")
    assert_rel_close(loss, alone, 1e-6)


def test_spread_reference_gradcheck_in_float64(gen):
    s = logits(gen, (3, 9)).double().requires_grad_()
    teacher = topk_teacher(logits(gen, (3, 9)), 3)
    teacher = TopK(teacher.values.double(), teacher.indices)
    assert torch.autograd.gradcheck(lambda x: fastkd.kd_loss(x, teacher, temperature=2.0, tail="spread"), (s,))


def test_spread_tail_refusals(gen):
    s, t = logits(gen, (2, 10)), logits(gen, (2, 10))
    with pytest.raises(ValueError, match="tail='spread' needs the teacher's log-probabilities"):
        fastkd.kd_loss(s, topk_teacher(t, 3, kind="logits"), tail="spread")


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_spread_tail_kernels_match_the_reference(gen, k, temperature, dtype, rtol):
    from conftest import skip_unless_available

    skip_unless_available("triton")
    s, t = logits(gen, (6, 40)), logits(gen, (6, 40))
    teacher = topk_teacher(t, k)
    labels = torch.tensor([3, -100, 0, 39, 7, -100])
    results = {}
    for backend in ("triton", "reference"):
        device = DEVICE if backend == "triton" else "cpu"
        leaf = s.to(dtype).to(device).requires_grad_()
        top = TopK(teacher.values.to(device), teacher.indices.to(device))
        loss, stats = fastkd.kd_loss(
            leaf,
            top,
            labels=labels.to(device),
            ce_weight=0.3,
            temperature=temperature,
            tail="spread",
            reduction="none",
            return_stats=True,
            backend=backend,
        )
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        results[backend] = (loss, grad, stats)
    (loss, grad, stats), (want_loss, want_grad, want_stats) = results["triton"], results["reference"]
    assert_rel_close(loss, want_loss, rtol, what="loss")
    assert_rel_close(grad, want_grad, rtol, what="grad")
    for name in want_stats:
        assert_rel_close(stats[name], want_stats[name], rtol, what=name)


@pytest.mark.parametrize("backend", ["triton", "reference"])  # a TopK teacher has no C++ linear_kd path
def test_linear_kd_with_a_spread_tail_equals_kd_loss_on_the_logits(gen, backend):
    from conftest import skip_unless_available

    skip_unless_available(backend)
    device = DEVICE if backend == "triton" else "cpu"
    hidden, weight = logits(gen, (7, 5)).to(device), logits(gen, (23, 5)).to(device)
    top = topk_teacher(logits(gen, (7, 23)), 4)
    teacher = TopK(top.values.to(device), top.indices.to(device))
    labels = torch.tensor([1, -100, 2, 22, 0, 5, -100], device=device)
    options = dict(labels=labels, temperature=2.0, tail="spread", ce_weight=0.5)
    h = hidden.clone().requires_grad_()
    got = fastkd.linear_kd_loss(h, weight, teacher_logits=teacher, chunk_rows=3, backend=backend, **options)
    (grad,) = torch.autograd.grad(got, h)
    h_ref = hidden.clone().requires_grad_()
    want = fastkd.kd_loss(h_ref @ weight.T, teacher, backend="reference" if device == "cpu" else "auto", **options)
    assert_rel_close(got, want, 1e-5)
    assert_rel_close(grad, torch.autograd.grad(want, h_ref)[0], 1e-5)
