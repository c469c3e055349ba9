"""Property-based tests (hypothesis) of kd_loss (one teacher, ensembles, TopK teachers), dkd_loss, feature_loss and
spectral_norms on every backend, values and gradients, against the float64 truths of tests/float64_truth.py.

Each example draws a seed; its tensors come from a torch.Generator seeded with it, so a failure shrinks to small
options and replays from the printed example. The truth takes the very inputs the library received (float16 and
bfloat16 rounding included), cast to float64. Tolerance (:func:`compare`): relative error ≤ 1e-5 for float32
inputs and ≤ 1e-2 where an input is float16 or bfloat16, plus an absolute floor where float32 itself cannot do
better (8× the error of the same textbook formulas evaluated in float32). Every tensor argument is also passed as a
strided or broadcast view; padding around a view holds NaN, so reading outside the view shows.
"""

import math
from typing import Callable, NamedTuple

import pytest
import torch
from hypothesis import Phase, assume, example, given, settings
from hypothesis import strategies as st

import fastkd

import float64_truth as truth
from conftest import assert_rel_close, backend_device, skip_unless_available

BACKENDS = ("triton", "cpu", "reference")
TOPK_BACKENDS = ("triton", "reference")  # a TopK teacher has no C++ kernels: CPU tensors run the reference
DIVERGENCES = fastkd.kd.DIVERGENCES  # every divergence kd_loss offers
LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT32_EPS = torch.finfo(torch.float32).eps
IGNORE = -100

SEEDS = st.integers(0, 2**32 - 1)
FLOAT_DTYPES = st.sampled_from((torch.float32, torch.bfloat16, torch.float16))
# extreme but sane temperatures (T > 8 loses float32 accuracy: a documented limit); for powers of two x/T is exact
# in float32, and the comparison as tight as at T = 1 (see kd_unit)
TEMPERATURES = st.one_of(st.sampled_from((0.05, 0.0625, 1.0, 2.0, 8.0)), st.floats(0.05, 8.0))
EXACT_TEMPERATURES = st.sampled_from((0.0625, 0.25, 1.0, 2.0, 8.0))
BETAS = st.sampled_from((0.0, 1e-7, 0.5, 1 - 1e-7, 1.0))
ROW_SHAPES = st.one_of(st.tuples(st.integers(1, 6)), st.tuples(st.integers(1, 2), st.integers(1, 3)))
NUM_CLASSES = st.one_of(st.integers(2, 40), st.integers(500, 1100))  # one block, or several of 512
LAYOUTS = st.sampled_from(("contiguous", "offset", "sliced", "transposed", "expanded"))
LABEL_LAYOUTS = st.sampled_from(("contiguous", "column", "expanded", "transposed"))
REDUCTIONS = st.sampled_from(("batchmean", "sum", "none"))
UPSTREAM = st.sampled_from((1.0, 0.37))


def examples(n: int):
    """Settings of a property: ``n`` examples, no deadline (the Triton interpreter is slow and uneven), and no
    "explain" phase (on the interpreter it takes minutes to say which drawn values did not matter)."""
    return settings(max_examples=n, deadline=None, phases=tuple(p for p in Phase if p != Phase.explain))


# ----------------------------------------------------------------------------------------------------------------
# inputs: values, layouts, labels
# ----------------------------------------------------------------------------------------------------------------


def normal(gen: torch.Generator, shape, scale: float = 3.0) -> torch.Tensor:
    """N(0, scale²) float64 values drawn from ``gen``."""
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


class Arg(NamedTuple):
    """An argument of the call under test: a base tensor (a leaf when ``grad``) and the view of it that is passed."""

    base: torch.Tensor
    view: Callable = lambda b: b
    grad: bool = False


def laid_out(x: torch.Tensor, layout: str, dtype: torch.dtype, grad: bool = False) -> Arg:
    """``x`` (float64 values) as an argument of ``dtype`` passed through a view laid out as ``layout``:
    "contiguous"; "offset" (a storage offset and padded rows); "sliced" (every other element of a last dim twice
    as wide); "transposed" (all dims reversed in memory); "expanded" (x's first slice along dim 0 broadcast with
    stride 0, so its values replace x's). Padding holds NaN (−1 for an integer dtype)."""
    shape = tuple(x.shape)
    if layout == "contiguous":
        return Arg(x.to(dtype), grad=grad)
    if layout == "expanded":
        return Arg(x[:1].to(dtype), lambda b: b.expand(shape), grad)
    if layout == "transposed":
        dims = tuple(reversed(range(x.dim())))
        return Arg(x.permute(dims).contiguous().to(dtype), lambda b: b.permute(dims), grad)
    if layout == "offset":
        base = torch.full((shape[0] + 1,) + shape[1:-1] + (shape[-1] + 3,), math.nan, dtype=torch.float64)
        index = (slice(1, None),) + (slice(None),) * (x.dim() - 2) + (slice(0, shape[-1]),)
    elif layout == "sliced":
        base = torch.full(shape[:-1] + (2 * shape[-1],), math.nan, dtype=torch.float64)
        index = (Ellipsis, slice(1, None, 2))
    else:
        raise ValueError(layout)
    base[index] = x
    if not dtype.is_floating_point:
        base = base.nan_to_num(-1.0)
    return Arg(base.to(dtype), lambda b: b[index], grad)


def labels_laid_out(
    labels: torch.Tensor, layout: str, gen: torch.Generator, num_classes: int, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Integer ``labels`` as a view laid out as ``layout``: "contiguous"; "column" (column 0 of a (*, 2) tensor whose
    column 1 holds other labels and ignore_index, like ``torch.tensor([[1, -100], [5, -100], [-100, 3]])[:, 0]``);
    "expanded" (the first label broadcast to every row, stride 0); "transposed" (dims reversed in memory)."""
    if layout == "contiguous":
        return labels.to(dtype)
    if layout == "column":
        other = torch.randint(0, num_classes, labels.shape, generator=gen)
        other[torch.rand(labels.shape, generator=gen) < 0.5] = IGNORE
        return torch.stack([labels, other], dim=-1).to(dtype)[..., 0]
    if layout == "expanded":
        return labels.reshape(-1)[0].to(dtype).expand(labels.shape)
    dims = tuple(reversed(range(labels.dim())))
    return labels.permute(dims).contiguous().to(dtype).permute(dims)


def random_labels(gen: torch.Generator, shape, num_classes: int, ignored: float, allowed=None) -> torch.Tensor:
    """Labels in [0, V) (in ``allowed``, a bool (V,) mask, if given), each ignore_index with probability ``ignored``."""
    choices = torch.arange(num_classes) if allowed is None else allowed.nonzero().flatten()
    labels = choices[torch.randint(0, len(choices), shape, generator=gen)]
    return torch.where(torch.rand(shape, generator=gen) < ignored, IGNORE, labels)


# ----------------------------------------------------------------------------------------------------------------
# evaluation and comparison
# ----------------------------------------------------------------------------------------------------------------


def evaluate(fn: Callable, args: list, upstream: torch.Tensor, dtype=None):
    """``fn(*views)`` and the gradients of Σ upstream·fn w.r.t. the bases that take one (zeros where none arrives),
    on the arguments as given or with their floating-point bases cast to ``dtype``."""
    leaves = []
    for arg in args:
        base = arg.base.detach()
        if dtype is not None and base.is_floating_point():
            base = base.to(dtype)
        leaves.append(base.clone().requires_grad_(arg.grad))
    out = fn(*[arg.view(leaf) for arg, leaf in zip(args, leaves)])
    wanted = [leaf for arg, leaf in zip(args, leaves) if arg.grad]
    grads = [None] * len(wanted)
    if wanted and out.requires_grad:
        grads = torch.autograd.grad((out * upstream.to(out.dtype)).sum(), wanted, allow_unused=True)
    return out.detach(), [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(wanted, grads)]


def tolerance(*tensors) -> float:
    """1e-2 when any floating-point input is float16/bfloat16, else 1e-5."""
    return 1e-2 if any(t is not None and t.dtype in LOW_PRECISION for t in tensors) else 1e-5


def plain_float32_error(plain: torch.Tensor, exact: torch.Tensor) -> float:
    """‖plain − exact‖ over the entries where both are finite."""
    plain, exact = plain.double().cpu(), exact.double().cpu()
    finite = plain.isfinite() & exact.isfinite()
    return (plain[finite] - exact[finite]).norm().item()


def storage_quantum(expected: torch.Tensor, dtype: torch.dtype) -> float:
    """‖one unit in the last place of ``dtype`` at each entry‖ for float16/bfloat16 outputs (0 for others): an
    output stored in that dtype is the exact value rounded there, off by up to that much (half of it for the
    exactly rounded value, a whole one when the float32 math lands across a rounding midpoint)."""
    if dtype not in LOW_PRECISION:
        return 0.0
    info = torch.finfo(dtype)
    magnitude = expected.detach().double().cpu().abs()
    quantum = torch.maximum(magnitude * info.eps, torch.tensor(info.smallest_normal * info.eps, dtype=torch.float64))
    return quantum[magnitude.isfinite()].norm().item()


def compare(
    lib: Callable, want: Callable, args: list, upstream: torch.Tensor, rtol: float, *, unit=(1.0, 1.0), names=()
):
    """The library's value and gradients against the float64 truth's, within ``rtol`` plus an absolute floor: 8×
    the error of the same truth evaluated in float32 on the same inputs (what float32 cannot resolve: rows whose
    terms cancel, 1 − cos near 0, x/T of huge logits, features that normalise to nearly the same values), 8
    float32 ulps of ``unit`` (the natural scales of value and gradients, for outputs that are exactly 0), and one
    ulp of a float16/bfloat16 output's own dtype per entry (:func:`storage_quantum`: the rounding of the store)."""
    got, got_grads = evaluate(lib, args, upstream)
    exact, exact_grads = evaluate(want, args, upstream, torch.float64)
    plain, plain_grads = evaluate(want, args, upstream, torch.float32)
    grad_names = names or [f"argument {i}" for i, arg in enumerate(args) if arg.grad]
    checks = [("value", got, exact, plain, unit[0])]
    checks += [
        (f"gradient of {name}", g, e, p, unit[1])
        for name, g, e, p in zip(grad_names, got_grads, exact_grads, plain_grads)
    ]
    for what, actual, expected, float32_result, scale in checks:
        floor = 8 * plain_float32_error(float32_result, expected) + 8 * FLOAT32_EPS * scale
        floor += storage_quantum(expected, actual.dtype)
        assert_rel_close(actual, expected, rtol, atol=floor, what=what)
    return got, got_grads


def upstream_for(gen: torch.Generator, reduction: str, row_shape, scale: float) -> torch.Tensor:
    """The gradient fed to the output: a random (row-shaped) one for "none", else ``scale``."""
    if reduction == "none":
        return torch.rand(row_shape, generator=gen, dtype=torch.float64) + 0.5
    return torch.tensor(scale, dtype=torch.float64)


def divisor_of(reduction: str, labels=None, rows: int = 1, normalizer=None) -> float:
    """What "batchmean" divides by (the normalizer, 0 counting as 1, or the counted rows, at least 1); else 1."""
    if reduction != "batchmean":
        return 1.0
    if normalizer is not None:
        return float(normalizer) or 1.0
    return float(max(rows if labels is None else int((labels != IGNORE).sum()), 1))


def kd_unit(
    logits,
    *,
    kd_scale: float,
    ce_weight: float,
    temperature: float,
    rows: int,
    divisor: float,
    upstream: torch.Tensor,
    peaked: bool = False,
):
    """The natural scales of a kd-family loss and of its gradient, for the floor of :func:`compare`. Per row: the
    largest probability p_max at T among ``logits`` (float32 rounds each probability to ε of it; 1 if ``peaked``,
    as DKD's binary distributions are) times kd_scale (the gradient's: kd_scale/T), times 1 + max|x|/T unless T is
    a power of two (the rounding of x/T in float32 moves log p by ε·|x|/T), plus |ce_weight|; over ``divisor``."""
    flat = [x.double().reshape(-1, x.shape[-1]) for x in logits]
    peaks = rows
    if not peaked:
        peaks = rows * max(truth.log_softmax(x, temperature).exp().amax(-1).nan_to_num(0.0).mean().item() for x in flat)
    rounding = 0.0
    if not math.log2(temperature).is_integer():
        rounding = max(x[x.isfinite()].abs().max().item() if x.isfinite().any() else 0.0 for x in flat) / temperature
    kd_part = kd_scale * peaks * (1 + rounding)
    up = float(upstream.abs().max())
    return ((kd_part + abs(ce_weight) * rows) / divisor, (kd_part / temperature + abs(ce_weight) * rows) / divisor * up)


def logical(args: list) -> list:
    """The float64 values of the floating-point arguments as passed (their views)."""
    return [a.view(a.base.double()) for a in args if a.base.is_floating_point()]


def backend_args(backend: str, args: list) -> list:
    """The arguments on the backend's device."""
    device = backend_device(backend)
    return [Arg(a.base.to(device), a.view, a.grad) for a in args]


# ----------------------------------------------------------------------------------------------------------------
# kd_loss with one teacher
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@examples(20)
@given(
    seed=SEEDS,
    row_shape=ROW_SHAPES,
    num_classes=st.one_of(st.just(1), NUM_CLASSES),
    temperature=TEMPERATURES,
    divergence=st.sampled_from(DIVERGENCES),
    beta=BETAS,
    reduction=REDUCTIONS,
    kd_weight=st.sampled_from((1.0, 0.4, 3.0)),
    scale_by_t2=st.booleans(),
    dtypes=st.tuples(FLOAT_DTYPES, FLOAT_DTYPES),
    layouts=st.tuples(LAYOUTS, LAYOUTS),
    teacher_grad=st.booleans(),
    upstream_scale=UPSTREAM,
)
def test_kd_loss_matches_float64_truth(
    backend,
    seed,
    row_shape,
    num_classes,
    temperature,
    divergence,
    beta,
    reduction,
    kd_weight,
    scale_by_t2,
    dtypes,
    layouts,
    teacher_grad,
    upstream_scale,
):
    """kd_loss (every divergence, T, β including 0 and 1, reduction, kd_weight, T² or not, student and teacher of
    any two dtypes and layouts, 2-D or 3-D logits) equals the float64 truth, and so do the gradients of student
    and (when it requires grad) teacher, also for an upstream gradient other than 1."""
    skip_unless_available(backend)
    gen = torch.Generator().manual_seed(seed)
    shape = row_shape + (num_classes,)
    args = [
        laid_out(normal(gen, shape), layouts[0], dtypes[0], grad=True),
        laid_out(normal(gen, shape), layouts[1], dtypes[1], grad=teacher_grad),
    ]
    upstream = upstream_for(gen, reduction, row_shape, upstream_scale)
    options = dict(
        temperature=temperature, beta=beta, reduction=reduction, kd_weight=kd_weight, scale_by_t2=scale_by_t2
    )
    unit = kd_unit(
        logical(args),
        kd_scale=kd_weight * (temperature**2 if scale_by_t2 else 1),
        ce_weight=0.0,
        temperature=temperature,
        rows=math.prod(row_shape),
        divisor=divisor_of(reduction, rows=math.prod(row_shape)),
        upstream=upstream,
    )
    compare(
        lambda s, t: fastkd.kd_loss(s, t, divergence=divergence, backend=backend, **options),
        lambda s, t: truth.kd_loss(s, t, divergence_kind=divergence, **options),
        backend_args(backend, args),
        upstream,
        tolerance(*(a.base for a in args)),
        unit=unit,
        names=("student", "teacher"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@examples(16)
@given(
    seed=SEEDS,
    row_shape=ROW_SHAPES,
    num_classes=NUM_CLASSES,
    temperature=TEMPERATURES,
    divergence=st.sampled_from(DIVERGENCES),
    ce_weight=st.sampled_from((0.0, 0.3, 1.0)),
    kd_weight=st.sampled_from((1.0, 0.0, 0.7)),
    ignored=st.sampled_from((0.0, 0.4)),
    label_layout=LABEL_LAYOUTS,
    label_dtype=st.sampled_from((torch.int64, torch.int32)),
    reduction=REDUCTIONS,
    normalizer=st.sampled_from((None, 3.0, 0.5)),
    upstream_scale=UPSTREAM,
)
def test_kd_loss_with_labels_in_any_layout(
    backend,
    seed,
    row_shape,
    num_classes,
    temperature,
    divergence,
    ce_weight,
    kd_weight,
    ignored,
    label_layout,
    label_dtype,
    reduction,
    normalizer,
    upstream_scale,
):
    """With labels (int64 or int32; contiguous, a strided column of a wider tensor, one label expanded to every row,
    or transposed): the CE term at T = 1 and the ignored rows (loss 0, zero gradient, not counted by "batchmean",
    or divided by a number ``normalizer``) agree with the float64 truth."""
    skip_unless_available(backend)
    assume(normalizer is None or reduction == "batchmean")
    gen = torch.Generator().manual_seed(seed)
    shape = row_shape + (num_classes,)
    args = [
        laid_out(normal(gen, shape), "contiguous", torch.float32, grad=True),
        laid_out(normal(gen, shape), "contiguous", torch.float32, grad=True),
    ]
    labels = labels_laid_out(
        random_labels(gen, row_shape, num_classes, ignored), label_layout, gen, num_classes, label_dtype
    )
    upstream = upstream_for(gen, reduction, row_shape, upstream_scale)
    options = dict(
        temperature=temperature, reduction=reduction, ce_weight=ce_weight, kd_weight=kd_weight, normalizer=normalizer
    )
    unit = kd_unit(
        logical(args),
        kd_scale=kd_weight * temperature**2,
        ce_weight=ce_weight,
        temperature=temperature,
        rows=math.prod(row_shape),
        divisor=divisor_of(reduction, labels, normalizer=normalizer),
        upstream=upstream,
    )
    device = backend_device(backend)
    compare(
        lambda s, t: fastkd.kd_loss(s, t, labels=labels.to(device), divergence=divergence, backend=backend, **options),
        lambda s, t: truth.kd_loss(s, t, labels=labels, divergence_kind=divergence, **options),
        backend_args(backend, args),
        upstream,
        1e-5,
        unit=unit,
        names=("student", "teacher"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@examples(16)
@given(
    seed=SEEDS,
    rows=st.integers(1, 6),
    num_classes=NUM_CLASSES,
    temperature=EXACT_TEMPERATURES,
    divergence=st.sampled_from(DIVERGENCES),
    beta=BETAS,
    masked=st.sampled_from((0.0, 0.3, 0.9)),
    huge=st.sampled_from((0.0, 0.3, 1.0)),
    weights=st.sampled_from(((1.0, 0.0), (1.0, 0.5), (0.0, 1.0))),
    dtype=st.sampled_from((torch.float32, torch.float16)),
    teacher_grad=st.booleans(),
)
@example(  # found in CI: a float16 teacher gradient of 2.3e-8 per entry, below half of float16's least subnormal
    seed=0,
    rows=1,
    num_classes=15,
    temperature=0.0625,
    divergence="jsd",
    beta=1e-07,
    masked=0.0,
    huge=1.0,
    weights=(1.0, 0.0),
    dtype=torch.float16,
    teacher_grad=True,
)
def test_kd_loss_of_masked_and_huge_logits(
    backend, seed, rows, num_classes, temperature, divergence, beta, masked, huge, weights, dtype, teacher_grad
):
    """Masked vocabulary (−inf logits in the same columns of student and teacher, labels in the others) and logits
    offset by ±1e4 (each entry with probability ``huge``), with KD, CE or both: loss and gradients are finite and
    agree with the float64 truth as closely as for small logits. T is a power of two, so x/T is exact in float32
    (for other T, log p moves by ε·|x|/T ≈ 1e-3/T in any float32 evaluation, see kd_unit)."""
    skip_unless_available(backend)
    kd_weight, ce_weight = weights
    gen = torch.Generator().manual_seed(seed)
    column_masked = torch.rand(num_classes, generator=gen) < masked
    column_masked[torch.randint(0, num_classes, (), generator=gen)] = False  # at least one class is left

    def logits():
        offset = torch.where(torch.rand(rows, num_classes, generator=gen) < huge, 1e4, 0.0)
        offset = torch.where(torch.rand(rows, num_classes, generator=gen) < 0.5, offset, -offset)
        return (normal(gen, (rows, num_classes)) + offset).masked_fill(column_masked, -math.inf)

    args = [
        laid_out(logits(), "contiguous", dtype, grad=True),
        laid_out(logits(), "contiguous", dtype, grad=teacher_grad),
    ]
    labels = random_labels(gen, (rows,), num_classes, 0.2, allowed=~column_masked)
    upstream = torch.tensor(1.0, dtype=torch.float64)
    options = dict(temperature=temperature, beta=beta, kd_weight=kd_weight, ce_weight=ce_weight, reduction="sum")
    unit = kd_unit(
        logical(args),
        kd_scale=kd_weight * temperature**2,
        ce_weight=ce_weight,
        temperature=temperature,
        rows=rows,
        divisor=1.0,
        upstream=upstream,
    )
    compare(
        lambda s, t: fastkd.kd_loss(s, t, labels=labels, divergence=divergence, backend=backend, **options),
        lambda s, t: truth.kd_loss(s, t, labels=labels, divergence_kind=divergence, **options),
        backend_args(backend, args),
        upstream,
        tolerance(args[0].base),
        unit=unit,
        names=("student", "teacher"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@examples(12)
@given(
    seed=SEEDS,
    op=st.sampled_from(("kd", "ensemble", "topk", "dkd")),
    rows=st.integers(1, 6),
    num_classes=st.integers(2, 40),
    temperature=TEMPERATURES,
    divergence=st.sampled_from(DIVERGENCES),
    neg_inf_rows=st.sampled_from((0.0, 0.5, 1.0)),
    ce_weight=st.sampled_from((0.0, 1.0)),
    label_layout=LABEL_LAYOUTS,
    reduction=REDUCTIONS,
    normalizer=st.sampled_from((None, 2.0, "a zero tensor")),
)
def test_an_all_ignored_batch_gives_exactly_zero(
    backend,
    seed,
    op,
    rows,
    num_classes,
    temperature,
    divergence,
    neg_inf_rows,
    ce_weight,
    label_layout,
    reduction,
    normalizer,
):
    """A batch whose labels are all ignore_index (any layout; some rows all −inf) gives a loss of exactly 0 for
    every reduction, connected to the graph, and gradients exactly 0, no NaN: kd_loss with one teacher, with an
    ensemble of two, with a TopK teacher, and dkd_loss."""
    skip_unless_available(backend)
    assume(normalizer is None or reduction == "batchmean")
    gen = torch.Generator().manual_seed(seed)
    device = backend_device(backend)
    neg_inf = (torch.rand(rows, 1, generator=gen) < neg_inf_rows).expand(rows, num_classes)

    def logits(*lead):
        return normal(gen, lead + (rows, num_classes)).masked_fill(neg_inf, -math.inf).float().to(device)

    s = logits().requires_grad_()
    t = logits(2).requires_grad_() if op == "ensemble" else logits().requires_grad_(op == "kd")
    labels = labels_laid_out(torch.full((rows,), IGNORE), label_layout, gen, num_classes).to(device)
    if normalizer == "a zero tensor":
        normalizer = torch.zeros((), device=device)
    options = dict(
        temperature=temperature, ce_weight=ce_weight, reduction=reduction, normalizer=normalizer, backend=backend
    )
    if op == "dkd":
        loss = fastkd.dkd_loss(s, t, labels, **options)
    else:
        teacher = fastkd.topk_teacher(t.detach().nan_to_num(neginf=-1e4), min(3, num_classes)) if op == "topk" else t
        loss = fastkd.kd_loss(s, teacher, labels=labels, divergence="kl" if op == "topk" else divergence, **options)
    assert torch.equal(loss.detach().cpu(), torch.zeros(() if reduction != "none" else (rows,)))
    loss.sum().backward()
    for name, x in (("student", s), ("teacher", t)):
        if x.requires_grad:
            assert x.grad is not None and torch.equal(x.grad.cpu(), torch.zeros_like(x).cpu()), (
                f"gradient of the {name}: {x.grad}"
            )


def rows_with_dead_padding(gen: torch.Generator, rows: int, num_classes: int):
    """Labels of which about half are ignore_index, and two (rows, V) logits whose ignored rows are all −inf."""
    labels = random_labels(gen, (rows,), num_classes, 0.0)
    labels[torch.randperm(rows, generator=gen)[: max(rows // 2, 1)]] = IGNORE
    dead = (labels == IGNORE).unsqueeze(-1).expand(rows, num_classes)
    return labels, [normal(gen, (rows, num_classes)).masked_fill(dead, -math.inf) for _ in range(2)]


@pytest.mark.parametrize("backend", BACKENDS)
@examples(10)
@given(
    seed=SEEDS,
    rows=st.integers(2, 6),
    num_classes=NUM_CLASSES,
    temperature=TEMPERATURES,
    divergence=st.sampled_from(DIVERGENCES),
    ce_weight=st.sampled_from((0.0, 0.5)),
    reduction=REDUCTIONS,
    teacher_grad=st.booleans(),
)
def test_kd_loss_ignored_rows_of_neg_inf_logits(
    backend, seed, rows, num_classes, temperature, divergence, ce_weight, reduction, teacher_grad
):
    """Ignored rows whose logits are all −inf (padding that was masked entirely) add 0 and get a zero gradient,
    never NaN; the other rows agree with the float64 truth."""
    skip_unless_available(backend)
    gen = torch.Generator().manual_seed(seed)
    labels, (s, t) = rows_with_dead_padding(gen, rows, num_classes)
    args = [
        laid_out(s, "contiguous", torch.float32, grad=True),
        laid_out(t, "contiguous", torch.float32, grad=teacher_grad),
    ]
    upstream = upstream_for(gen, reduction, (rows,), 1.0)
    options = dict(temperature=temperature, ce_weight=ce_weight, reduction=reduction)
    unit = kd_unit(
        logical(args),
        kd_scale=temperature**2,
        ce_weight=ce_weight,
        temperature=temperature,
        rows=rows,
        divisor=divisor_of(reduction, labels),
        upstream=upstream,
    )
    device = backend_device(backend)
    _, grads = compare(
        lambda s, t: fastkd.kd_loss(s, t, labels=labels.to(device), divergence=divergence, backend=backend, **options),
        lambda s, t: truth.kd_loss(s, t, labels=labels, divergence_kind=divergence, **options),
        backend_args(backend, args),
        upstream,
        1e-5,
        unit=unit,
        names=("student", "teacher"),
    )
    for grad in grads:
        assert torch.equal(grad[labels == IGNORE].cpu(), torch.zeros(int((labels == IGNORE).sum()), num_classes))


# ----------------------------------------------------------------------------------------------------------------
# kd_loss with an ensemble of teachers, and with a sparse (top-K) teacher
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ensemble", ("prob", "logit"))
@examples(10)
@given(
    seed=SEEDS,
    row_shape=ROW_SHAPES,
    num_classes=st.integers(2, 40),
    num_teachers=st.integers(1, 3),
    temperature=TEMPERATURES,
    divergence=st.sampled_from(DIVERGENCES),
    weights=st.sampled_from(("uniform", "numbers", "tensor")),
    silent_teacher=st.sampled_from((None, "partly -inf", "a row all -inf")),
    as_list=st.booleans(),
    layout=LAYOUTS,
    dtype=FLOAT_DTYPES,
    teacher_grad=st.booleans(),
)
def test_kd_loss_ensemble_matches_float64_truth(
    backend,
    ensemble,
    seed,
    row_shape,
    num_classes,
    num_teachers,
    temperature,
    divergence,
    weights,
    silent_teacher,
    as_list,
    layout,
    dtype,
    teacher_grad,
):
    """An ensemble of K teachers ("prob": Σ_k w_k softmax(t_k/T); "logit": softmax(Σ_k w_k t_k/T)), given as a list
    (each teacher in its own layout) or a (K, *, V) view, with uniform weights, numbers or a strided tensor of
    weights, and possibly one more teacher of weight 0 whose logits are partly −inf or have a row all −inf (it must
    change nothing): loss and gradients (student, and teachers when they require grad) equal the float64 truth."""
    skip_unless_available(backend)
    assume(weights != "uniform" or silent_teacher is None)
    gen = torch.Generator().manual_seed(seed)
    shape = row_shape + (num_classes,)
    teachers = [normal(gen, shape) for _ in range(num_teachers)]
    numbers = (torch.rand(num_teachers, generator=gen) + 0.2).tolist()
    if silent_teacher is not None:
        position = int(torch.randint(0, num_teachers + 1, (), generator=gen))
        masked = torch.rand(shape, generator=gen) < 0.5
        if silent_teacher == "partly -inf":  # one class left finite in every row
            masked[..., int(torch.randint(0, num_classes, (), generator=gen))] = False
        else:
            masked[(0,) * len(row_shape)] = True
        silent = normal(gen, shape).masked_fill(masked, -math.inf)
        teachers.insert(position, silent)
        numbers.insert(position, 0.0)
    if as_list:
        teacher_args = [laid_out(t, layout, dtype, grad=teacher_grad) for t in teachers]
    else:
        stacked_layout = "contiguous" if layout == "expanded" else layout  # expanding over K would copy teacher 0
        teacher_args = [laid_out(torch.stack(teachers), stacked_layout, dtype, grad=teacher_grad)]
    args = [laid_out(normal(gen, shape), "contiguous", dtype, grad=True)] + teacher_args
    strided_weights = torch.tensor([[w, math.nan] for w in numbers])[:, 0]
    teacher_weights = {"uniform": None, "numbers": numbers, "tensor": strided_weights}[weights]
    options = dict(temperature=temperature, ensemble=ensemble, teacher_weights=teacher_weights)

    def library(s, *t):
        return fastkd.kd_loss(s, list(t) if as_list else t[0], divergence=divergence, backend=backend, **options)

    def want(s, *t):
        return truth.kd_loss(s, torch.stack(t) if as_list else t[0], divergence_kind=divergence, **options)

    upstream = torch.tensor(1.0, dtype=torch.float64)
    unit = kd_unit(
        logical(args),
        kd_scale=temperature**2,
        ce_weight=0.0,
        temperature=temperature,
        rows=math.prod(row_shape),
        divisor=divisor_of("batchmean", rows=math.prod(row_shape)),
        upstream=upstream,
    )
    compare(library, want, backend_args(backend, args), upstream, tolerance(args[0].base), unit=unit)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@examples(16)
@given(
    seed=SEEDS,
    rows=st.integers(1, 6),
    num_classes=NUM_CLASSES,
    k=st.integers(1, 8),
    full=st.booleans(),
    kind_tail=st.sampled_from((("logprobs", "bucket"), ("logprobs", "renormalize"), ("logits", "renormalize"))),
    temperature=TEMPERATURES,
    layouts=st.tuples(LAYOUTS, LAYOUTS, LAYOUTS),
    dtypes=st.tuples(FLOAT_DTYPES, FLOAT_DTYPES),
    index_dtype=st.sampled_from((torch.int64, torch.int32)),
    ce_weight=st.sampled_from((0.0, 0.5)),
    label_layout=st.one_of(st.none(), LABEL_LAYOUTS),
    reduction=REDUCTIONS,
)
def test_kd_loss_topk_teacher_matches_float64_truth(
    backend,
    seed,
    rows,
    num_classes,
    k,
    full,
    kind_tail,
    temperature,
    layouts,
    dtypes,
    index_dtype,
    ce_weight,
    label_layout,
    reduction,
):
    """A sparse teacher (its top-K log-probabilities or logits per row, in any order; K up to 8, or K = V for up to
    40 classes; student, values and indices of any layout and dtype) with tail "bucket" or "renormalize", with or
    without labels (any layout) and CE: the loss and the student's gradient equal the float64 truth."""
    assume(label_layout is not None or ce_weight == 0)
    kind, tail = kind_tail
    gen = torch.Generator().manual_seed(seed)
    k = num_classes if full and num_classes <= 40 else min(k, num_classes)  # the kernels loop over the K per column
    teacher = normal(gen, (rows, num_classes))
    source = torch.log_softmax(teacher, dim=-1) if kind == "logprobs" else teacher
    values, indices = source.topk(k, dim=-1)
    order = torch.rand(rows, k, generator=gen).argsort(dim=-1)  # a server need not sort them
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    if "expanded" in layouts[1:]:  # values and indices broadcast together, from the same row
        values, indices = values[:1].expand(rows, k), indices[:1].expand(rows, k)
    student = laid_out(normal(gen, (rows, num_classes)), layouts[0], dtypes[0], grad=True)
    value_arg = laid_out(values, layouts[1], dtypes[1])
    index_arg = laid_out(indices.double(), layouts[2], index_dtype)
    index_view = index_arg.view(index_arg.base)
    labels = None
    if label_layout is not None:
        labels = labels_laid_out(random_labels(gen, (rows,), num_classes, 0.3), label_layout, gen, num_classes)
    upstream = upstream_for(gen, reduction, (rows,), 1.0)
    options = dict(temperature=temperature, reduction=reduction, ce_weight=ce_weight, labels=labels)
    unit = kd_unit(
        logical([student, value_arg]),
        kd_scale=temperature**2,
        ce_weight=ce_weight,
        temperature=temperature,
        rows=rows,
        divisor=divisor_of(reduction, labels, rows),
        upstream=upstream,
    )
    device = backend_device(backend)
    device_options = dict(options, labels=None if labels is None else labels.to(device))

    def library(s, v):
        return fastkd.kd_loss(
            s, fastkd.TopK(v, index_view.to(device), kind), tail=tail, backend=backend, **device_options
        )

    compare(
        library,
        lambda s, v: truth.kd_topk_loss(s, v, index_view, tail=tail, **options),
        backend_args(backend, [student, value_arg]),
        upstream,
        tolerance(student.base, value_arg.base),
        unit=unit,
        names=("student",),
    )


# ----------------------------------------------------------------------------------------------------------------
# normalizers (kd_loss and dkd_loss share them)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@examples(10)
@given(
    seed=SEEDS,
    rows=st.integers(1, 6),
    num_classes=st.integers(2, 40),
    op=st.sampled_from(("kd", "dkd")),
    value=st.sampled_from((0, 1, 3, 7.5, 1000)),
    dtype=st.sampled_from((torch.float32, torch.int64, torch.int32, torch.float64)),
    ignored=st.sampled_from((0.0, 0.5, 1.0)),
)
def test_tensor_normalizer_divides_the_sum(backend, seed, rows, num_classes, op, value, dtype, ignored):
    """A 0-d tensor ``normalizer`` of any real dtype (0, a step without counted rows, counts as 1) replaces the
    divisor of "batchmean" in kd_loss and dkd_loss: loss and gradients equal the float64 truth's sum ÷ normalizer,
    and the loss stays float32."""
    skip_unless_available(backend)
    assume(dtype.is_floating_point or float(value).is_integer())
    gen = torch.Generator().manual_seed(seed)
    device = backend_device(backend)
    args = [
        laid_out(normal(gen, (rows, num_classes)), "contiguous", torch.float32, grad=True),
        laid_out(normal(gen, (rows, num_classes)), "contiguous", torch.float32),
    ]
    labels = random_labels(gen, (rows,), num_classes, ignored)
    normalizer = torch.tensor(value, dtype=dtype)
    upstream = torch.tensor(1.0, dtype=torch.float64)
    if op == "kd":
        options = dict(temperature=2.0, ce_weight=0.5, normalizer=normalizer)
        kd_scale = 4.0

        def library(s, t):
            return fastkd.kd_loss(
                s, t, labels=labels.to(device), backend=backend, **dict(options, normalizer=normalizer.to(device))
            )

        def want(s, t):
            return truth.kd_loss(s, t, labels=labels, **options)
    else:
        options = dict(temperature=2.0, alpha=1.0, beta=8.0, ce_weight=0.5, normalizer=normalizer)
        kd_scale = 4.0 * 9.0

        def library(s, t):
            return fastkd.dkd_loss(
                s, t, labels.to(device), backend=backend, **dict(options, normalizer=normalizer.to(device))
            )

        def want(s, t):
            return truth.dkd_loss(s, t, labels, **options)

    unit = kd_unit(
        logical(args),
        kd_scale=kd_scale,
        ce_weight=0.5,
        temperature=2.0,
        rows=rows,
        divisor=divisor_of("batchmean", normalizer=normalizer),
        upstream=upstream,
        peaked=op == "dkd",
    )
    loss, _ = compare(library, want, backend_args(backend, args), upstream, 1e-5, unit=unit, names=("student",))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("op", ("kd", "dkd"))
@examples(12)
@given(
    bad=st.sampled_from(
        (
            (-2.0, torch.float32),
            (math.nan, torch.float32),
            (math.inf, torch.float32),
            (-math.inf, torch.float64),
            (-3, torch.int64),
        )
    ),
    backend=st.sampled_from(BACKENDS),
)
def test_invalid_tensor_normalizer_is_refused(op, bad, backend):
    """A negative, NaN or infinite tensor ``normalizer`` (on the CPU, where reading it costs no device sync) is
    refused with an error, as such a number is, instead of dividing the loss by it."""
    skip_unless_available(backend)
    value, dtype = bad
    device = backend_device(backend)
    s = torch.randn(3, 5, device=device, requires_grad=True)
    t = torch.randn(3, 5, device=device)
    labels = torch.tensor([1, IGNORE, 4], device=device)
    normalizer = torch.tensor(value, dtype=dtype, device=device)
    with pytest.raises((ValueError, TypeError)):
        if op == "kd":
            fastkd.kd_loss(s, t, labels=labels, normalizer=normalizer, backend=backend)
        else:
            fastkd.dkd_loss(s, t, labels, normalizer=normalizer, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# dkd_loss
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@examples(16)
@given(
    seed=SEEDS,
    row_shape=ROW_SHAPES,
    num_classes=NUM_CLASSES,
    temperature=TEMPERATURES,
    alpha=st.sampled_from((1.0, 0.0, 2.5)),
    beta=st.sampled_from((8.0, 0.0, 1.0)),
    ce_weight=st.sampled_from((0.0, 0.5)),
    confident=st.sampled_from((0.0, 30.0, 1e4)),
    masked=st.sampled_from((0.0, 0.4)),
    ignored=st.sampled_from((0.0, 0.4)),
    label_layout=LABEL_LAYOUTS,
    label_dtype=st.sampled_from((torch.int64, torch.int32)),
    dtypes=st.tuples(FLOAT_DTYPES, FLOAT_DTYPES),
    layouts=st.tuples(LAYOUTS, LAYOUTS),
    reduction=REDUCTIONS,
    teacher_grad=st.booleans(),
)
@example(  # found in a full run: a target raised by 30 at T = 1/16 (z of size 480) cost the value 1.4e-5
    seed=0,
    row_shape=(1,),
    num_classes=3,
    temperature=0.0625,
    alpha=1.0,
    beta=8.0,
    ce_weight=0.0,
    confident=30.0,
    masked=0.0,
    ignored=0.0,
    label_layout="contiguous",
    label_dtype=torch.int64,
    dtypes=(torch.float32, torch.float32),
    layouts=("contiguous", "contiguous"),
    reduction="batchmean",
    teacher_grad=True,
)
@example(  # found in CI: at x/T of size 200 the reference's teacher gradient lost a quarter of a dominant class's
    seed=0,
    row_shape=(1,),
    num_classes=501,
    temperature=0.05,
    alpha=1.0,
    beta=8.0,
    ce_weight=0.0,
    confident=0.0,
    masked=0.0,
    ignored=0.0,
    label_layout="contiguous",
    label_dtype=torch.int64,
    dtypes=(torch.float32, torch.float32),
    layouts=("contiguous", "contiguous"),
    reduction="batchmean",
    teacher_grad=True,
)
def test_dkd_loss_matches_float64_truth(
    backend,
    seed,
    row_shape,
    num_classes,
    temperature,
    alpha,
    beta,
    ce_weight,
    confident,
    masked,
    ignored,
    label_layout,
    label_dtype,
    dtypes,
    layouts,
    reduction,
    teacher_grad,
):
    """dkd_loss (TCKD and NCKD as mdistiller defines them; any α, β, T and CE; ignored rows; labels of any layout and
    dtype; logits of any layout and dtype with −inf non-target columns and target logits raised by up to 1e4, so
    that p_gt → 1) equals the float64 truth, and so do the gradients (the teacher's on the reference, the only
    backend that gives one)."""
    skip_unless_available(backend)
    assume(not teacher_grad or backend == "reference")
    gen = torch.Generator().manual_seed(seed)
    shape = row_shape + (num_classes,)
    column_masked = torch.rand(num_classes, generator=gen) < masked
    column_masked[torch.randperm(num_classes, generator=gen)[:2]] = False  # a target and a non-target class
    labels = random_labels(gen, row_shape, num_classes, 0.0, allowed=~column_masked)
    if "expanded" in layouts or label_layout == "expanded":
        labels = labels.reshape(-1)[:1].expand(row_shape).clone()  # one target class for the broadcast rows
    target = torch.nn.functional.one_hot(labels, num_classes).bool()

    def logits():
        return (normal(gen, shape) + confident * target).masked_fill(column_masked, -math.inf)

    args = [
        laid_out(logits(), layouts[0], dtypes[0], grad=True),
        laid_out(logits(), layouts[1], dtypes[1], grad=teacher_grad),
    ]
    labels = torch.where(torch.rand(row_shape, generator=gen) < ignored, IGNORE, labels)
    labels = labels_laid_out(labels, label_layout, gen, num_classes, label_dtype)
    upstream = upstream_for(gen, reduction, row_shape, 1.0)
    options = dict(temperature=temperature, alpha=alpha, beta=beta, ce_weight=ce_weight, reduction=reduction)
    unit = kd_unit(
        logical(args),
        kd_scale=(alpha + beta) * temperature**2,
        ce_weight=ce_weight,
        temperature=temperature,
        rows=math.prod(row_shape),
        divisor=divisor_of(reduction, labels),
        upstream=upstream,
        peaked=True,
    )
    device = backend_device(backend)
    compare(
        lambda s, t: fastkd.dkd_loss(s, t, labels.to(device), backend=backend, **options),
        lambda s, t: truth.dkd_loss(s, t, labels, **options),
        backend_args(backend, args),
        upstream,
        tolerance(*(a.base for a in args)),
        unit=unit,
        names=("student", "teacher"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@examples(8)
@given(
    seed=SEEDS,
    rows=st.integers(2, 6),
    num_classes=st.integers(2, 40),
    temperature=TEMPERATURES,
    ce_weight=st.sampled_from((0.0, 0.5)),
    reduction=REDUCTIONS,
)
def test_dkd_loss_ignored_rows_of_neg_inf_logits(backend, seed, rows, num_classes, temperature, ce_weight, reduction):
    """dkd_loss: ignored rows whose logits are all −inf add 0 and get a zero gradient, never NaN; the other rows
    agree with the float64 truth."""
    skip_unless_available(backend)
    gen = torch.Generator().manual_seed(seed)
    labels, (s, t) = rows_with_dead_padding(gen, rows, num_classes)
    args = [laid_out(s, "contiguous", torch.float32, grad=True), laid_out(t, "contiguous", torch.float32)]
    upstream = upstream_for(gen, reduction, (rows,), 1.0)
    options = dict(temperature=temperature, alpha=1.0, beta=8.0, ce_weight=ce_weight, reduction=reduction)
    unit = kd_unit(
        logical(args),
        kd_scale=9.0 * temperature**2,
        ce_weight=ce_weight,
        temperature=temperature,
        rows=rows,
        divisor=divisor_of(reduction, labels),
        upstream=upstream,
        peaked=True,
    )
    device = backend_device(backend)
    _, (grad,) = compare(
        lambda s, t: fastkd.dkd_loss(s, t, labels.to(device), backend=backend, **options),
        lambda s, t: truth.dkd_loss(s, t, labels, **options),
        backend_args(backend, args),
        upstream,
        1e-5,
        unit=unit,
        names=("student",),
    )
    assert torch.equal(grad[labels == IGNORE].cpu(), torch.zeros(int((labels == IGNORE).sum()), num_classes))


# ----------------------------------------------------------------------------------------------------------------
# feature_loss
# ----------------------------------------------------------------------------------------------------------------

FEATURE_SHAPES = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)),
    st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
)


def feature_mask(
    gen: torch.Generator, shape, channel_dim: int, mask_kind, mask_layout: str, per_channel_ok: bool, dtype: torch.dtype
):
    """A mask for features of ``shape``: None, bool, or float (0 or a weight in [0.8, 2.2)) of ``dtype``; "full"
    (the features' shape), "broadcast" (size 1 along random dims, leading ones dropped), "expanded" (a broadcast
    mask expanded to full size: stride 0) or "sliced" (every other element of a wider last dim). Without
    ``per_channel_ok`` it has size 1 along the channels."""
    if mask_kind is None:
        return None
    small = [size if torch.rand((), generator=gen) < 0.5 else 1 for size in shape]
    full = list(shape)
    if not per_channel_ok:
        small[channel_dim] = full[channel_dim] = 1
    values = torch.rand(full if mask_layout == "full" else small, generator=gen, dtype=torch.float64)
    mask = values > 0.3 if mask_kind == "bool" else torch.where(values > 0.3, values * 2 + 0.2, 0.0).to(dtype)
    if mask_layout == "broadcast":
        first_kept = next((i for i, size in enumerate(mask.shape) if size != 1), mask.dim() - 1)
        return mask.reshape(mask.shape[first_kept:])
    if mask_layout == "expanded":
        return mask.expand(full)
    if mask_layout == "sliced":
        wide = torch.zeros(mask.shape[:-1] + (2 * mask.shape[-1],), dtype=mask.dtype)
        wide[..., ::2] = mask
        return wide[..., ::2]
    return mask


def feature_unit(
    student: torch.Tensor, teacher: torch.Tensor, mask, *, kind: str, normalize, channel_dim: int, reduction: str
):
    """The natural scales of feature_loss and of its gradient, for the floor of :func:`compare`: over the present
    elements (weighted by the mask) the size |s'| + |t'| of the normalised features for the value; for the gradient
    the terms' slope times the normalisation's gain (1/σ per group for "channel"/"sample", 1/‖x‖ per position for
    "l2" and "cosine": float32 rounds each quotient to ε of it), in norm per sample, summed over samples; both over
    the divisor of ``reduction``."""
    s, t = (truth.feature_groups(x.double(), channel_dim) for x in (student, teacher))
    m = torch.ones_like(s) if mask is None else truth.feature_groups(mask.double().expand(student.shape), channel_dim)
    present = m != 0
    s, t = torch.where(present, s, 0.0), torch.where(present, t, 0.0)
    size = (
        truth.normalized_features(s, present, normalize).abs() + truth.normalized_features(t, present, normalize).abs()
    )
    gain = torch.ones_like(s)
    if kind == "cosine" or normalize == "l2":
        gain = sum(1 / x.norm(dim=1, keepdim=True).clamp_min(1e-30) for x in (s, t))
    elif normalize in ("channel", "sample"):
        gain = sum(truth.standardizer(x, present, (2,) if normalize == "channel" else (1, 2))[1] for x in (s, t))
    slope = torch.ones_like(size) if kind == "cosine" else 2 * size + 1
    weight = m[:, :1] if kind == "cosine" else m
    divisor = max(weight.sum().item(), 1e-30) if reduction == "mean" else 1.0
    value = (weight.sum() if kind == "cosine" else (m * size * (size + 1)).sum()).item()
    grad = torch.where(present, m * gain * slope, 0.0).flatten(1).norm(dim=1).sum().item()
    return value / divisor, grad / divisor


@pytest.mark.parametrize("backend", BACKENDS)
@examples(20)
@given(
    seed=SEEDS,
    shape=FEATURE_SHAPES,
    channel_last=st.booleans(),
    kind=st.sampled_from(fastkd.features.KINDS),
    normalize=st.sampled_from(fastkd.features.NORMALIZATIONS),
    with_margin=st.booleans(),
    mask_kind=st.sampled_from((None, "bool", "float")),
    mask_layout=st.sampled_from(("full", "broadcast", "expanded", "sliced")),
    mask_dtype=st.sampled_from((torch.float32, torch.float64, torch.float16)),
    beta=st.sampled_from((1.0, 0.3, 2.0)),
    reduction=st.sampled_from(("mean", "sum")),
    dtypes=st.tuples(FLOAT_DTYPES, FLOAT_DTYPES),
    layouts=st.tuples(LAYOUTS, LAYOUTS),
    margin_layout=st.sampled_from(("contiguous", "sliced", "expanded")),
    teacher_grad=st.booleans(),
)
def test_feature_loss_matches_float64_truth(
    backend,
    seed,
    shape,
    channel_last,
    kind,
    normalize,
    with_margin,
    mask_kind,
    mask_layout,
    mask_dtype,
    beta,
    reduction,
    dtypes,
    layouts,
    margin_layout,
    teacher_grad,
):
    """feature_loss (every kind and normalisation; channels second or last; OFD margins in any layout; bool or float
    masks of any dtype, full, broadcast, expanded or strided; features of any two dtypes and layouts; reduction
    "mean" or "sum") equals the float64 truth, and so do the gradients of student and teacher."""
    skip_unless_available(backend)
    assume(backend == "reference" or not (kind == "cosine" and normalize in ("channel", "sample")))  # documented
    assume(not (normalize == "channel" and len(shape) == 2))
    channel_dim = len(shape) - 1 if channel_last and len(shape) > 2 else 1
    gen = torch.Generator().manual_seed(seed)
    args = [
        laid_out(normal(gen, shape, 2.0) + 0.5, layouts[0], dtypes[0], grad=True),
        laid_out(normal(gen, shape, 2.0) + 0.5, layouts[1], dtypes[1], grad=teacher_grad),
    ]
    mask = feature_mask(
        gen, shape, channel_dim, mask_kind, mask_layout, kind != "cosine" and normalize != "l2", mask_dtype
    )
    margin = None
    if with_margin and normalize is None and kind != "cosine":
        margin_arg = laid_out(normal(gen, (shape[channel_dim],), 1.0) - 0.5, margin_layout, torch.float32)
        margin = margin_arg.view(margin_arg.base)
    options = dict(kind=kind, normalize=normalize, beta=beta, channel_dim=channel_dim, reduction=reduction)
    device = backend_device(backend)

    def library(s, t):
        return fastkd.feature_loss(
            s,
            t,
            mask=None if mask is None else mask.to(device),
            margin=None if margin is None else margin.to(device),
            backend=backend,
            **options,
        )

    def want(s, t):
        return truth.feature_loss(s, t, mask=mask, margin=None if margin is None else margin.to(s.dtype), **options)

    unit = feature_unit(
        *logical(args), mask, kind=kind, normalize=normalize, channel_dim=channel_dim, reduction=reduction
    )
    compare(
        library,
        want,
        backend_args(backend, args),
        torch.tensor(1.0, dtype=torch.float64),
        tolerance(*(a.base for a in args)),
        unit=unit,
        names=("student", "teacher"),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@examples(10)
@given(
    seed=SEEDS,
    shape=FEATURE_SHAPES,
    kind=st.sampled_from(("mse", "l1", "smooth_l1")),
    grad_of=st.sampled_from(("mask", "margin", "both")),
    mask_layout=st.sampled_from(("full", "broadcast")),
    reduction=st.sampled_from(("mean", "sum")),
)
def test_feature_loss_gradient_reaches_float_mask_and_margin(
    backend, seed, shape, kind, grad_of, mask_layout, reduction
):
    """A float mask (positive weights) and an OFD margin that require grad get the float64 truth's gradient
    (∂loss/∂m, ∂loss/∂margin) as the student does: from the backend asked for, or, where a kernel backend asked for
    by name computes no such gradient and refuses with a RuntimeError, from backend "auto". Never dropped."""
    skip_unless_available(backend)
    gen = torch.Generator().manual_seed(seed)
    small = [size if torch.rand((), generator=gen) < 0.5 else 1 for size in shape]
    mask_values = torch.rand(shape if mask_layout == "full" else small, generator=gen, dtype=torch.float64)
    args = [
        laid_out(normal(gen, shape, 2.0), "contiguous", torch.float32, grad=True),
        laid_out(normal(gen, shape, 2.0), "contiguous", torch.float32),
        laid_out(mask_values * 1.5 + 0.2, "contiguous", torch.float32, grad=grad_of in ("mask", "both")),
        laid_out(normal(gen, (shape[1],), 1.0) - 0.5, "contiguous", torch.float32, grad=grad_of in ("margin", "both")),
    ]
    options = dict(kind=kind, reduction=reduction)
    names = ["student"] + [name for name, arg in zip(("mask", "margin"), args[2:]) if arg.grad]
    student, teacher, mask, _ = logical(args)
    unit = feature_unit(student, teacher, mask, kind=kind, normalize=None, channel_dim=1, reduction=reduction)
    args = backend_args(backend, args)
    upstream = torch.tensor(1.0, dtype=torch.float64)

    def want(s, t, m, c):
        return truth.feature_loss(s, t, mask=m, margin=c, **options)

    try:
        evaluate(
            lambda s, t, m, c: fastkd.feature_loss(s, t, mask=m, margin=c, backend=backend, **options), args, upstream
        )
    except RuntimeError:
        assert backend != "reference", "the reference must compute every gradient"
        backend = "auto"
    compare(
        lambda s, t, m, c: fastkd.feature_loss(s, t, mask=m, margin=c, backend=backend, **options),
        want,
        args,
        upstream,
        1e-5,
        unit=unit,
        names=names,
    )


# ----------------------------------------------------------------------------------------------------------------
# spectral_norms
# ----------------------------------------------------------------------------------------------------------------

WEIGHT_SHAPES = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 9), st.integers(1, 9)),
        st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2)),
    ),
    min_size=1,
    max_size=3,
)


def gapped_matrix(gen: torch.Generator, rows: int, cols: int, gap: float) -> torch.Tensor:
    """A float64 rows × cols matrix U diag(σ) Vᵀ with random orthonormal U, V, σ₁ ∈ [0.5, 4) and σ_i ≤ gap·σ₁ for
    i > 1: power iteration converges at the rate gap² from a random start."""
    rank = min(rows, cols)
    u, _ = torch.linalg.qr(normal(gen, (rows, rank), 1.0))
    v, _ = torch.linalg.qr(normal(gen, (cols, rank), 1.0))
    top = 0.5 + 3.5 * float(torch.rand((), generator=gen))
    sigma = torch.cat(
        [torch.tensor([top], dtype=torch.float64), top * gap * torch.rand(rank - 1, generator=gen, dtype=torch.float64)]
    )
    return u @ torch.diag(sigma) @ v.T


@pytest.mark.parametrize("backend", BACKENDS)
@examples(10)
@given(
    seed=SEEDS,
    shapes=WEIGHT_SHAPES,
    gap=st.sampled_from((0.5, 0.1)),
    dtype=FLOAT_DTYPES,
    layouts=st.lists(
        st.sampled_from(("contiguous", "offset", "sliced", "transposed", "expanded")), min_size=3, max_size=3
    ),
)
def test_spectral_norms_match_float64_sigma_max(backend, seed, shapes, gap, dtype, layouts):
    """spectral_norms of a list of Linear and Conv weights with a clear spectral gap (σ₂ ≤ gap·σ₁), each passed in any
    layout (rank one when expanded), from a seeded random start, equals σ_max of the float64 SVD of the very weights
    it received, and its gradient equals ∂σ_max/∂W = u₁v₁ᵀ: with the default iteration count, and with 50 on the
    Triton interpreter (a launch per iteration takes it ~20 ms; with gap ≤ 0.5 the error after 50 iterations is
    below 0.25⁵⁰, far under float32's resolution)."""
    skip_unless_available(backend)
    gen = torch.Generator().manual_seed(seed)
    args = [
        laid_out(gapped_matrix(gen, shape[0], math.prod(shape[1:]), gap).reshape(shape), layout, dtype, grad=True)
        for shape, layout in zip(shapes, layouts)
    ]
    upstream = torch.rand(len(shapes), generator=gen, dtype=torch.float64) + 0.5
    iterations = dict(n_iter=50) if backend == "triton" else {}

    def library(*weights):
        start = torch.Generator().manual_seed(seed + 1)
        sigma, _ = fastkd.spectral_norms(list(weights), generator=start, backend=backend, **iterations)
        return sigma

    compare(
        library,
        lambda *weights: torch.stack([truth.sigma_max(w) for w in weights]),
        backend_args(backend, args),
        upstream,
        tolerance(args[0].base),
    )
