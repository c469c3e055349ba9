"""kd_loss with several teachers: the prob (mean of distributions) and logit (geometric) ensembles against
float64 math, list and tensor forms, weights, gradients to the teachers, every backend (the fused Triton kernels
read the K teacher rows in place), fidelity metrics of the ensemble, and errors."""

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference

from conftest import DEVICE, assert_rel_close, logits

DIVERGENCES = fastkd.kd.DIVERGENCES  # every divergence kd_loss offers


def float64_target(teachers, weights, ensemble, temperature):
    t, w = teachers.double(), torch.as_tensor(weights, dtype=torch.float64)
    w = (w / w.sum()).reshape(-1, *([1] * (t.dim() - 1)))
    if ensemble == "prob":
        return (w * F.softmax(t / temperature, -1)).sum(0)
    return F.softmax((w * t).sum(0) / temperature, -1)


@pytest.mark.parametrize("ensemble", ["prob", "logit"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ensemble_target_matches_float64_math(gen, ensemble, temperature):
    teachers = logits(gen, (3, 5, 40))
    weights = torch.tensor([0.5, 0.2, 0.3])
    z = reference.ensemble_teacher_logits(teachers, weights, ensemble=ensemble, temperature=temperature)
    assert z.shape == (5, 40) and z.dtype == torch.float32
    assert_rel_close(
        F.softmax(z.double() / temperature, -1), float64_target(teachers, weights, ensemble, temperature), 1e-6
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ensemble", ["prob", "logit"])
def test_ensemble_loss_matches_float64_math(gen, divergence, ensemble):
    """The loss against the ensemble target equals the divergence to that target in float64 (KL checked in
    closed form; the others through the single-teacher float64 path with the target as logits)."""
    s, teachers = logits(gen, (6, 30)), logits(gen, (4, 6, 30))
    weights = [1.0, 2.0, 0.0, 1.0]
    got = fastkd.kd_loss(
        s,
        teachers,
        teacher_weights=weights,
        ensemble=ensemble,
        temperature=2.0,
        divergence=divergence,
        reduction="none",
        backend="reference",
    )
    target = float64_target(teachers, weights, ensemble, 2.0)
    want = fastkd.kd_loss(
        s.double(), 2.0 * target.log(), temperature=2.0, divergence=divergence, reduction="none", backend="reference"
    )
    assert_rel_close(got, want, 1e-5)
    if divergence == "kl":
        p_s = F.softmax(s.double() / 2.0, -1)
        closed = 4.0 * (torch.xlogy(target, target) - torch.xlogy(target, p_s)).sum(-1)
        assert_rel_close(got, closed, 1e-5)


def test_list_and_stacked_forms_agree_and_uniform_is_the_default(gen):
    s, teachers = logits(gen, (5, 20)), logits(gen, (3, 5, 20))
    stacked = fastkd.kd_loss(s, teachers, temperature=3.0)
    assert torch.equal(fastkd.kd_loss(s, list(teachers), temperature=3.0), stacked)
    assert_rel_close(fastkd.kd_loss(s, teachers, teacher_weights=[2, 2, 2], temperature=3.0), stacked, 1e-6)
    one = fastkd.kd_loss(s, teachers[:1], temperature=3.0)  # K = 1 is the single teacher
    assert_rel_close(one, fastkd.kd_loss(s, teachers[0], temperature=3.0), 1e-6)


@pytest.mark.parametrize("ensemble", ["prob", "logit"])
def test_every_backend_runs_the_ensemble(kernel, gen, ensemble):
    s = logits(gen, (7, 300)).to(kernel.device)
    teachers = logits(gen, (3, 7, 300), torch.bfloat16).to(kernel.device).requires_grad_(True)
    labels = torch.tensor([0, 5, -100, 7, 299, 1, 2], device=kernel.device)
    options = dict(temperature=2.5, labels=labels, ce_weight=0.2, ensemble=ensemble, teacher_weights=[0.2, 0.3, 0.5])
    results = []
    for backend in (kernel.backend, "reference"):
        s_leaf = s.detach().clone().requires_grad_(True)
        t_leaf = teachers.detach().clone().requires_grad_(True)
        loss = fastkd.kd_loss(s_leaf, t_leaf, backend=backend, **options)
        loss.backward()
        results.append((loss.detach(), s_leaf.grad, t_leaf.grad))
    for got, want, what in zip(results[0], results[1], ("loss", "student grad", "teacher grads")):
        assert_rel_close(got, want, 1e-5 if what != "teacher grads" else 1e-2, what=what)


@pytest.mark.parametrize("ensemble", ["prob", "logit"])
def test_a_zero_weight_teacher_is_absent_even_with_minus_inf_logits(kernel, gen, ensemble):
    """A teacher of weight 0 whose logits hold −inf changes nothing, in the kernels and in the reference: the loss
    and gradients equal those of the ensemble without it (never 0·(−inf) = NaN)."""
    s, teachers = logits(gen, (4, 30)).to(kernel.device), logits(gen, (3, 4, 30)).to(kernel.device)
    teachers[1, :, ::3] = -float("inf")
    for backend in (kernel.backend, "reference"):
        results = []
        for kept, weights in ((teachers, [1.0, 0.0, 3.0]), (teachers[[0, 2]], [1.0, 3.0])):
            s_leaf = s.clone().requires_grad_(True)
            loss = fastkd.kd_loss(
                s_leaf,
                kept,
                teacher_weights=weights,
                ensemble=ensemble,
                temperature=2.0,
                reduction="none",
                backend=backend,
            )
            loss.sum().backward()
            results.append((loss.detach(), s_leaf.grad))
        assert_rel_close(results[0][0], results[1][0], 1e-6, what=f"{backend} loss")
        assert_rel_close(results[0][1], results[1][1], 1e-6, what=f"{backend} student grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ensemble", ["prob", "logit"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_ensemble_kernels_match_the_reference(kernel, gen, divergence, ensemble, dtype, rtol):
    """K = 5 teachers (padded to 8 lanes in the kernel) with one weight 0, a teacher tensor read through strides
    (K not outermost in memory), V not a multiple of the block, labels with an ignored row and CE, and metrics."""
    num_rows, num_classes = 6, 333
    s = logits(gen, (num_rows, num_classes), dtype).to(kernel.device)
    teachers = logits(gen, (num_rows, 5, num_classes), dtype).to(kernel.device).transpose(0, 1)
    labels = torch.tensor([0, 332, -100, 7, 1, 2], device=kernel.device)
    options = dict(
        temperature=3.0,
        divergence=divergence,
        labels=labels,
        ce_weight=0.25,
        ensemble=ensemble,
        teacher_weights=[0.5, 0.0, 1.0, 2.0, 0.5],
        return_stats=True,
    )
    results = []
    for backend in (kernel.backend, "reference"):
        s_leaf = s.detach().clone().requires_grad_(True)
        loss, stats = fastkd.kd_loss(s_leaf, teachers, backend=backend, **options)
        loss.backward()
        results.append((loss, s_leaf.grad, torch.stack(list(stats.values()))))
    for got, want, what in zip(results[0], results[1], ("loss", "student grad", "stats")):
        assert_rel_close(got, want, rtol if what != "stats" else max(rtol, 1e-5), what=what)


def test_fused_ensemble_materialises_no_target(gen, monkeypatch):
    """The Triton kernels read the K teacher rows in place: the N×V target of the reference is never built, and the
    result agrees with it (also with logits spread over ±1e4, where only log-space mixing stays finite)."""
    s = logits(gen, (4, 50)).to(DEVICE)
    teachers = logits(gen, (3, 4, 50), scale=1e3).to(DEVICE)
    teachers[1, 0] *= 10
    want = [
        fastkd.kd_loss(s, teachers, temperature=2.0, ensemble=e, backend="reference", reduction="none")
        for e in ("prob", "logit")
    ]

    def refuse(*args, **kwargs):
        raise AssertionError("the ensemble target was materialised")

    monkeypatch.setattr(reference, "ensemble_teacher_logits", refuse)
    for ensemble, expected in zip(("prob", "logit"), want):
        got = fastkd.kd_loss(s, teachers, temperature=2.0, ensemble=ensemble, backend="triton", reduction="none")
        assert_rel_close(got, expected, 1e-5, what=ensemble)


def test_fused_prob_ensemble_is_exact_for_teachers_offset_by_1e4(gen):
    """Teachers whose logits sit near ±1e4 (an offset leaves a distribution alone): the kernels must not fold the
    offset into one rounded number (each teacher's max is kept apart from its log-sum). Truth: float64 math on
    the same float32 inputs."""
    s = logits(gen, (4, 64)).to(DEVICE).requires_grad_(True)
    teachers = logits(gen, (3, 4, 64)) + torch.tensor([1e4, -1e4, 3e3]).view(3, 1, 1)
    target = float64_target(teachers, [1.0, 1.0, 1.0], "prob", 2.0)
    loss = fastkd.kd_loss(s, teachers.to(DEVICE), temperature=2.0, backend="triton", reduction="sum")
    (grad,) = torch.autograd.grad(loss, s)
    log_p_s = F.log_softmax(s.detach().double().cpu() / 2.0, -1)
    assert_rel_close(loss, 4.0 * (torch.xlogy(target, target) - target * log_p_s).sum(), 1e-5, what="loss")
    assert_rel_close(grad, 2.0 * (log_p_s.exp() - target), 1e-5, what="grad")


def test_ensemble_under_a_float64_default_dtype_passes_float32_weights(gen, monkeypatch):
    s, teachers = logits(gen, (3, 20)).to(DEVICE), logits(gen, (2, 3, 20)).to(DEVICE)
    want = fastkd.kd_loss(s, teachers, backend="triton")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        seen = []
        original = fastkd.kd._KDLossRows.apply
        monkeypatch.setattr(fastkd.kd._KDLossRows, "apply", lambda *args: seen.append(args[6].dtype) or original(*args))
        got = fastkd.kd_loss(s, teachers, backend="triton")
    finally:
        torch.set_default_dtype(previous)
    assert seen == [torch.float32] and torch.equal(got, want)


@pytest.mark.parametrize("ensemble", ["prob", "logit"])
def test_ensemble_stats_are_those_of_the_mean_distribution_at_t1(kernel, gen, ensemble):
    """return_stats measures fidelity to the ensemble's own distribution at T = 1 (for "prob" not the target at T
    renormalised): against float64 math on every backend."""
    s = logits(gen, (8, 40)).to(kernel.device)
    teachers = logits(gen, (3, 8, 40)).to(kernel.device)
    weights = [0.2, 0.5, 0.3]
    target = float64_target(teachers.cpu(), weights, ensemble, 1.0)
    log_p_s = F.log_softmax(s.double().cpu(), -1)
    want = torch.stack(
        [
            (s.cpu().argmax(-1) == target.argmax(-1)).double(),
            (torch.xlogy(target, target) - target * log_p_s).sum(-1),
            -torch.xlogy(target, target).sum(-1),
            -(log_p_s.exp() * log_p_s).sum(-1),
        ]
    ).mean(1)
    for backend in (kernel.backend, "reference"):
        _, stats = fastkd.kd_loss(
            s, teachers, temperature=4.0, ensemble=ensemble, teacher_weights=weights, return_stats=True, backend=backend
        )
        assert_rel_close(torch.stack(list(stats.values())), want, 1e-5, what=backend)


def test_ensemble_with_weights_compiles_fullgraph(gen):
    """Weights given as numbers are checked without reading a tensor on the host: no graph break."""
    s, teachers = logits(gen, (4, 30)).to(DEVICE), logits(gen, (3, 4, 30)).to(DEVICE)

    def step(s, teachers):
        return fastkd.kd_loss(s, teachers, temperature=2.0, teacher_weights=[0.2, 0.3, 0.5], backend="triton")

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(s, teachers)
    assert_rel_close(got, step(s, teachers), 1e-6)


def test_ensemble_gradcheck_float64(gen):
    s = logits(gen, (3, 6), torch.float64).requires_grad_(True)
    teachers = logits(gen, (2, 3, 6), torch.float64).requires_grad_(True)
    for ensemble in ("prob", "logit"):
        assert torch.autograd.gradcheck(
            lambda s, t: fastkd.kd_loss(s, t, temperature=2.0, ensemble=ensemble, teacher_weights=[0.3, 0.7]),  # noqa: B023
            (s, teachers),
        )


S = torch.zeros(2, 5)


@pytest.mark.parametrize(
    "teacher, kwargs, error, match",
    [
        (torch.zeros(3, 2, 5), dict(teacher_weights=[1.0, 2.0]), ValueError, r"teacher_weights must have shape \(3,\)"),
        (torch.zeros(3, 2, 5), dict(teacher_weights=[1.0, -1.0, 1.0]), ValueError, "non-negative"),
        (torch.zeros(3, 2, 5), dict(teacher_weights=[0.0, 0.0, 0.0]), ValueError, "sum to a positive value"),
        (torch.zeros(3, 2, 5), dict(teacher_weights=[1.0, float("nan"), 1.0]), ValueError, "finite"),
        (torch.zeros(3, 2, 6), {}, ValueError, r"shape \(K, \*student shape\)"),
        ([torch.zeros(2, 5), torch.zeros(2, 6)], {}, ValueError, r"teacher_logits\[1\] must have the student's shape"),
        ([], {}, ValueError, "empty list"),
        (torch.zeros(0, 2, 5), {}, ValueError, "K = 0 teachers"),
        (
            [torch.zeros(2, 5), torch.zeros(2, 5, device="meta")],
            {},
            ValueError,
            r"teacher_logits\[1\] must be on the student's device cpu",
        ),
        (torch.zeros(2, 2, 5), dict(teacher_weights="ab"), TypeError, "teacher_weights must be K numbers"),
        (
            torch.zeros(2, 2, 5),
            dict(teacher_weights=torch.ones(2, requires_grad=True)),
            ValueError,
            "teacher_weights are constants",
        ),
        ([torch.zeros(2, 5), "t"], {}, TypeError, r"teacher_logits\[1\] must be a torch.Tensor"),
        (torch.zeros(2, 5), dict(teacher_weights=[1.0]), ValueError, "teacher_weights needs K teachers"),
        (torch.zeros(3, 2, 5), dict(ensemble="median"), ValueError, "ensemble must be one of"),
        (torch.zeros(3, 2, 5, dtype=torch.long), {}, TypeError, "teacher_logits must be float32"),
    ],
)
def test_bad_ensembles_raise_clear_errors(teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.kd_loss(S, teacher, **kwargs)


@pytest.mark.parametrize("ensemble", ["prob", "logit"])
def test_a_zero_weight_teacher_with_a_row_of_minus_inf_is_absent(kernel, gen, ensemble):
    """A teacher of weight 0 whose row is all −inf (no distribution at all) takes no part: the loss and the student
    gradient are those of the other teacher alone, in the kernels and in the reference."""
    s, teachers = logits(gen, (2, 4)).to(kernel.device), logits(gen, (2, 2, 4)).to(kernel.device)
    teachers[1, 0] = -float("inf")
    for backend in (kernel.backend, "reference"):
        results = []
        for teacher, weights in ((teachers, [1.0, 0.0]), (teachers[:1], [1.0])):
            s_leaf = s.clone().requires_grad_(True)
            loss = fastkd.kd_loss(
                s_leaf, teacher, teacher_weights=weights, ensemble=ensemble, reduction="none", backend=backend
            )
            loss.sum().backward()
            results.append((loss.detach(), s_leaf.grad))
        assert_rel_close(results[0][0], results[1][0], 1e-6, what=f"{backend} loss")
        assert_rel_close(results[0][1], results[1][1], 1e-6, what=f"{backend} student grad")
