"""dkd_loss (Decoupled KD): the reference against float64 math written as the paper states it, the identity
KD = TCKD + (1 − p_gt^t)·NCKD, stability where p_gt → 1, gradcheck, reductions and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd

from conftest import assert_rel_close, backend_device, logits, skip_unless_available


def float64_dkd_rows(s, t, labels, temperature, alpha, beta):
    """The paper's definition in float64 probability space (fine away from p_gt → 1)."""
    s, t = s.double() / temperature, t.double() / temperature
    p_s, p_t = F.softmax(s, -1), F.softmax(t, -1)
    gt = F.one_hot(labels, s.shape[-1]).bool()
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], -1)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], -1)
    tckd = (torch.xlogy(b_t, b_t) - torch.xlogy(b_t, b_s)).sum(-1)
    hat_s = F.softmax(s.masked_fill(gt, -math.inf), -1)
    hat_t = F.softmax(t.masked_fill(gt, -math.inf), -1)
    nckd = (torch.xlogy(hat_t, hat_t) - torch.xlogy(hat_t, hat_s)).sum(-1)
    return temperature**2 * (alpha * tckd + beta * nckd)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_reference_matches_float64_math(gen, temperature):
    s, t = logits(gen, (8, 100)), logits(gen, (8, 100))
    labels = torch.randint(0, 100, (8,), generator=gen)
    got = fastkd.dkd_loss(s, t, labels, alpha=1.0, beta=8.0, temperature=temperature, reduction="none")
    assert got.dtype == torch.float32
    assert_rel_close(got, float64_dkd_rows(s, t, labels, temperature, 1.0, 8.0), 1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_equals_tckd_plus_weighted_nckd(gen, temperature):
    """KD = TCKD + (1 − p_gt^t)·NCKD, row by row (Zhao et al., eq. 7), all three at T with the T² factor."""
    s, t = logits(gen, (16, 50)), logits(gen, (16, 50))
    labels = torch.randint(0, 50, (16,), generator=gen)
    options = dict(temperature=temperature, reduction="none")
    tckd = fastkd.dkd_loss(s.double(), t.double(), labels, alpha=1.0, beta=0.0, **options)
    nckd = fastkd.dkd_loss(s.double(), t.double(), labels, alpha=0.0, beta=1.0, **options)
    kd = fastkd.kd_loss(s.double(), t.double(), **options)
    p_gt_t = F.softmax(t.double() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert_rel_close(tckd + (1 - p_gt_t) * nckd, kd, 1e-12)


def test_stays_finite_and_accurate_as_p_gt_goes_to_one():
    """Binary case with the target far ahead (p_gt = 1 − e^-40 at T = 1): 1 − p_gt is 0 in float32 and
    mdistiller's log(Σ p) gives inf/NaN; computed from log-sum-exp the loss stays finite and matches float64."""
    s = torch.tensor([[40.0, 0.0], [30.0, -5.0], [3.0, 0.0]], requires_grad=True)
    t = torch.tensor([[45.0, 0.0], [28.0, -2.0], [2.0, 1.0]])
    labels = torch.tensor([0, 0, 0])
    loss = fastkd.dkd_loss(s, t, labels, temperature=1.0, reduction="none")
    truth = fastkd.dkd_loss(s.double(), t.double(), labels, temperature=1.0, reduction="none")
    assert loss.isfinite().all() and (loss > 0).all()
    assert ((loss.detach().double() - truth) / truth).abs().max() < 1e-5  # each row, the ~4e-18 one included
    loss.sum().backward()
    assert s.grad.isfinite().all()
    # the float64 reference itself against the closed form of the binary TCKD (NCKD is 0 with one non-target):
    # KL([p_t, q_t] ‖ [p_s, q_s]) with log q = −softplus(z_gt − z_other), log p = −softplus(z_other − z_gt)
    zs, zt = s.detach().double(), t.double()
    log_q_s, log_q_t = -F.softplus(zs[:, 0] - zs[:, 1]), -F.softplus(zt[:, 0] - zt[:, 1])
    log_p_s, log_p_t = -F.softplus(zs[:, 1] - zs[:, 0]), -F.softplus(zt[:, 1] - zt[:, 0])
    closed = log_p_t.exp() * (log_p_t - log_p_s) + log_q_t.exp() * (log_q_t - log_q_s)
    assert_rel_close(truth, closed, 1e-12)


def test_reference_gradcheck_float64(gen):
    s = logits(gen, (4, 7), dtype=torch.float64).requires_grad_(True)
    t = logits(gen, (4, 7), dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 3, -100, 6])
    assert torch.autograd.gradcheck(
        lambda s, t: fastkd.dkd_loss(s, t, labels, alpha=0.7, beta=2.0, temperature=2.0, ce_weight=0.3), (s, t)
    )


def test_reductions_and_ignored_rows(gen):
    s, t = logits(gen, (6, 20)).requires_grad_(True), logits(gen, (6, 20))
    labels = torch.tensor([1, -100, 2, 3, -100, 19])
    rows = fastkd.dkd_loss(s, t, labels, reduction="none")
    assert rows[1] == 0 and rows[4] == 0
    assert_rel_close(fastkd.dkd_loss(s, t, labels, reduction="sum"), rows.sum(), 1e-6)
    mean = fastkd.dkd_loss(s, t, labels)
    assert_rel_close(mean, rows.sum() / 4, 1e-6)
    assert_rel_close(fastkd.dkd_loss(s, t, labels, normalizer=8), rows.sum() / 8, 1e-6)
    mean.backward()
    assert not s.grad[[1, 4]].any()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(labels=None), ValueError, "dkd_loss needs labels"),
        (
            dict(student_logits=torch.zeros(2, 1), teacher_logits=torch.zeros(2, 1), labels=torch.tensor([0, 0])),
            ValueError,
            "at least 2 classes",
        ),
        (dict(alpha=math.nan), ValueError, "alpha"),
        (dict(beta="8"), TypeError, "beta must be a real number"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(labels=torch.tensor([0, 5])), ValueError, r"labels must lie in \[0, 5\)"),
        (dict(backend="reference", labels=torch.tensor([0, 5])), ValueError, "labels must lie in"),
        (dict(reduction="mean"), ValueError, "batchmean"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, match):
    args = dict(student_logits=torch.zeros(2, 5), teacher_logits=torch.zeros(2, 5), labels=torch.tensor([0, 1]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastkd.dkd_loss(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels"), **args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_classes", [2, 37, 5003])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("with_ce", [False, True])
def test_kernels_match_the_reference(kernel, gen, dtype, num_classes, reduction, with_ce):
    s = logits(gen, (7, num_classes), dtype=dtype).to(kernel.device)
    t = logits(gen, (7, num_classes), dtype=dtype).to(kernel.device)
    labels = torch.randint(0, num_classes, (7,), generator=gen)
    labels[[1, 4]] = -100
    labels = labels.to(kernel.device)
    options = dict(alpha=0.7, beta=5.0, temperature=3.0, reduction=reduction, ce_weight=0.3 if with_ce else 0.0)
    upstream = torch.rand(7, generator=gen).to(kernel.device) + 0.5 if reduction == "none" else 1.0
    got_s = s.detach().clone().requires_grad_(True)
    got = fastkd.dkd_loss(got_s, t, labels, backend=kernel.backend, **options)
    (got * upstream).sum().backward()
    want_s = s.detach().clone().requires_grad_(True)
    want = fastkd.dkd_loss(want_s, t, labels, backend="reference", **options)
    (want * upstream).sum().backward()
    assert got.dtype == torch.float32
    assert_rel_close(got, want, 1e-5, what="loss")
    assert got_s.grad.dtype == dtype
    assert_rel_close(got_s.grad, want_s.grad, 1e-5 if dtype == torch.float32 else 1e-2, what="student grad")


def test_kernels_stay_accurate_as_p_gt_goes_to_one(kernel):
    s = torch.tensor([[40.0, 0.0], [30.0, -5.0], [3.0, 0.0]], device=kernel.device, requires_grad=True)
    t = torch.tensor([[45.0, 0.0], [28.0, -2.0], [2.0, 1.0]], device=kernel.device)
    labels = torch.tensor([0, 0, 0], device=kernel.device)
    loss = fastkd.dkd_loss(s, t, labels, temperature=1.0, reduction="none", backend=kernel.backend)
    truth = fastkd.dkd_loss(s.double(), t.double(), labels, temperature=1.0, reduction="none", backend="reference")
    assert loss.isfinite().all() and (loss > 0).all()
    assert ((loss.detach().double() - truth) / truth).abs().max() < 1e-5
    loss.sum().backward()
    assert s.grad.isfinite().all()


def test_kernels_refuse_a_teacher_gradient_and_auto_falls_back(kernel, gen):
    s, t = logits(gen, (3, 9)).to(kernel.device), logits(gen, (3, 9)).to(kernel.device).requires_grad_(True)
    labels = torch.tensor([0, 1, 2], device=kernel.device)
    with pytest.raises(RuntimeError, match="give no gradient to teacher_logits"):
        fastkd.dkd_loss(s, t, labels, backend=kernel.backend)
    fastkd.dkd_loss(s, t, labels).backward()  # auto: the reference
    assert t.grad is not None


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_batchmean_with_a_custom_ignore_index_divides_by_the_counted_rows(gen, backend):
    skip_unless_available(backend)
    device = backend_device(backend)
    s, t = logits(gen, (7, 9)), logits(gen, (7, 9))
    labels = torch.randint(0, 9, (7,), generator=gen)
    labels[[1, 4]] = -1
    counted = labels != -1
    got = fastkd.dkd_loss(
        s.to(device), t.to(device), labels.to(device), ignore_index=-1, temperature=2.0, backend=backend
    )
    want = (
        fastkd.dkd_loss(
            s[counted].double(),
            t[counted].double(),
            labels[counted],
            temperature=2.0,
            reduction="sum",
            backend="reference",
        )
        / 5
    )
    assert_rel_close(got, want, 1e-5)
