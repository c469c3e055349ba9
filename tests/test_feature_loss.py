"""fastkd.feature_loss: the Triton kernels against the reference over kinds, normalisations, layouts, masks and
dtypes; the reference against float64 and gradcheck; OFD margin; FEED; errors."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd import features, reference

from conftest import DEVICE, assert_rel_close, skip_unless_available

BACKENDS = ["triton", "cpu", "reference"]
SUPPORTED = [
    (kind, norm)
    for kind in features.KINDS
    for norm in features.NORMALIZATIONS
    if not (kind == "cosine" and norm in ("channel", "sample"))
]
# (shape, channel_dim, mask shape or None, mask kind): maps with a spatial bool mask, channel-last tokens with a
# float token mask, vectors without a mask, a 5-d map with a per-channel mask (where the kind allows it)
LAYOUTS = [
    ((2, 3, 4, 5), 1, (2, 1, 4, 5), "bool"),
    ((2, 6, 5), -1, (2, 6, 1), "float"),
    ((4, 7), 1, None, None),
    ((2, 3, 2, 2, 3), 1, (3, 1, 1, 1), "float"),
]


def make(shape, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).to(device)


def make_mask(shape, mask_kind, seed=3, device=DEVICE):
    if shape is None:
        return None
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=g)
    mask = values > 0.3 if mask_kind == "bool" else torch.where(values > 0.3, values * 2, 0.0)
    return mask.to(device)


def layout_applies(kind, normalize, layout):
    shape, channel_dim, mask_shape, _ = layout
    if normalize == "channel" and len(shape) == 2:
        return False
    per_channel_mask = mask_shape is not None and len(mask_shape) + 1 == len(shape) and mask_shape[0] > 1
    return not ((kind == "cosine" or normalize == "l2") and per_channel_mask)


def run(student, teacher, backend, teacher_grad=True, **options):
    skip_unless_available(backend)
    if backend == "cpu":  # the C++ kernels take CPU tensors
        student, teacher = student.cpu(), teacher.cpu()
        options = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_(teacher_grad)
    loss = fastkd.feature_loss(s, t, backend=backend, **options)
    loss.backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize(
    "kind, normalize, layout",
    [
        pytest.param(kind, normalize, layout, id=f"{kind}-{normalize}-{len(layout[0])}d-{layout[3]}")
        for kind, normalize in SUPPORTED
        for layout in LAYOUTS
        if layout_applies(kind, normalize, layout)
    ],
)
def test_kernel_matches_reference(kernel, kind, normalize, layout):
    shape, channel_dim, mask_shape, mask_kind = layout
    student, teacher = make(shape, device=kernel.device), make(shape, seed=1, device=kernel.device)
    options = dict(
        kind=kind,
        normalize=normalize,
        channel_dim=channel_dim,
        beta=0.7,
        mask=make_mask(mask_shape, mask_kind, device=kernel.device),
    )
    got = run(student, teacher, kernel.backend, **options)
    want = run(student, teacher, "reference", **options)
    for name, a, b in zip(("loss", "grad student", "grad teacher"), got, want):
        assert_rel_close(a, b, 1e-5, what=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind, normalize", [("mse", "channel"), ("cosine", None), ("smooth_l1", "l2")])
def test_half_precision_inputs_within_1e2(kernel, dtype, kind, normalize):
    student, teacher = make((2, 4, 3, 3), device=kernel.device), make((2, 4, 3, 3), seed=1, device=kernel.device)
    got = run(student.to(dtype), teacher.to(dtype), kernel.backend, kind=kind, normalize=normalize)
    want = run(student, teacher, "reference", kind=kind, normalize=normalize)
    assert got[1].dtype == dtype
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-2)


@pytest.mark.parametrize("kind, normalize", SUPPORTED + [("cosine", "channel"), ("cosine", "sample")])
def test_reference_in_float32_matches_float64(kind, normalize):
    student, teacher = make((2, 3, 4, 4), device="cpu"), make((2, 3, 4, 4), seed=1, device="cpu")
    mask = make_mask((2, 1, 4, 4), "float", device="cpu")
    options = dict(kind=kind, normalize=normalize, mask=mask)
    got = run(student, teacher, "reference", **options)
    want = run(student.double(), teacher.double(), "reference", **{**options, "mask": mask.double()})
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-5)


@pytest.mark.parametrize("kind, normalize", SUPPORTED + [("cosine", "channel")])
def test_reference_gradcheck_in_float64(kind, normalize):
    student = make((2, 3, 2, 3), torch.float64, device="cpu").requires_grad_()
    teacher = make((2, 3, 2, 3), torch.float64, seed=1, device="cpu").requires_grad_()
    mask = make_mask((2, 1, 2, 3), "float", device="cpu").double()

    def loss(s, t):
        return fastkd.feature_loss(s, t, kind=kind, normalize=normalize, mask=mask, beta=0.5, backend="reference")

    assert torch.autograd.gradcheck(loss, (student, teacher))


def test_reference_gradcheck_with_a_margin():
    student = make((2, 3, 2, 2), torch.float64, device="cpu").requires_grad_()
    teacher = make((2, 3, 2, 2), torch.float64, seed=1, device="cpu").requires_grad_()
    margin = torch.tensor([-0.3, 0.1, -1.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda s, t: fastkd.feature_loss(s, t, margin=margin, backend="reference"), (student, teacher)
    )


@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1"])
def test_margin_matches_reference_and_the_ofd_formula(kernel, kind):
    student, teacher = make((2, 3, 4, 4), device=kernel.device), make((2, 3, 4, 4), seed=1, device=kernel.device)
    margin = torch.tensor([-0.5, 0.2, -2.0], device=kernel.device)
    mask = make_mask((2, 1, 4, 4), "bool", device=kernel.device)
    got = run(student, teacher, kernel.backend, kind=kind, margin=margin, mask=mask, beta=0.5)
    want = run(student, teacher, "reference", kind=kind, margin=margin, mask=mask, beta=0.5)
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-5)
    if kind == "mse":  # OFD: Σ (s − t')²·1[(s > t') ∨ (t' > 0)] over the masked count
        target = torch.maximum(teacher, margin.view(1, -1, 1, 1))
        counted = ((student > target) | (target > 0)) & mask
        expected = ((student - target) ** 2 * counted).sum() / mask.expand_as(student).sum()
        assert_rel_close(got[0], expected, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, normalize", [("mse", "channel"), ("cosine", None), ("l1", "sample")])
def test_fully_masked_input_gives_zero_loss_and_zero_gradient(backend, kind, normalize):
    student, teacher = make((2, 3, 4, 4)), make((2, 3, 4, 4), seed=1)
    loss, grad_s, grad_t = run(
        student,
        teacher,
        backend,
        kind=kind,
        normalize=normalize,
        mask=torch.zeros(2, 1, 4, 4, dtype=torch.bool, device=DEVICE),
    )
    assert loss.item() == 0.0
    assert torch.equal(grad_s, torch.zeros_like(grad_s)) and torch.equal(grad_t, torch.zeros_like(grad_t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_out_elements_change_nothing(backend):
    student, teacher = make((2, 3, 4, 4)), make((2, 3, 4, 4), seed=1)
    mask = make_mask((2, 1, 4, 4), "bool")
    base = run(student, teacher, backend, normalize="channel", mask=mask)
    wild = torch.where(mask, student, 1e4)
    moved = run(wild, teacher, backend, normalize="channel", mask=mask)
    assert_rel_close(moved[0], base[0], 1e-5)
    assert torch.equal(moved[1] != 0, base[1] != 0) and not moved[1][~mask.expand_as(student)].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_reduction_and_teacher_without_grad(backend):
    student, teacher = make((3, 4, 5)), make((3, 4, 5), seed=1)
    total, _, grad_t = run(student, teacher, backend, teacher_grad=False, reduction="sum", kind="l1")
    assert grad_t is None
    assert_rel_close(total, (student - teacher).abs().sum(), 1e-5)


def test_mean_without_mask_is_torch_mse_loss():
    student, teacher = make((2, 3, 4, 4)), make((2, 3, 4, 4), seed=1)
    assert_rel_close(fastkd.feature_loss(student, teacher), nn.functional.mse_loss(student, teacher), 1e-5)


def test_cosine_with_channel_standardisation_runs_the_reference():
    student, teacher = make((2, 3, 4, 4)), make((2, 3, 4, 4), seed=1)
    auto = fastkd.feature_loss(student, teacher, kind="cosine", normalize="channel")
    assert_rel_close(
        auto, fastkd.feature_loss(student, teacher, kind="cosine", normalize="channel", backend="reference"), 1e-6
    )
    for backend in ("triton", "cpu"):
        with pytest.raises(RuntimeError, match=f"no '{backend}' backend"):
            fastkd.feature_loss(student, teacher, kind="cosine", normalize="channel", backend=backend)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_feature_loss_compiles_fullgraph(backend):
    skip_unless_available(backend)
    device = DEVICE if backend == "triton" else "cpu"
    student, teacher = make((2, 3, 4, 4), device=device), make((2, 3, 4, 4), seed=1, device=device)
    compiled = torch.compile(
        functools.partial(fastkd.feature_loss, normalize="channel", backend=backend), fullgraph=True
    )
    assert_rel_close(
        compiled(student, teacher),
        fastkd.feature_loss(student, teacher, normalize="channel", backend="reference"),
        1e-5,
    )


def test_ofd_margin_is_the_conditional_mean_of_the_negative_part():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.3, -1.0, 2.0]))  # the last: Φ(−β/|γ|) = Φ(−4) < 1e-3 → −3|γ|
    margin = fastkd.ofd_margin(bn)
    samples = torch.randn(2_000_000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for c in range(2):
        x = bn.bias[c].double() + bn.weight[c].abs().double() * samples
        assert margin[c].item() == pytest.approx(x[x < 0].mean().item(), rel=5e-3)
    assert margin[2].item() == pytest.approx(-1.5)
    with pytest.raises(TypeError, match="affine BatchNorm"):
        fastkd.ofd_margin(nn.BatchNorm2d(3, affine=False))


def test_feed_sums_weighted_losses_of_one_adapter_per_teacher():
    student = make((2, 4, 4, 4), device="cpu")
    teachers = [make((2, 8, 4, 4), seed=1, device="cpu"), make((2, 6, 2, 2), seed=2, device="cpu")]
    feed = fastkd.FEED(student, teachers, weights=[0.7, 0.3])
    expected = sum(
        w * fastkd.feature_loss(a(student), t, normalize="l2") for w, a, t in zip([0.7, 0.3], feed.adapters, teachers)
    )
    loss = feed(student, teachers)
    assert_rel_close(loss, expected, 1e-6)
    loss.backward()
    assert all(p.grad is not None for p in feed.parameters())
    with pytest.raises(ValueError, match="2 adapters"):
        feed(student, teachers[:1])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda s, t: fastkd.feature_loss(s, t[:1]), ValueError, "same shape"),
        (lambda s, t: fastkd.feature_loss(s, t.int()), TypeError, "teacher_feat must be a floating-point"),
        (lambda s, t: fastkd.feature_loss(s, t, mask=torch.ones(5, 1, 1)), ValueError, "does not broadcast"),
        (lambda s, t: fastkd.feature_loss(s, t, mask=torch.ones(1, 2, 3, 4, 4)), ValueError, "enlarge"),
        (lambda s, t: fastkd.feature_loss(s, t, mask=torch.ones(2, 3, 1, 1, dtype=torch.int64)), TypeError, "mask"),
        (lambda s, t: fastkd.feature_loss(s, t, kind="huber"), ValueError, "kind"),
        (lambda s, t: fastkd.feature_loss(s, t, normalize="batch"), ValueError, "normalize"),
        (lambda s, t: fastkd.feature_loss(s, t, reduction="none"), ValueError, "reduction"),
        (lambda s, t: fastkd.feature_loss(s, t, kind="smooth_l1", beta=0.0), ValueError, "beta"),
        (lambda s, t: fastkd.feature_loss(s, t, margin=torch.zeros(4)), ValueError, r"shape \(C,\) = \(3,\)"),
        (lambda s, t: fastkd.feature_loss(s, t, margin=torch.zeros(3), normalize="l2"), ValueError, "normalize=None"),
        (
            lambda s, t: fastkd.feature_loss(s, t, kind="cosine", mask=torch.ones(3, 1, 1)),
            ValueError,
            "constant along the channels",
        ),
        (lambda s, t: fastkd.feature_loss(s, t, channel_dim=0), ValueError, "channel_dim"),
        (lambda s, t: fastkd.feature_loss(s[:, :, 0, 0], t[:, :, 0, 0], normalize="channel"), ValueError, "none"),
    ],
)
def test_bad_arguments_name_what_is_wrong(call, error, message):
    with pytest.raises(error, match=message):
        call(make((2, 3, 4, 4), device="cpu"), make((2, 3, 4, 4), seed=1, device="cpu"))


def test_reference_terms_follow_the_documented_formula():
    student, teacher = make((1, 2, 3), device="cpu"), make((1, 2, 3), seed=1, device="cpu")
    terms, weights = reference.feature_loss_terms(
        student, teacher, torch.ones(1, 2, 3), kind="smooth_l1", beta=1.0, normalize=None, margin=None
    )
    diff = (student - teacher).abs()
    assert_rel_close(terms, torch.where(diff < 1, 0.5 * diff**2, diff - 0.5), 1e-6)
    assert torch.equal(weights, torch.ones(1, 2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind, normalize", [("mse", None), ("mse", "channel"), ("l1", "sample"), ("mse", "l2"), ("cosine", None)]
)
def test_nan_and_inf_in_masked_out_elements_reach_neither_loss_nor_gradient(backend, kind, normalize):
    student, teacher = make((2, 3, 4, 4)), make((2, 3, 4, 4), seed=1)
    student[0, :, 0, 0] = float("nan")
    teacher[0, :, 0, 0] = float("inf")
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool, device=DEVICE)
    mask[0, :, 0, 0] = False
    loss, grad_s, grad_t = run(student, teacher, backend, kind=kind, normalize=normalize, mask=mask)
    clean = run(
        torch.where(mask, student, 0), torch.where(mask, teacher, 0), backend, kind=kind, normalize=normalize, mask=mask
    )
    assert torch.isfinite(loss) and torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    for a, b in zip((loss, grad_s, grad_t), clean):
        assert_rel_close(a, b, 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_contiguous_margin_is_read_by_its_strides(backend):
    student, teacher = make((2, 4, 3, 3)), make((2, 4, 3, 3), seed=1)
    margin = torch.randn(8, generator=torch.Generator().manual_seed(2)).to(DEVICE)[::2]
    got = run(student, teacher, backend, margin=margin)
    want = run(student, teacher, "reference", margin=margin.contiguous())
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("normalize", [None, "channel", "l2"])
def test_cpu_kernel_gives_the_same_bits_for_any_thread_count(threads, normalize):
    skip_unless_available("cpu")
    student, teacher = make((3, 5, 4, 6), device="cpu"), make((3, 5, 4, 6), seed=1, device="cpu")
    mask = make_mask((3, 1, 4, 6), "float", device="cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = run(student, teacher, "cpu", normalize=normalize, mask=mask)
        torch.set_num_threads(threads)
        got = run(student, teacher, "cpu", normalize=normalize, mask=mask)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_float64_mask_does_not_change_the_loss_dtype():
    student, teacher = make((2, 3, 4, 4), device="cpu"), make((2, 3, 4, 4), seed=1, device="cpu")
    loss = fastkd.feature_loss(student, teacher, mask=torch.ones(2, 1, 4, 4, dtype=torch.float64), backend="reference")
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("normalize, shape", [("sample", (1, 3, 4_000_000)), ("channel", (1, 1, 4_000_000))])
def test_cpu_statistics_stay_accurate_over_large_groups(normalize, shape):
    skip_unless_available("cpu")
    g = torch.Generator().manual_seed(0)
    student = torch.randn(shape, generator=g) + 3
    teacher = 2 * torch.randn(shape, generator=g) + 1
    got = run(student, teacher, "cpu", normalize=normalize)
    want = run(student.double(), teacher.double(), "reference", normalize=normalize)
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_features_give_zero(backend):
    student = torch.zeros(0, 3, 4, 4, device=DEVICE, requires_grad=True)
    loss = fastkd.feature_loss(student, torch.zeros(0, 3, 4, 4, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and student.grad.shape == student.shape


@pytest.mark.parametrize("backend", ["auto", "triton", "cpu"])
@pytest.mark.parametrize("which", ["mask", "margin"])
def test_a_mask_or_margin_that_requires_grad_gets_its_gradient(backend, which):
    """The kernels differentiate the features only: a float mask or a margin that requires grad runs the reference
    under "auto" (its gradient equals the reference's) and is an error with a kernel backend named."""
    if backend != "auto":
        skip_unless_available(backend)
    device = torch.device("cpu") if backend == "cpu" else DEVICE
    student, teacher = make((2, 4, 3, 3), device=device), make((2, 4, 3, 3), seed=1, device=device)
    extra = (
        make_mask((2, 1, 3, 3), "float", device=device)
        if which == "mask"
        else torch.randn(4, generator=torch.Generator().manual_seed(2)).to(device)
    )
    grads = []
    for chosen in (backend, "reference"):
        leaf = extra.clone().requires_grad_(True)
        if chosen != "auto" and chosen != "reference":
            with pytest.raises(RuntimeError, match=f"no gradient to {which}"):
                fastkd.feature_loss(student, teacher, backend=chosen, **{which: leaf})
            return
        fastkd.feature_loss(student, teacher, backend=chosen, **{which: leaf}).backward()
        grads.append(leaf.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert_rel_close(grads[0], grads[1], 1e-6)


def standardised(x, dim):
    return (x - x.mean(dim, keepdim=True)) / (x.var(dim, unbiased=False, keepdim=True) + 1e-5).sqrt()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, normalize", [("mse", "channel"), ("mse", "l2"), ("cosine", None)])
def test_channel_last_tokens_follow_the_formula_along_the_last_dim(backend, kind, normalize):
    """(N, L, C) tokens with L ≠ C and channel_dim=-1: the statistics and norms run along the dims the formula
    names (a backend that ignored channel_dim would standardise or normalise along the wrong one)."""
    s, t = make((2, 6, 5)), make((2, 6, 5), seed=1)
    loss = run(s, t, backend, kind=kind, normalize=normalize, channel_dim=-1)[0]
    s64, t64 = s.double().cpu(), t.double().cpu()
    if normalize == "channel":  # each (sample, channel) standardised over the tokens
        expected = (standardised(s64, 1) - standardised(t64, 1)).pow(2).mean()
    elif normalize == "l2":  # each token's channel vector to unit length
        expected = (F.normalize(s64, dim=-1) - F.normalize(t64, dim=-1)).pow(2).mean()
    else:
        expected = (1 - F.cosine_similarity(s64, t64, dim=-1)).mean()
    assert_rel_close(loss, expected, 1e-5)


def test_ofd_margin_switches_to_minus_three_gamma_below_a_negative_mass_of_1e3():
    bn = nn.BatchNorm2d(2)
    with torch.no_grad():  # Φ(−β/|γ|) = Φ(−2.9) ≈ 1.9e-3 (the formula) and Φ(−3.2) ≈ 6.9e-4 (−3|γ|)
        bn.weight.fill_(1.0)
        bn.bias.copy_(torch.tensor([2.9, 3.2]))
    margin = fastkd.ofd_margin(bn).double()
    normal = torch.distributions.Normal(0.0, 1.0)
    z = torch.tensor(2.9, dtype=torch.float64)
    assert margin[0].item() == pytest.approx((z - normal.log_prob(z).exp() / normal.cdf(-z)).item(), rel=1e-6)
    assert margin[1].item() == -3.0


# plain features on the C++ backend (contiguous, no mask, normalisation or margin, an element-wise kind): one call
# returns the loss and its gradients (features._FeatureLossFlat)

PLAIN_SHAPES = [(4, 7), (2, 3, 4, 5), (3, 5, 41, 37)]  # the last spans two blocks of the flat pass and a remainder


@pytest.fixture
def flat_calls(monkeypatch):
    """The calls of the C++ flat pass, counted."""
    skip_unless_available("cpu")
    calls = []
    flat = features.cpu_backend.feature_loss_flat

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return flat(*args, **kwargs)

    monkeypatch.setattr(features.cpu_backend, "feature_loss_flat", counted)
    return calls


@pytest.mark.parametrize("shape", PLAIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["mse", "l1", "smooth_l1"])
def test_plain_features_take_one_cpu_call_matching_the_reference(flat_calls, kind, reduction, shape):
    student, teacher = make(shape, device="cpu"), make(shape, seed=1, device="cpu")
    options = dict(kind=kind, reduction=reduction, beta=0.7)
    got = run(student, teacher, "cpu", **options)
    assert len(flat_calls) == 1 and flat_calls[0]["grad"] and flat_calls[0]["teacher_grad"]
    want = run(student.double(), teacher.double(), "reference", **options)
    for name, a, b in zip(("loss", "grad student", "grad teacher"), got, want):
        assert a.dtype == torch.float32
        assert_rel_close(a, b, 1e-5, what=name)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.bfloat16, torch.float32)])
def test_plain_half_precision_features_within_1e2(flat_calls, dtypes):
    student, teacher = make((2, 3, 5, 7), device="cpu"), make((2, 3, 5, 7), seed=1, device="cpu")
    got = run(student.to(dtypes[0]), teacher.to(dtypes[1]), "cpu", kind="smooth_l1")
    assert flat_calls and got[1].dtype == dtypes[0] and got[2].dtype == dtypes[1]
    want = run(student.to(dtypes[0]).double(), teacher.to(dtypes[1]).double(), "reference", kind="smooth_l1")
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-2)


def test_plain_features_one_side_wanting_a_gradient(flat_calls):
    student, teacher = make((3, 4, 5), device="cpu"), make((3, 4, 5), seed=1, device="cpu").requires_grad_()
    fastkd.feature_loss(student, teacher, kind="l1", backend="cpu").backward()
    assert flat_calls[-1]["grad"] is False and flat_calls[-1]["teacher_grad"] is True
    assert_rel_close(teacher.grad, -torch.sign(student - teacher.detach()) / student.numel(), 1e-6)
    with torch.no_grad():
        fastkd.feature_loss(student, teacher, backend="cpu")
    assert flat_calls[-1]["grad"] is False and flat_calls[-1]["teacher_grad"] is False


def test_plain_features_loss_has_the_same_bits_with_or_without_a_gradient(flat_calls):
    student, teacher = make((2, 3, 8, 8), device="cpu"), make((2, 3, 8, 8), seed=1, device="cpu")
    with torch.no_grad():
        without = fastkd.feature_loss(student, teacher, backend="cpu")
    assert torch.equal(fastkd.feature_loss(student.requires_grad_(), teacher, backend="cpu"), without)


def test_plain_features_backward_scales_by_the_incoming_gradient_and_runs_twice(flat_calls):
    student = make((2, 3, 4, 4), device="cpu").requires_grad_()
    teacher = make((2, 3, 4, 4), seed=1, device="cpu")
    expected = 2 * (student.detach() - teacher) / student.numel()
    loss = fastkd.feature_loss(student, teacher, backend="cpu")
    (3 * loss).backward(retain_graph=True)
    assert_rel_close(student.grad, 3 * expected, 1e-6)
    loss.backward()  # a second backward through the retained graph: the kernel runs again
    assert_rel_close(student.grad, 4 * expected, 1e-6)
    assert len(flat_calls) == 2


def test_plain_features_nan_reaches_the_loss_and_its_gradient(flat_calls):
    student = make((2, 3, 4), device="cpu")
    student[1, 2, 3] = float("nan")
    _, grad_s, grad_t = run(student, make((2, 3, 4), seed=1, device="cpu"), "cpu")
    loss = fastkd.feature_loss(student, make((2, 3, 4), seed=1, device="cpu"), backend="cpu")
    assert loss.isnan() and grad_s[1, 2, 3].isnan() and grad_t[1, 2, 3].isnan()
    assert grad_s[0].isfinite().all()


def test_non_contiguous_plain_features_take_the_group_kernels(flat_calls):
    student, teacher = make((2, 5, 4, 3), device="cpu"), make((2, 5, 4, 3), seed=1, device="cpu")
    strided = run(student.transpose(1, 3), teacher.transpose(1, 3), "cpu", kind="smooth_l1")
    assert not flat_calls
    flat = run(student.transpose(1, 3).contiguous(), teacher.transpose(1, 3).contiguous(), "cpu", kind="smooth_l1")
    assert len(flat_calls) == 1
    for a, b in zip(strided, flat):
        assert_rel_close(a, b, 1e-6)


@pytest.mark.parametrize("threads", [2, 3])
def test_plain_features_give_the_same_bits_for_any_thread_count(flat_calls, threads):
    # 4·8·64·64 elements: eight blocks of the flat pass, enough work for four threads
    student, teacher = make((4, 8, 64, 64), device="cpu"), make((4, 8, 64, 64), seed=1, device="cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = run(student, teacher, "cpu")
        torch.set_num_threads(threads)
        got = run(student, teacher, "cpu")
    finally:
        torch.set_num_threads(before)
    assert flat_calls and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_plain_features_compile_fullgraph_to_the_same_bits(flat_calls):
    student, teacher = make((2, 3, 4, 4), device="cpu"), make((2, 3, 4, 4), seed=1, device="cpu")
    loss = functools.partial(fastkd.feature_loss, kind="smooth_l1", backend="cpu")
    compiled = torch.compile(loss, fullgraph=True)
    s_eager, s_compiled = student.clone().requires_grad_(), student.clone().requires_grad_()
    eager_loss, compiled_loss = loss(s_eager, teacher), compiled(s_compiled, teacher)
    (2 * eager_loss).backward()
    (2 * compiled_loss).backward()
    assert torch.equal(eager_loss, compiled_loss) and torch.equal(s_eager.grad, s_compiled.grad)
