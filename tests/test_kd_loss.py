"""kd_loss: the reference against float64 math, the Triton kernels against the reference, and the API contract."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import cpu_backend, reference

from conftest import DEVICE, assert_rel_close, backend_device, skip_unless_available, tvd_tie_free
from conftest import logits as random_logits

DIVERGENCES = fastkd.kd.DIVERGENCES  # every divergence kd_loss offers
REDUCTIONS = ("batchmean", "sum", "none")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def logits(gen, shape, dtype=torch.float32, scale=3.0, device=DEVICE):
    return random_logits(gen, shape, dtype, scale, device)


def random_labels(gen, shape, num_classes, ignore_fraction=0.3, ignore_index=-100, device=DEVICE):
    labels = torch.randint(0, num_classes, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_fraction] = ignore_index
    return labels.to(device)


def float64_kd_rows(
    s,
    t,
    labels=None,
    *,
    temperature=1.0,
    divergence="kl",
    beta=0.5,
    ce_weight=0.0,
    kd_weight=1.0,
    scale_by_t2=True,
    ignore_index=-100,
):
    """Row losses in float64, written in probability space (xlogy), independently of fastkd.reference."""
    s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    p_s, p_t = F.softmax(s / temperature, -1), F.softmax(t / temperature, -1)

    def kl(p, q):
        return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)

    if divergence == "kl":
        d = kl(p_t, p_s)
    elif divergence == "reverse_kl":
        d = kl(p_s, p_t)
    elif divergence == "cosine":
        d = 1 - F.cosine_similarity(p_s, p_t, dim=-1, eps=0)
    elif divergence == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        d = (beta * kl(p_t, m) if beta > 0 else 0) + ((1 - beta) * kl(p_s, m) if beta < 1 else 0)
    elif divergence == "tvd":
        d = 0.5 * (p_s - p_t).abs().sum(-1)
    else:
        raise ValueError(f"no float64 truth for divergence {divergence!r}")
    rows = kd_weight * (temperature**2 if scale_by_t2 else 1) * d
    if labels is not None:
        labels = labels.reshape(-1)
        if ce_weight:
            rows = rows + ce_weight * F.cross_entropy(s, labels.long(), reduction="none", ignore_index=ignore_index)
        rows = torch.where(labels != ignore_index, rows, 0)
    return rows


def loss_and_grads(s, t, upstream=None, **options):
    """kd_loss and the gradients of Σ upstream·loss w.r.t. fresh leaf copies of s and t (t only if it is to
    receive one: t.requires_grad)."""
    s = s.detach().clone().requires_grad_(True)
    teacher_grad = t.requires_grad
    if options.get("divergence") == "tvd":  # the same tie-free teacher for every backend compared
        t = tvd_tie_free(s, t.detach(), options.get("temperature", 1.0))
    t_leaf = t.detach().clone().requires_grad_(teacher_grad)
    loss = fastkd.kd_loss(s, t_leaf, **options)
    (loss if upstream is None else loss * upstream).sum().backward()
    grad_t = t_leaf.grad
    if grad_t is None and teacher_grad:  # not reached by the graph (e.g. JSD at β = 0): a zero gradient
        grad_t = torch.zeros_like(t_leaf)
    return loss.detach(), s.grad, grad_t


# ------------------------------------------------------------------------------------------------------------
# the reference: against float64 math, and gradcheck
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("with_ce", [False, True])
def test_reference_matches_float64_math(gen, divergence, temperature, with_ce):
    s, t = logits(gen, (16, 257)).cpu(), logits(gen, (16, 257)).cpu()
    labels = random_labels(gen, (16,), 257).cpu() if with_ce else None
    options = dict(
        temperature=temperature, divergence=divergence, beta=0.3, ce_weight=0.7 if with_ce else 0.0, kd_weight=0.9
    )
    rows = reference.kd_loss_rows(s, t, labels, ignore_index=-100, scale_by_t2=True, **options)
    assert rows.dtype == torch.float32
    assert_rel_close(rows, float64_kd_rows(s, t, labels, **options), 1e-5, what="reference rows")


@pytest.mark.parametrize("shape", [(8, 50), (2, 3, 50)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_default_equals_the_eager_kl_div_expression(gen, shape, temperature):
    s, t = logits(gen, shape).cpu().double(), logits(gen, shape).cpu().double()
    v = shape[-1]
    eager = (
        F.kl_div(
            F.log_softmax(s.reshape(-1, v) / temperature, -1),
            F.log_softmax(t.reshape(-1, v) / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    ours = fastkd.kd_loss(s, t, temperature=temperature, backend="reference")
    assert_rel_close(ours, eager, 1e-12, what="batchmean vs F.kl_div")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_gradcheck_float64(gen, divergence, reduction):
    s = logits(gen, (4, 9), torch.float64).cpu().requires_grad_(True)
    t = logits(gen, (4, 9), torch.float64).cpu().requires_grad_(True)
    labels = torch.tensor([3, -100, 0, 8])

    def fn(s, t):
        return fastkd.kd_loss(
            s,
            t,
            temperature=2.0,
            divergence=divergence,
            beta=0.3,
            reduction=reduction,
            labels=labels,
            ce_weight=0.5,
            backend="reference",
        )

    assert torch.autograd.gradcheck(fn, (s, t))


# ------------------------------------------------------------------------------------------------------------
# the kernel backends (Triton, C++ CPU) against the reference
# ------------------------------------------------------------------------------------------------------------


def check_kernel_against_reference(kernel, s, t, upstream=None, grad_rtol=None, **options):
    got = loss_and_grads(s, t, upstream, backend=kernel.backend, **options)
    want = loss_and_grads(s, t, upstream, backend="reference", **options)
    loss_rtol = RTOL[torch.float32]  # the loss is computed and returned in float32 whatever the input dtype
    grad_rtol = grad_rtol or RTOL[s.dtype]
    assert got[0].dtype == torch.float32
    assert_rel_close(got[0], want[0], loss_rtol, what="loss")
    assert got[1].dtype == s.dtype and got[1].shape == s.shape
    assert_rel_close(got[1], want[1], grad_rtol, what="student grad")
    if t.requires_grad:
        assert got[2].dtype == t.dtype and got[2].shape == t.shape
        assert_rel_close(got[2], want[2], grad_rtol, what="teacher grad")
    else:
        assert got[2] is None
    return got


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("label_mode", ["no_labels", "ignore_only", "ce"])
def test_kernel_matches_reference(kernel, gen, divergence, reduction, dtype, label_mode):
    n, v = 7, 300
    temperature = 1.0 if label_mode == "ignore_only" else 3.5
    s = logits(gen, (n, v), dtype, device=kernel.device)
    t = logits(gen, (n, v), dtype, device=kernel.device).requires_grad_(True)
    labels = None if label_mode == "no_labels" else random_labels(gen, (n,), v, device=kernel.device)
    upstream = torch.rand(n, generator=gen).to(kernel.device) + 0.5 if reduction == "none" else None
    check_kernel_against_reference(
        kernel,
        s,
        t,
        upstream,
        temperature=temperature,
        divergence=divergence,
        beta=0.3,
        reduction=reduction,
        labels=labels,
        ce_weight=0.4 if label_mode == "ce" else 0.0,
        kd_weight=0.8,
    )


@pytest.mark.parametrize("num_classes", [1, 2, 17, 1000, 5003])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kernel_vocabulary_sizes(kernel, gen, num_classes, divergence):
    """V = 1, tiny, not a power of two, and larger than one block (the online rescaling across blocks)."""
    s = logits(gen, (3, num_classes), device=kernel.device)
    t = logits(gen, (3, num_classes), device=kernel.device).requires_grad_(True)
    loss, grad_s, _ = check_kernel_against_reference(
        kernel,
        s,
        t,
        temperature=2.0,
        divergence=divergence,
        labels=random_labels(gen, (3,), num_classes, 0.0, device=kernel.device),
        ce_weight=0.5,
    )
    if num_classes == 1:
        assert loss.item() == 0.0 and not grad_s.any()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(kernel, divergence, reduction):
    s = torch.zeros(0, 11, device=kernel.device, requires_grad=True)
    loss = fastkd.kd_loss(
        s, torch.zeros(0, 11, device=kernel.device), divergence=divergence, reduction=reduction, backend=kernel.backend
    )
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    assert s.grad.shape == s.shape
    if reduction != "none":
        assert loss.item() == 0.0


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("with_ce", [False, True])
def test_all_rows_ignored_gives_zero_connected_to_the_graph(gen, backend, with_ce):
    skip_unless_available(backend)
    device = backend_device(backend)
    s = logits(gen, (4, 30), device=device).requires_grad_(True)
    loss = fastkd.kd_loss(
        s,
        logits(gen, (4, 30), device=device),
        labels=torch.full((4,), -100, device=device),
        ce_weight=0.5 if with_ce else 0.0,
        backend=backend,
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ignored_rows_get_zero_gradient_and_are_not_counted(kernel, gen, divergence):
    s, t = logits(gen, (6, 40), device=kernel.device), logits(gen, (6, 40), device=kernel.device)
    labels = torch.tensor([1, -100, 2, -100, 3, 4], device=kernel.device)
    counted = labels != -100
    loss, grad_s, _ = check_kernel_against_reference(
        kernel, s, t, temperature=2.0, divergence=divergence, labels=labels
    )
    assert not grad_s[~counted].any()
    kept = fastkd.kd_loss(s[counted], t[counted], temperature=2.0, divergence=divergence, backend=kernel.backend)
    assert_rel_close(loss, kept, 1e-6, what="ignored rows vs dropped rows")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_masked_vocabulary_minus_inf(kernel, gen, divergence, beta):
    """−inf logits (masked vocabulary) contribute 0·log 0 = 0: the loss stays finite, no NaN, zero gradient
    there. The first block of the row is entirely masked, the rest partly."""
    n, v = 3, 5000
    s, t = logits(gen, (n, v), device=kernel.device), logits(gen, (n, v), device=kernel.device).requires_grad_(True)
    masked = torch.rand(n, v, generator=gen).to(kernel.device) < 0.3
    masked[:, :4096] = True
    s = s.masked_fill(masked, -math.inf)
    t = t.detach().masked_fill(masked, -math.inf).requires_grad_(True)
    labels = (~masked).int().argmax(-1)  # the first unmasked class of each row
    loss, grad_s, grad_t = check_kernel_against_reference(
        kernel, s, t, temperature=2.0, divergence=divergence, beta=beta, labels=labels, ce_weight=0.3
    )
    assert loss.isfinite().all()
    assert not grad_s[masked].any() and not grad_t[masked].any()


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_teacher_minus_inf_where_student_is_finite(kernel, gen, divergence):
    s, t = logits(gen, (4, 64), device=kernel.device), logits(gen, (4, 64), device=kernel.device)
    t[:, ::3] = -math.inf
    loss, _, _ = check_kernel_against_reference(kernel, s, t, temperature=1.5, divergence=divergence, reduction="none")
    assert loss.isfinite().all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_or_plus_inf_logit_makes_its_row_nan_and_only_that_row(kernel, gen, divergence, bad, where):
    """A NaN or +inf logit gives its row a NaN loss and NaN gradients, as in the reference (never a number that
    hides it); the other rows are untouched."""
    s, t = logits(gen, (4, 300), device=kernel.device), logits(gen, (4, 300), device=kernel.device)
    (s if where == "student" else t)[1, 123] = bad
    got, _ = (
        check_kernel_against_reference(
            kernel, s, t.requires_grad_(True), temperature=2.0, divergence=divergence, reduction="none"
        ),
        None,
    )
    assert got[0][1].isnan() and got[1][1].isnan().all() and got[2][1].isnan().all()
    assert got[0][[0, 2, 3]].isfinite().all()


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_logits(kernel, gen, divergence, dtype):
    """Logits of ±1e4 (the exponentials overflow without the running max). The problem is ill-conditioned there:
    log p moves by ε·|s|/T ≈ 1.5e-4 when a logit moves by one float32 ulp ε, and the loss can be a tiny sum of
    e^-15 terms. So each output is held to the float64 truth within the larger of: its dtype's usual tolerance,
    8× the error of the reference evaluated in float32 on the same inputs, and 2·ε·max|s|/T.
    (Not "cosine": for near one-hot rows 1 − cos and its gradient, ~1e-11 here, sit below float32's resolution
    of the cosine, in the reference as in the kernels; see test_cosine_of_large_logits_is_right_to_float32.)"""
    s = (torch.rand(5, 333, generator=gen) * 2e4 - 1e4).to(dtype).to(kernel.device)
    t = (s.double().cpu() + torch.randn(5, 333, generator=gen, dtype=torch.float64) * 50).to(dtype).to(kernel.device)
    t.requires_grad_(True)
    temperature = 4.0
    options = dict(temperature=temperature, divergence=divergence, reduction="none")
    got = loss_and_grads(s, t, backend=kernel.backend, **options)
    ref32 = loss_and_grads(s, t, backend="reference", **options)
    truth = loss_and_grads(s.double(), t.double(), backend="reference", **options)
    conditioning = 2 * torch.finfo(torch.float32).eps * max(s.abs().max().item(), t.abs().max().item()) / temperature
    assert got[0].isfinite().all()
    for what, value, ref, exact in zip(("loss", "student grad", "teacher grad"), got, ref32, truth):
        ref_error = ((ref.double() - exact).norm() / exact.norm()).item()
        floor = RTOL[torch.float32] if what == "loss" else RTOL[dtype]
        assert_rel_close(value, exact, max(floor, 8 * ref_error, conditioning), what=f"{what} vs float64")


@pytest.mark.parametrize("op", ["kd", "topk", "dkd"])
def test_reference_cross_entropy_gradient_is_exact_for_logits_of_1e4(gen, op):
    """The reference's CE term comes from log_softmax (the row max subtracted first), so its gradient keeps float32
    accuracy at logits of ±1e4, as eager F.cross_entropy does (logsumexp − s[label] lost four digits)."""
    s = logits(gen, (8, 50), device="cpu") + 1e4 * torch.tensor([1.0, -1.0]).repeat(4).unsqueeze(-1)
    t = logits(gen, (8, 50), device="cpu")
    labels = torch.randint(0, 50, (8,), generator=gen)
    x = s.double().requires_grad_(True)
    F.cross_entropy(x, labels, reduction="sum").backward()
    x_leaf = s.clone().requires_grad_(True)
    options = dict(ce_weight=1.0, reduction="sum", backend="reference")
    if op == "kd":
        fastkd.kd_loss(x_leaf, t, labels=labels, kd_weight=0.0, **options).backward()
    elif op == "topk":
        fastkd.kd_loss(x_leaf, fastkd.topk_teacher(t, 4), labels=labels, kd_weight=0.0, **options).backward()
    else:
        fastkd.dkd_loss(x_leaf, t, labels, alpha=0.0, beta=0.0, **options).backward()
    assert_rel_close(x_leaf.grad, x.grad, 1e-6)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 100.0), (torch.float64, 1e6)], ids=str)
def test_the_largest_temperature_keeps_three_digits(gen, divergence, dtype, temperature):
    """At the bound of MAX_TEMPERATURE the loss keeps three digits (the float32 error grows as about 6e-8·T²);
    the truth is the KL in its stationary form Σ p·(e^x − 1 − x), x = log q − log p, in float64, which a common
    error of the log-normalisers changes only to second order."""
    s, t = logits(gen, (6, 500), dtype, device="cpu"), logits(gen, (6, 500), dtype, device="cpu")
    log_p_s, log_p_t = F.log_softmax(s.double() / temperature, -1), F.log_softmax(t.double() / temperature, -1)
    p, x = (log_p_t, log_p_s - log_p_t) if divergence == "kl" else (log_p_s, log_p_t - log_p_s)
    truth = temperature**2 * (p.exp() * (torch.expm1(x) - x)).sum(-1)
    for backend in ("triton", "cpu", "reference") if dtype == torch.float32 else ("reference",):
        if backend == "cpu" and not cpu_backend.AVAILABLE:
            continue
        got = fastkd.kd_loss(
            s.to(backend_device(backend)),
            t.to(backend_device(backend)),
            temperature=temperature,
            divergence=divergence,
            reduction="none",
            backend=backend,
        )
        assert_rel_close(got, truth, 1e-3, what=backend)


def test_cosine_of_large_logits_is_right_to_float32(kernel, gen):
    """Where 1 − cos is far below float32's resolution of 1 (near one-hot rows), loss and gradient are right in
    absolute terms: 1 − cos within a few float32 ulps of 1, scaled as the outputs are (loss by T², gradients by
    T²/T)."""
    s = (torch.rand(5, 333, generator=gen) * 2e4 - 1e4).to(kernel.device)
    t = (s.double().cpu() + torch.randn(5, 333, generator=gen, dtype=torch.float64) * 50).float().to(kernel.device)
    options = dict(temperature=4.0, divergence="cosine", reduction="none")
    got = loss_and_grads(s, t.requires_grad_(True), backend=kernel.backend, **options)
    truth = loss_and_grads(s.double(), t.double().requires_grad_(True), backend="reference", **options)
    for what, a, b, scale in zip(("loss", "student grad", "teacher grad"), got, truth, (16.0, 4.0, 4.0)):
        assert (a.double() - b).abs().max() <= 8 * torch.finfo(torch.float32).eps * scale, what


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_contiguous_inputs(kernel, gen, divergence):
    base_s = logits(gen, (12, 2 * 150), device=kernel.device)
    base_t = logits(gen, (150, 12), device=kernel.device)
    s = base_s[::2, ::2]  # row and column strides 600 and 2
    t = base_t.t()[::2]  # column stride 12: a transposed view
    assert not s.is_contiguous() and not t.is_contiguous()
    check_kernel_against_reference(
        kernel, s, t.requires_grad_(True), temperature=2.0, divergence=divergence, reduction="none"
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_three_dimensional_logits_with_padding(kernel, gen, divergence):
    """(batch, sequence, vocabulary) as in LLM distillation, padded positions marked with ignore_index."""
    b, seq, v = 2, 5, 97
    s = logits(gen, (b, seq, v), torch.bfloat16, device=kernel.device)
    t = logits(gen, (b, seq, v), torch.bfloat16, device=kernel.device)
    labels = random_labels(gen, (b, seq), v, device=kernel.device)
    for reduction in REDUCTIONS:
        loss, grad_s, _ = check_kernel_against_reference(
            kernel, s, t, temperature=2.0, divergence=divergence, reduction=reduction, labels=labels, ce_weight=0.5
        )
        if reduction == "none":
            assert loss.shape == (b, seq)
    assert grad_s.shape == (b, seq, v)


def test_mixed_input_dtypes(kernel, gen):
    s = logits(gen, (5, 60), torch.bfloat16, device=kernel.device)
    t = logits(gen, (5, 60), torch.float32, device=kernel.device)
    check_kernel_against_reference(kernel, s, t.requires_grad_(True), temperature=2.0)


def test_int32_labels(kernel, gen):
    s, t = logits(gen, (6, 40), device=kernel.device), logits(gen, (6, 40), device=kernel.device)
    labels = random_labels(gen, (6,), 40, device=kernel.device)
    a = fastkd.kd_loss(s, t, labels=labels.int(), ce_weight=0.5, backend=kernel.backend)
    b = fastkd.kd_loss(s, t, labels=labels, ce_weight=0.5, backend=kernel.backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_labels_are_read_through_their_strides(kernel, gen, layout):
    """A strided view of labels (a column of a (N, 2) tensor) and an expanded scalar (stride 0) give what their
    contiguous copies give, for kd_loss, dkd_loss and a TopK teacher, values and gradients."""
    s, t = logits(gen, (4, 7), device=kernel.device), logits(gen, (4, 7), device=kernel.device)
    if layout == "strided":
        labels = torch.tensor([[1, -100], [5, -100], [-100, 3], [2, 4]], device=kernel.device)[:, 0]
    else:
        labels = torch.tensor(2, device=kernel.device).expand(4)
    assert not labels.is_contiguous()
    calls = [
        lambda x, y: fastkd.kd_loss(
            x, t, labels=y, ce_weight=1.0, reduction="none", temperature=2.0, backend=kernel.backend
        ),
        lambda x, y: fastkd.dkd_loss(x, t, y, ce_weight=1.0, reduction="none", backend=kernel.backend),
    ]
    if kernel.backend == "triton":  # the TopK kernels are Triton's
        calls.append(
            lambda x, y: fastkd.kd_loss(
                x, fastkd.topk_teacher(t, 3), labels=y, ce_weight=1.0, reduction="none", backend=kernel.backend
            )
        )
    for call in calls:
        results = []
        for y in (labels, labels.contiguous()):
            x = s.detach().clone().requires_grad_(True)
            rows = call(x, y)
            rows.sum().backward()
            results.append((rows.detach(), x.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("case", ["kd", "kd-float64", "ensemble", "topk", "dkd"])
@pytest.mark.parametrize("backend", ["auto", "triton", "cpu", "reference"])
def test_an_ignored_row_of_minus_inf_logits_gets_zero_gradient(gen, case, backend):
    """An ignored row enters no computation: its gradient is 0 (student and teacher) even where its logits are all
    −inf, on every backend and every path to the reference (float64, ensembles, TopK, DKD with teacher grad)."""
    if backend != "reference" and case == "kd-float64":
        pytest.skip("float64 runs the reference")
    if backend in ("triton", "cpu"):
        skip_unless_available(backend)
    device = backend_device(backend) if backend in ("triton", "cpu") else torch.device("cpu")
    dtype = torch.float64 if case == "kd-float64" else torch.float32
    s, t = logits(gen, (3, 6), dtype, device=device), logits(gen, (3, 6), dtype, device=device)
    s[1], t[1] = -math.inf, -math.inf
    labels = torch.tensor([1, -100, 2], device=device)
    s.requires_grad_(True)
    t.requires_grad_(case != "topk" and not (case == "dkd" and backend in ("triton", "cpu")))  # kernels: no t grad
    if case == "ensemble":
        loss = fastkd.kd_loss(s, torch.stack([t, t.detach() * 0.5]), labels=labels, ce_weight=1.0, backend=backend)
    elif case == "topk":  # log-probabilities: a TopK of raw logits as "logprobs" is refused (mass above 1)
        top = torch.log_softmax(t, -1).topk(3)
        loss = fastkd.kd_loss(
            s, fastkd.TopK(top.values, top.indices), labels=labels, ce_weight=1.0, temperature=2.0, backend=backend
        )
    elif case == "dkd":
        loss = fastkd.dkd_loss(s, t, labels, ce_weight=1.0, backend=backend)
    else:
        loss = fastkd.kd_loss(s, t, labels=labels, ce_weight=1.0, temperature=2.0, backend=backend)
    loss.backward()
    assert loss.isfinite()
    for grad in (s.grad, t.grad) if t.requires_grad else (s.grad,):
        assert grad.isfinite().all() and torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_out_of_range_label_gives_nan_in_the_kernel(kernel, gen):
    """On CUDA the label range is not checked on the host (no sync): the kernel marks the row NaN instead."""
    s, t = logits(gen, (3, 10), device=kernel.device), logits(gen, (3, 10), device=kernel.device)
    labels = torch.tensor([2, 10, -100], device=kernel.device)
    rows, _, _ = torch.ops.fastkd.kd_loss_rows(
        s, t, None, labels, 1.0, "kl", 0.5, -100, 0.5, 1.0, 1.0, "none", kernel.backend, False
    )
    assert rows[0].isfinite() and rows[1].isnan() and rows[2] == 0
    ref = reference.kd_loss_rows(
        s,
        t,
        labels,
        temperature=1.0,
        divergence="kl",
        beta=0.5,
        ignore_index=-100,
        ce_weight=0.5,
        kd_weight=1.0,
        scale_by_t2=True,
    )
    assert_rel_close(rows, ref, 1e-6)


def test_double_backward_through_a_kernel_has_a_graph(kernel, gen):
    """create_graph=True through a kernel returns a gradient with a graph (fastkd.second_order), never a gradient
    without one: its own gradient is the reference's (tests/test_second_order.py has every divergence)."""
    s, t = logits(gen, (3, 20), device=kernel.device), logits(gen, (3, 20), device=kernel.device)
    second = []
    for backend in (kernel.backend, "reference"):
        leaf = s.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fastkd.kd_loss(leaf, t, backend=backend), leaf, create_graph=True)
        assert grad.requires_grad
        second.append(torch.autograd.grad((grad * grad).sum(), leaf)[0])
    assert_rel_close(second[0], second[1], 1e-5)


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_teacher_gets_no_gradient_unless_it_requires_one(gen, backend):
    skip_unless_available(backend)
    s = logits(gen, (3, 20), device=backend_device(backend)).requires_grad_(True)
    t = logits(gen, (3, 20), device=backend_device(backend))
    fastkd.kd_loss(s, t, backend=backend).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("beta", [0.0, 1e-7, 1 - 1e-7, 1.0])
def test_jsd_is_continuous_at_the_ends_of_beta(kernel, gen, beta):
    """JSD_β → 0 as β → 0 or 1, smoothly (≈ β·KL(p_t‖p_s) and (1−β)·KL(p_s‖p_t)), with no jump at the ends.
    (Moderate logits: the next term of the expansion grows with Σ p_t²/p_s.)"""
    s, t = logits(gen, (4, 50), scale=1.0, device=kernel.device), logits(gen, (4, 50), scale=1.0, device=kernel.device)
    jsd = fastkd.kd_loss(s, t, divergence="jsd", beta=beta, reduction="none", backend=kernel.backend)
    if beta in (0.0, 1.0):
        assert not jsd.any()
    else:
        near = "kl" if beta < 0.5 else "reverse_kl"
        kl = fastkd.kd_loss(s, t, divergence=near, reduction="none", backend=kernel.backend)
        weight = min(beta, 1 - beta)
        assert_rel_close(jsd / weight, kl, 1e-3, what="JSD/β vs KL")


@pytest.mark.parametrize("beta", [1e-7, 1e-4, 0.5, 1 - 1e-4, 1 - 1e-7])
def test_jsd_near_the_ends_of_beta_is_accurate(kernel, gen, beta):
    """Where JSD_β is tiny its float32 value keeps full relative accuracy (log1p/expm1 forms, no cancellation)."""
    s, t = logits(gen, (6, 80), device=kernel.device), logits(gen, (6, 80), device=kernel.device).requires_grad_(True)
    want = float64_kd_rows(s, t, divergence="jsd", beta=beta)
    ref = reference.kd_loss_rows(
        s,
        t,
        None,
        temperature=1.0,
        divergence="jsd",
        beta=beta,
        ignore_index=-100,
        ce_weight=0.0,
        kd_weight=1.0,
        scale_by_t2=True,
    )
    assert_rel_close(ref, want, 1e-5, what="reference vs float64")
    check_kernel_against_reference(kernel, s, t, divergence="jsd", beta=beta, reduction="none")


# ------------------------------------------------------------------------------------------------------------
# fidelity metrics (return_stats)
# ------------------------------------------------------------------------------------------------------------


def float64_fidelity(s, t, labels=None, ignore_index=-100):
    """Mean top-1 agreement, KL(p_t‖p_s), H(p_t), H(p_s) at T = 1 over counted rows, in float64 with xlogy."""
    s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    p_s, p_t = F.softmax(s, -1), F.softmax(t, -1)
    rows = torch.stack(
        [
            (s.argmax(-1) == t.argmax(-1)).double(),
            (torch.xlogy(p_t, p_t) - torch.xlogy(p_t, p_s)).sum(-1),
            -torch.xlogy(p_t, p_t).sum(-1),
            -torch.xlogy(p_s, p_s).sum(-1),
        ]
    )
    counted = torch.ones(s.shape[0], dtype=torch.bool) if labels is None else labels.reshape(-1).cpu() != ignore_index
    return rows[:, counted.to(rows.device)].sum(1) / max(int(counted.sum()), 1)


def test_reference_fidelity_metrics_match_float64_math(gen):
    s, t = logits(gen, (9, 300)), logits(gen, (9, 300))
    labels = random_labels(gen, (9,), 300)
    _, stats = fastkd.kd_loss(s, t, labels=labels, return_stats=True, backend="reference")
    assert list(stats) == ["top1_agreement", "predictive_kl", "teacher_entropy", "student_entropy"]
    assert_rel_close(torch.stack(list(stats.values())), float64_fidelity(s, t, labels), 1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_classes", [40, 5003])
@pytest.mark.parametrize("with_ce", [False, True])
def test_kernel_fidelity_metrics_match_the_reference(kernel, gen, divergence, dtype, num_classes, with_ce):
    """The metrics (at T = 1) come from the same pass as a loss at T = 3, across blocks, with and without the
    CE term that shares the student's T = 1 sums; asking for them leaves the loss and its gradient unchanged."""
    s = logits(gen, (6, num_classes), dtype, device=kernel.device)
    t = (s.double().cpu() + torch.randn(6, num_classes, generator=gen, dtype=torch.float64) * 2).to(dtype)
    t[3] = torch.randn(num_classes, generator=gen, dtype=torch.float64).to(dtype)  # a row that likely disagrees
    t = t.to(kernel.device)
    labels = random_labels(gen, (6,), num_classes, device=kernel.device)
    options = dict(temperature=3.0, divergence=divergence, labels=labels, ce_weight=0.3 if with_ce else 0.0)
    s_leaf = s.detach().clone().requires_grad_(True)
    loss, stats = fastkd.kd_loss(s_leaf, t, return_stats=True, backend=kernel.backend, **options)
    plain = fastkd.kd_loss(s, t, backend=kernel.backend, **options)
    assert torch.equal(loss.detach(), plain)
    want = fastkd.kd_loss(s, t, return_stats=True, backend="reference", **options)[1]
    for name in stats:
        assert stats[name].shape == () and stats[name].dtype == torch.float32 and not stats[name].requires_grad
        assert_rel_close(stats[name], want[name], RTOL[torch.float32], what=name)
    loss.backward()
    assert s_leaf.grad.isfinite().all()


def test_fidelity_metrics_of_an_empty_or_fully_ignored_batch_are_zero(kernel):
    s = torch.zeros(3, 7, device=kernel.device)
    for labels in (torch.full((3,), -100, device=kernel.device), None):
        rows = slice(None) if labels is not None else slice(0, 0)
        _, stats = fastkd.kd_loss(s[rows], s[rows], labels=labels, return_stats=True, backend=kernel.backend)
        assert all(value.item() == 0.0 for value in stats.values())


def test_return_stats_must_be_a_bool():
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        fastkd.kd_loss(S, T, return_stats=1)


# ------------------------------------------------------------------------------------------------------------
# reductions and the normalizer
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
def test_reductions_relate_as_documented(gen, backend):
    skip_unless_available(backend)
    device = backend_device(backend)
    s, t = logits(gen, (8, 30), device=device), logits(gen, (8, 30), device=device)
    labels = torch.tensor([0, -100, 2, 3, -100, 5, 6, 7], device=device)
    rows = fastkd.kd_loss(s, t, labels=labels, reduction="none", backend=backend)
    total = fastkd.kd_loss(s, t, labels=labels, reduction="sum", backend=backend)
    mean = fastkd.kd_loss(s, t, labels=labels, reduction="batchmean", backend=backend)
    assert_rel_close(total, rows.sum(), 1e-6)
    assert_rel_close(mean, rows.sum() / 6, 1e-6)
    assert_rel_close(fastkd.kd_loss(s, t, labels=labels, normalizer=3, backend=backend), rows.sum() / 3, 1e-6)
    normalizer = torch.tensor(12.0, device=device)
    assert_rel_close(fastkd.kd_loss(s, t, labels=labels, normalizer=normalizer, backend=backend), rows.sum() / 12, 1e-6)


def test_normalizer_makes_gradient_accumulation_equal_one_big_batch(kernel, gen):
    s, t = logits(gen, (10, 33), device=kernel.device), logits(gen, (10, 33), device=kernel.device)
    labels = random_labels(gen, (10,), 33, device=kernel.device)
    whole = loss_and_grads(s, t, labels=labels, ce_weight=0.2, backend=kernel.backend)
    counted = (labels != -100).sum()
    grads = []
    for part in (slice(0, 4), slice(4, 10)):
        _, g, _ = loss_and_grads(
            s[part], t[part], labels=labels[part], ce_weight=0.2, normalizer=counted, backend=kernel.backend
        )
        grads.append(g)
    assert_rel_close(torch.cat(grads), whole[1], 1e-6)


def test_a_zero_tensor_normalizer_gives_zero_not_nan(kernel, gen):
    s, t = logits(gen, (3, 17), device=kernel.device), logits(gen, (3, 17), device=kernel.device)
    labels = torch.full((3,), -100, device=kernel.device)
    loss, grad_s, _ = loss_and_grads(
        s,
        t,
        labels=labels,
        ce_weight=0.2,
        normalizer=torch.zeros((), dtype=torch.int64, device=kernel.device),
        backend=kernel.backend,
    )
    assert loss.item() == 0.0 and torch.equal(grad_s, torch.zeros_like(grad_s))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.float16], ids=str)
def test_a_tensor_normalizer_of_any_real_dtype_keeps_the_loss_float32(gen, dtype):
    s, t = logits(gen, (3, 17), device="cpu"), logits(gen, (3, 17), device="cpu")
    loss = fastkd.kd_loss(s, t, normalizer=torch.tensor(4, dtype=dtype))
    assert loss.dtype == torch.float32
    assert_rel_close(loss, fastkd.kd_loss(s, t, reduction="sum") / 4, 1e-6)


def test_a_negative_or_non_finite_tensor_normalizer_gives_nan_where_it_is_not_read():
    """On CUDA the normalizer's value is not read on the host: its divisor is computed on the device, NaN for a
    value that is negative or not finite, 1 for 0 (no counted rows)."""
    values = torch.tensor([-2.0, math.nan, math.inf, -math.inf, 0.0, 3.0])
    divisors = torch.stack([fastkd.kd.tensor_divisor(v) for v in values])
    assert divisors.dtype == torch.float32
    assert divisors[:4].isnan().all() and divisors[4] == 1 and divisors[5] == 3


def test_scale_by_t2_false_and_kd_weight_give_the_weighted_unscaled_divergence(kernel, gen):
    s, t = logits(gen, (6, 13), device=kernel.device), logits(gen, (6, 13), device=kernel.device)
    got = fastkd.kd_loss(s, t, temperature=3.0, scale_by_t2=False, kd_weight=0.5, backend=kernel.backend)
    assert_rel_close(got, 0.5 * float64_kd_rows(s, t, temperature=3.0, scale_by_t2=False).mean(), 1e-5)


def test_kdloss_module_matches_the_function(kernel, gen):
    s, t = logits(gen, (4, 25), device=kernel.device), logits(gen, (4, 25), device=kernel.device)
    labels = random_labels(gen, (4,), 25, device=kernel.device)
    module = fastkd.KDLoss(temperature=2.0, divergence="jsd", beta=0.2, ce_weight=0.3, backend=kernel.backend)
    want = fastkd.kd_loss(
        s, t, temperature=2.0, divergence="jsd", beta=0.2, ce_weight=0.3, labels=labels, backend=kernel.backend
    )
    assert torch.equal(module(s, t, labels), want)
    assert "divergence='jsd'" in repr(module)
    loss, stats = module(s, t, labels, return_stats=True)
    assert torch.equal(loss, want) and "top1_agreement" in stats


# ------------------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_with_stats(kernel, gen):
    s, t = logits(gen, (6, 40), device=kernel.device), logits(gen, (6, 40), device=kernel.device)

    def step(s, t):
        loss, stats = fastkd.kd_loss(s, t, temperature=2.0, return_stats=True, backend=kernel.backend)
        return loss, stats["top1_agreement"], stats["predictive_kl"]

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(s, t)
    for a, b in zip(got, step(s, t)):
        assert_rel_close(a, b, 1e-6)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(kernel, gen, compile_backend):
    s, t = logits(gen, (6, 40), device=kernel.device), logits(gen, (6, 40), device=kernel.device)
    labels = random_labels(gen, (6,), 40, device=kernel.device)

    def step(s, t, labels):
        return fastkd.kd_loss(s, t, temperature=2.0, labels=labels, ce_weight=0.5, backend=kernel.backend) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    got = compiled(s1, t, labels)
    want = step(s2, t, labels)
    got.backward()
    want.backward()
    assert_rel_close(got, want, 1e-6)
    assert_rel_close(s1.grad, s2.grad, 1e-6)


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------

S = torch.zeros(2, 5)
T = torch.zeros(2, 5)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((S, torch.zeros(2, 6)), {}, ValueError, "number of classes V"),
        ((S, torch.zeros(3, 5)), {}, ValueError, "same shape"),
        ((S.long(), T), {}, TypeError, "student_logits must be float32"),
        ((S, T.int()), {}, TypeError, "teacher_logits must be float32"),
        ((S, "t"), {}, TypeError, "teacher_logits must be a torch.Tensor"),
        ((torch.zeros(()), torch.zeros(())), {}, ValueError, r"shape \(\*, V\)"),
        ((torch.zeros(2, 0), torch.zeros(2, 0)), {}, ValueError, "V >= 1"),
        (
            (
                S,
                T,
            ),
            {"temperature": 0},
            ValueError,
            "temperature must be a finite positive",
        ),
        (
            (
                S,
                T,
            ),
            {"temperature": -1.0},
            ValueError,
            "temperature",
        ),
        (
            (
                S,
                T,
            ),
            {"temperature": math.inf},
            ValueError,
            "temperature",
        ),
        (
            (
                S,
                T,
            ),
            {"temperature": math.nan},
            ValueError,
            "temperature",
        ),
        (
            (
                S,
                T,
            ),
            {"temperature": "4"},
            TypeError,
            "temperature must be a real number",
        ),
        (
            (
                S,
                T,
            ),
            {"temperature": 101.0},
            ValueError,
            "temperature must be at most 100 for torch.float32 math",
        ),
        ((S.bfloat16(), T.bfloat16()), {"temperature": 2e19}, ValueError, "temperature must be at most 100"),
        ((S.double(), T.double()), {"temperature": 2e19}, ValueError, "at most 1e[+]06 for torch.float64 math"),
        (
            (
                S,
                T,
            ),
            {"beta": 1.5},
            ValueError,
            r"beta must lie in \[0, 1\]",
        ),
        (
            (
                S,
                T,
            ),
            {"beta": -0.1},
            ValueError,
            "beta",
        ),
        (
            (
                S,
                T,
            ),
            {"divergence": "kld"},
            ValueError,
            "divergence must be one of",
        ),
        (
            (
                S,
                T,
            ),
            {"reduction": "mean"},
            ValueError,
            "use reduction='batchmean'",
        ),
        (
            (
                S,
                T,
            ),
            {"reduction": "avg"},
            ValueError,
            "reduction must be one of",
        ),
        (
            (
                S,
                T,
            ),
            {"backend": "cuda_please"},
            ValueError,
            "backend must be one of",
        ),
        (
            (
                S,
                T,
            ),
            {"labels": torch.zeros(3, dtype=torch.long)},
            ValueError,
            "labels must have the shape",
        ),
        (
            (
                S,
                T,
            ),
            {"labels": torch.zeros(2)},
            TypeError,
            "labels must be int64 or int32",
        ),
        (
            (
                S,
                T,
            ),
            {"labels": torch.tensor([0, 5])},
            ValueError,
            r"labels must lie in \[0, 5\)",
        ),
        (
            (
                S,
                T,
            ),
            {"labels": torch.tensor([0, -2])},
            ValueError,
            "labels must lie in",
        ),
        (
            (
                S,
                T,
            ),
            {"ce_weight": 1.0},
            ValueError,
            "ce_weight != 0 needs labels",
        ),
        (
            (
                S,
                T,
            ),
            {"ce_weight": math.nan, "labels": torch.tensor([0, 1])},
            ValueError,
            "ce_weight",
        ),
        (
            (
                S,
                T,
            ),
            {"kd_weight": math.inf},
            ValueError,
            "kd_weight",
        ),
        (
            (
                S,
                T,
            ),
            {"normalizer": 0},
            ValueError,
            "normalizer must be a finite positive",
        ),
        (
            (
                S,
                T,
            ),
            {"normalizer": torch.ones(2)},
            ValueError,
            "normalizer must be a number or a 0-d",
        ),
        (
            (
                S,
                T,
            ),
            {"normalizer": torch.tensor(-2.0)},
            ValueError,
            "normalizer must be finite and ≥ 0",
        ),
        (
            (
                S,
                T,
            ),
            {"normalizer": torch.tensor(math.nan)},
            ValueError,
            "normalizer must be finite and ≥ 0",
        ),
        (
            (
                S,
                T,
            ),
            {"normalizer": torch.tensor(math.inf)},
            ValueError,
            "normalizer must be finite and ≥ 0",
        ),
        (
            (
                S,
                T,
            ),
            {"normalizer": torch.tensor(True)},
            ValueError,
            "normalizer must be a number or a 0-d real",
        ),
        (
            (
                S,
                T,
            ),
            {"normalizer": 4, "reduction": "sum"},
            ValueError,
            "normalizer replaces the divisor",
        ),
        (
            (
                S,
                T,
            ),
            {"ignore_index": 1.5},
            TypeError,
            "ignore_index must be an int",
        ),
        (
            (
                S,
                T,
            ),
            {"scale_by_t2": 1},
            TypeError,
            "scale_by_t2 must be a bool",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.kd_loss(*args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="same device"):
        fastkd.kd_loss(S.cuda(), T)
    with pytest.raises(ValueError, match="labels must be on the device"):
        fastkd.kd_loss(S.cuda(), T.cuda(), labels=torch.zeros(2, dtype=torch.long))


def test_device_mismatch_raises_on_meta_tensors():
    with pytest.raises(ValueError, match="same device"):
        fastkd.kd_loss(S.to("meta"), T)


def test_kdloss_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        fastkd.KDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.KDLoss(backend="nope")


def test_dispatch_knows_which_kernel_backends_an_op_has():
    from fastkd.dispatch import select_backend

    x = torch.zeros(2, 3)
    assert select_backend("auto", x, x, op="some_op", kernels=()) == "reference"
    with pytest.raises(RuntimeError, match="some_op has no 'cpu' backend yet"):
        select_backend("cpu", x, x, op="some_op", kernels=())
