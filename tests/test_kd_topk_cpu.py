"""kd_loss with a sparse (TopK) teacher on the C++ CPU backend (csrc/kd_topk_cpu_impl.h): against the reference
for every tail and teacher kind, K = 1 to V, ragged rows (also rows without entries), labels with ignored rows and
the CE term, strided logits, int32 indices, float16/bfloat16; the same bits for any thread count; NaN rows for bad
indices; statistics that either backend's backward reads; every instruction set."""

import json
import math

import pytest
import torch

import fastkd
from fastkd import TopK, bench, cpu_backend, reference, sampled_teacher, topk_teacher
from fastkd.kd import _kd_topk_rows_backward_op, _kd_topk_rows_op
from fastkd.kernel_args import NUM_METRICS, TopKOptions

from conftest import CPU_ISAS, assert_rel_close, logits, skip_unless_available

RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CASES = [  # (teacher kind, tail)
    ("logprobs", "bucket"),
    ("logprobs", "spread"),
    ("logprobs", "renormalize"),
    ("logits", "renormalize"),
    ("sampled", None),
]


@pytest.fixture(autouse=True)
def _needs_the_extension():
    skip_unless_available("cpu")


@pytest.fixture
def threads():
    """Restores torch's thread count (the kernels use torch.get_num_threads() threads)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    """Each instruction set of the C++ kernels this CPU runs."""
    if request.param not in cpu_backend.usable_isas():
        pytest.skip(f"no {request.param} kernels here (usable: {cpu_backend.usable_isas()})")
    default = cpu_backend.isa()
    cpu_backend.set_isa(request.param)
    yield request.param
    cpu_backend.set_isa(default)


def make_teacher(gen, t, k, kind, temperature, dtype=torch.float32, int32=False):
    """A TopK teacher of ``kind`` from full teacher logits ``t``, its values in ``dtype``."""
    if kind == "sampled":
        teacher = sampled_teacher(t, k, temperature=temperature, generator=gen)
    else:
        teacher = topk_teacher(t, k, kind=kind)
    indices = teacher.indices.int() if int32 else teacher.indices
    return TopK(teacher.values.to(dtype), indices, teacher.kind, teacher.temperature)


def loss_grad_stats(s, teacher, backend, **options):
    """(row losses, student gradient of Σ w·row_loss for random-ish weights w, the stats dict)."""
    leaf = s.detach().clone().requires_grad_(True)
    loss, stats = fastkd.kd_loss(leaf, teacher, reduction="none", return_stats=True, backend=backend, **options)
    weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (grad,) = torch.autograd.grad((loss * weights).sum(), leaf)
    return loss.detach(), grad, stats


def assert_matches_the_reference(s, teacher, rtol, **options):
    got = loss_grad_stats(s, teacher, "cpu", **options)
    want = loss_grad_stats(s, teacher, "reference", **options)
    assert_rel_close(got[0], want[0], rtol, what="loss")
    assert_rel_close(got[1], want[1], rtol, what="grad")
    for name in want[2]:
        assert_rel_close(got[2][name], want[2][name], rtol, what=name)
    return got


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("k", [1, 7, 40])
@pytest.mark.parametrize("kind, tail", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_kernels_match_the_reference(gen, dtype, kind, tail, k, temperature):
    """Row losses, the student gradient and the fidelity metrics, V = 40 (K = V: no tail), a student with a row
    stride (unit column stride), int32 indices, labels with ignored rows and the CE term; teacher values in the
    student's dtype."""
    s = logits(gen, (6, 49), dtype)[:, 4:44]
    t = logits(gen, (6, 40))
    teacher = make_teacher(gen, t, k, kind, temperature, dtype, int32=True)
    labels = torch.tensor([3, -100, 39, 0, 7, -100])
    assert_matches_the_reference(
        s, teacher, RTOL[dtype], tail=tail, temperature=temperature, labels=labels, ce_weight=0.4
    )


@pytest.mark.parametrize("tail", ["bucket", "spread", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_ragged_rows_and_rows_without_entries(gen, tail, temperature):
    """Ragged teachers (−1 slots at the end, or anywhere), rows with no entry at all (the bucket holds all the
    mass; without a bucket no teacher: only the CE term), and top-p truncation."""
    s, t = logits(gen, (8, 30)), logits(gen, (8, 30))
    full = topk_teacher(t, 6)
    counts = torch.tensor([6, 0, 3, 1, 0, 5, 2, 6])
    ragged = TopK.from_counts(full.values, full.indices, counts)
    holes = TopK(full.values, torch.where(torch.rand(8, 6, generator=gen) < 0.4, -1, full.indices))
    labels = torch.tensor([1, 2, -100, 4, 29, 0, -100, 7])
    options = dict(tail=tail, temperature=temperature, labels=labels, ce_weight=0.3)
    loss, grad, _ = assert_matches_the_reference(s, ragged, 1e-5, **options)
    assert loss.isfinite().all() and grad.isfinite().all()
    assert_matches_the_reference(s, holes, 1e-5, **options)
    assert_matches_the_reference(s, topk_teacher(t, 12, top_p=0.8), 1e-5, tail=tail, temperature=temperature)


@pytest.mark.parametrize("tail", ["bucket", "spread", "renormalize"])
def test_ragged_logits_teacher_and_no_ce(gen, tail):
    """Without labels and CE; a logits teacher with empty rows (renormalize: those rows are 0)."""
    s, t = logits(gen, (5, 25)), logits(gen, (5, 25))
    kind = "logits" if tail == "renormalize" else "logprobs"
    top = topk_teacher(t, 4, kind=kind)
    teacher = TopK.from_counts(top.values, top.indices, torch.tensor([4, 0, 2, 0, 1]), kind)
    loss, _, _ = assert_matches_the_reference(s, teacher, 1e-5, tail=tail, temperature=2.0)
    if tail == "renormalize":
        assert torch.equal(loss[[1, 3]], torch.zeros(2))


@pytest.mark.parametrize(
    "options",
    [
        dict(kd_weight=0.0, ce_weight=0.5, temperature=2.0),  # the CE term alone (no KD sweep)
        dict(temperature=3.0, scale_by_t2=False),  # KD alone at T != 1, metrics on a second channel
        dict(temperature=1.0, ce_weight=0.2, kd_weight=0.7),  # T = 1: CE shares the KD's exponentials
    ],
    ids=["ce-only", "kd-only", "shared"],
)
@pytest.mark.parametrize("tail", ["bucket", "spread", "renormalize"])
def test_the_kd_and_ce_terms_alone_and_together(gen, tail, options):
    """Each term alone and both at T = 1 (each mode of the kernels' sweeps), with the metrics."""
    s, t = logits(gen, (6, 33)), logits(gen, (6, 33))
    labels = torch.tensor([0, 32, -100, 5, 6, 7])
    assert_matches_the_reference(s, topk_teacher(t, 5), 1e-5, tail=tail, labels=labels, **options)


def test_an_all_ignored_batch_is_zero(gen):
    s, t = logits(gen, (4, 20)), logits(gen, (4, 20))
    s[2] = -math.inf  # an ignored row enters no computation
    labels = torch.full((4,), -100)
    for tail in ("bucket", "spread", "renormalize"):
        leaf = s.clone().requires_grad_(True)
        loss = fastkd.kd_loss(leaf, topk_teacher(t, 5), tail=tail, labels=labels, ce_weight=0.5, backend="cpu")
        (grad,) = torch.autograd.grad(loss, leaf)
        assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(grad))


def test_an_ignored_row_of_minus_inf_logits_gets_zero_gradient(gen):
    s, t = logits(gen, (3, 12)), logits(gen, (3, 12))
    s[1] = -math.inf
    labels = torch.tensor([1, -100, 2])
    leaf = s.requires_grad_(True)
    loss = fastkd.kd_loss(leaf, topk_teacher(t, 3), labels=labels, ce_weight=1.0, temperature=2.0, backend="cpu")
    loss.backward()
    assert loss.isfinite() and leaf.grad.isfinite().all()
    assert torch.equal(leaf.grad[1], torch.zeros(12))


def test_column_strided_logits_and_strided_values(gen):
    """Logits with a column stride are copied to unit stride; values and indices given through a transpose."""
    s = logits(gen, (5, 60))[:, ::2]
    teacher = topk_teacher(logits(gen, (5, 30)), 4)
    strided = TopK(teacher.values.t().contiguous().t(), teacher.indices.t().contiguous().t())
    assert strided.values.stride(1) != 1
    assert_matches_the_reference(s, strided, 1e-5, temperature=2.0)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_cpu_stays_exact_where_the_student_mass_outside_the_k_is_tiny(gen, temperature):
    """Student logits 30 on the K classes (and 40 vs −60 in a second batch): the rest's mass, the bucket's share
    of the gradient, comes from the columns outside the K, not from 1 − Σ_K, and no ratio of the tails
    overflows."""
    num_classes, k = 64, 4
    for high, low in ((30.0, 0.0), (40.0, -60.0)):
        indices = torch.stack([torch.randperm(num_classes, generator=gen)[:k] for _ in range(3)])
        s = torch.full((3, num_classes), low).scatter(-1, indices, high)
        values = torch.log(torch.full((3, k), 0.9 / k))
        loss, grad, _ = assert_matches_the_reference(
            s, TopK(values, indices), 1e-5, temperature=temperature, tail="bucket"
        )
        assert loss.isfinite().all() and grad.isfinite().all()
        s64 = s.double().requires_grad_(True)
        want = reference.kd_topk_rows(s64, values.double(), indices, tail="bucket", temperature=temperature)
        (want_grad,) = torch.autograd.grad(want.sum(), s64)
        assert_rel_close(loss, temperature**2 * want, 1e-5, what="loss vs float64")
        assert_rel_close(grad, temperature**2 * want_grad * torch.linspace(0.5, 1.5, 3)[:, None], 1e-5)


@pytest.mark.parametrize("tail", ["bucket", "spread", "renormalize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_the_thread_count(gen, threads, isa, tail, dtype):
    """Each row is computed by one thread in a fixed order: 1, 2 and 3 threads give the same bits (40·2600 logits
    are enough for 3 threads; the extension starts one per 2^15 logits)."""
    s, t = logits(gen, (40, 2600), dtype), logits(gen, (40, 2600))
    top = topk_teacher(t, 50)
    teacher = TopK.from_counts(top.values, top.indices, torch.randint(0, 51, (40,), generator=gen))
    labels = torch.randint(0, 2600, (40,), generator=gen)
    labels[::4] = -100
    results = []
    for num_threads in (1, 2, 3):
        torch.set_num_threads(num_threads)
        results.append(loss_grad_stats(s, teacher, "cpu", tail=tail, temperature=2.5, labels=labels, ce_weight=0.3))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
        for name in results[0][2]:
            assert torch.equal(results[0][2][name], other[2][name])


@pytest.mark.parametrize("kind, tail", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_every_instruction_set_matches_the_reference(gen, isa, kind, tail, temperature):
    """A vocabulary that is not a multiple of any vector width nor of the kernels' 1024-column blocks, ragged rows,
    labels and CE, float32 and bfloat16."""
    for dtype in (torch.float32, torch.bfloat16):
        s, t = logits(gen, (5, 1100), dtype), logits(gen, (5, 1100))
        teacher = make_teacher(gen, t, 21, kind, temperature)
        if kind != "sampled":
            teacher = TopK.from_counts(teacher.values, teacher.indices, torch.tensor([21, 0, 5, 13, 1]), kind)
        labels = torch.tensor([3, -100, 1099, 0, 1024])
        assert_matches_the_reference(
            s, teacher, RTOL[dtype], tail=tail, temperature=temperature, labels=labels, ce_weight=0.2
        )


def test_per_row_metrics_match_the_reference(gen):
    """The kernel's (NUM_METRICS, N) metrics row by row, with ties in the teacher's values (the smaller index wins)
    and a row without entries."""
    s, t = logits(gen, (6, 30)), logits(gen, (6, 30))
    top = topk_teacher(t, 5)
    values = top.values.clone()
    values[2, 1] = values[2, 0]  # a tie for the teacher's top class
    indices = top.indices.clone()
    indices[4] = -1
    labels = torch.tensor([0, -100, 2, 3, 4, 5])
    for tail in ("bucket", "spread", "renormalize"):
        options = TopKOptions(2.0, 2.0, tail, -100, 0.5, 4.0)
        _, _, metrics = cpu_backend.kd_topk_forward(s, values, indices, labels, options, with_metrics=True)
        want = reference.kd_topk_fidelity_rows(s, values, indices, labels, tail=tail, ignore_index=-100)
        assert metrics.shape == (NUM_METRICS, 6)
        assert_rel_close(metrics, want, 1e-5, what=tail)


def kernel_rows(s, values, indices, labels=None, *, tail="bucket", temperature=1.0, ce_weight=0.0, backend="cpu"):
    return _kd_topk_rows_op(
        s, values, indices, labels, temperature, temperature, tail, -100, ce_weight, 1.0, backend, True
    )


def test_kernel_rows_with_bad_indices_are_nan(gen):
    """Where nothing checks the indices on the host (the custom op itself), an index of V or −2, or two equal
    indices, make the row's loss, metrics and gradient NaN; −1 padding is an empty slot."""
    s = logits(gen, (5, 10))
    values = torch.full((5, 3), -2.0)
    indices = torch.tensor([[0, 1, -1], [0, 10, 2], [4, 5, 4], [9, 8, -2], [-1, 3, -1]])
    rows, _, _ = torch.ops.fastkd.kd_topk_rows(
        s, values, indices, None, 1.0, 1.0, "bucket", -100, 0.0, 1.0, "cpu", False
    )
    assert rows[[0, 4]].isfinite().all() and rows[1:4].isnan().all()
    for tail in ("bucket", "spread", "renormalize"):
        labels = torch.tensor([1, 2, -100, 3, 4])  # an ignored row may hold anything
        rows, stats, metrics = kernel_rows(s, values, indices, labels, tail=tail, ce_weight=0.5)
        grad = _kd_topk_rows_backward_op(
            torch.ones(5), s, values, indices, labels, stats, 1.0, 1.0, tail, -100, 0.5, 1.0, "cpu"
        )
        assert rows[[0, 4]].isfinite().all() and rows[[1, 3]].isnan().all() and rows[2] == 0
        assert grad[[0, 4]].isfinite().all() and grad[[1, 3]].isnan().all()
        assert torch.equal(grad[2], torch.zeros(10))
        assert metrics[:, [0, 4]].isfinite().all() and metrics[:, [1, 3]].isnan().all()


def test_a_nan_or_infinite_logit_makes_its_row_nan(gen):
    """The kernels' exponential drops NaN: a row with a NaN or +inf logit (or a NaN teacher value) is marked NaN
    as a whole, in the loss, the metrics and the gradient."""
    s = logits(gen, (4, 50))
    s[1, 17] = math.nan
    s[2, 3] = math.inf
    teacher = topk_teacher(logits(gen, (4, 50)), 5)
    values = teacher.values.clone()
    values[3, 2] = math.nan
    for tail in ("bucket", "renormalize"):
        rows, stats, metrics = kernel_rows(s, values, teacher.indices, tail=tail)
        grad = _kd_topk_rows_backward_op(
            torch.ones(4), s, values, teacher.indices, None, stats, 1.0, 1.0, tail, -100, 0.0, 1.0, "cpu"
        )
        assert rows[0].isfinite() and rows[1:].isnan().all()
        assert grad[0].isfinite().all() and grad[1:].isnan().all()
        assert metrics[:, 0].isfinite().all() and metrics[:, 1:].isnan().all()


@pytest.mark.parametrize("tail", ["bucket", "spread", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_either_backends_forward_feeds_the_others_backward(gen, tail, temperature):
    """The statistics mean the same in both backends: the C++ backward from the Triton forward's statistics and
    the Triton backward from the C++ forward's give the gradient of the same backend's own pair."""
    skip_unless_available("triton")
    from fastkd.dispatch import TRITON_AVAILABLE, triton_interpreted

    if not (TRITON_AVAILABLE and triton_interpreted()):
        pytest.skip("the Triton kernels on CPU tensors need TRITON_INTERPRET=1 and triton")
    s, t = logits(gen, (6, 40)), logits(gen, (6, 40))
    top = topk_teacher(t, 7)
    teacher = TopK.from_counts(top.values, top.indices, torch.tensor([7, 0, 3, 7, 1, 5]))
    labels = torch.tensor([3, -100, 39, 0, 7, 2])
    grad_loss = torch.rand(6, generator=gen) + 0.5
    options = (temperature, temperature, tail, -100, 0.3, temperature**2)
    args = (s, teacher.values, teacher.indices, labels)
    grads = {}
    for forward in ("cpu", "triton"):
        _, stats, _ = _kd_topk_rows_op(*args, *options, forward, False)
        for backward in ("cpu", "triton"):
            grads[forward, backward] = _kd_topk_rows_backward_op(grad_loss, *args, stats, *options, backward)
    for forward, backward in (("triton", "cpu"), ("cpu", "triton")):
        assert_rel_close(grads[forward, backward], grads[backward, backward], 1e-5, what=f"{forward} → {backward}")
    assert_rel_close(grads["cpu", "cpu"], grads["triton", "triton"], 1e-5, what="cpu vs triton")


def test_custom_ops_on_the_cpu_backend_pass_opcheck(gen):
    s, t = logits(gen, (5, 37)), logits(gen, (5, 37))
    top = torch.log_softmax(t, -1).topk(4)
    labels = torch.tensor([1, -100, 36, 0, 7])
    options = dict(temperature=2.0, teacher_temperature=2.0, tail="bucket", ignore_index=-100, ce_weight=0.5)
    options.update(kd_scale=4.0, backend="cpu")
    _, stats, _ = torch.ops.fastkd.kd_topk_rows(s, top.values, top.indices, labels, **options, with_metrics=False)
    torch.library.opcheck(
        torch.ops.fastkd.kd_topk_rows.default, (s, top.values, top.indices, labels), dict(options, with_metrics=True)
    )
    torch.library.opcheck(
        torch.ops.fastkd.kd_topk_rows_backward.default,
        (torch.ones(5), s, top.values, top.indices, labels, stats),
        options,
    )


def test_auto_picks_the_cpu_kernels_and_values_that_need_grad_use_the_reference(gen, monkeypatch):
    s = logits(gen, (3, 20))
    teacher = topk_teacher(logits(gen, (3, 20)), 5)
    seen = []
    forward = cpu_backend.kd_topk_forward
    monkeypatch.setattr(cpu_backend, "kd_topk_forward", lambda *a, **k: seen.append(1) or forward(*a, **k))
    fastkd.kd_loss(s, teacher, temperature=2.0)
    assert seen == [1]
    values = teacher.values.clone().requires_grad_(True)
    fastkd.kd_loss(s, TopK(values, teacher.indices), temperature=2.0).backward()
    assert seen == [1] and values.grad is not None
    with pytest.raises(RuntimeError, match="give no gradient to the TopK values"):
        fastkd.kd_loss(s, TopK(values, teacher.indices), backend="cpu")


@pytest.mark.parametrize("tail", ["bucket", "spread"])
def test_linear_kd_with_a_topk_teacher_on_the_cpu_kernels(gen, tail):
    """linear_kd_loss runs the same launchers chunk by chunk: it equals kd_loss on the materialised logits."""
    hidden, weight = logits(gen, (7, 5)), logits(gen, (23, 5))
    teacher = topk_teacher(logits(gen, (7, 23)), 4)
    labels = torch.tensor([1, -100, 2, 22, 0, 5, -100])
    options = dict(labels=labels, temperature=2.0, tail=tail, ce_weight=0.5)
    h = hidden.clone().requires_grad_()
    got = fastkd.linear_kd_loss(h, weight, teacher_logits=teacher, chunk_rows=3, backend="cpu", **options)
    (grad,) = torch.autograd.grad(got, h)
    h_ref = hidden.clone().requires_grad_()
    want = fastkd.kd_loss(h_ref @ weight.T, teacher, backend="reference", **options)
    assert_rel_close(got, want, 1e-5)
    assert_rel_close(grad, torch.autograd.grad(want, h_ref)[0], 1e-5)


def test_bench_op_checks_agreement_and_writes_json(tmp_path, monkeypatch):
    """``fastkd bench --op topk`` on a tiny shape: every row within tolerance of float64, the JSON as reported."""
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda device: 30.0)  # measuring it copies 1 GiB
    path = tmp_path / "bench.json"
    lines = []
    report = bench.run(
        ["4x50x5", "3x20x20:bf16"], op="topk", device="cpu", reps=1, json_path=str(path), log=lines.append
    )
    results = json.loads(path.read_text())["results"]["topk"]
    assert results == report["results"]["topk"]
    assert {r["implementation"] for r in results} == {"fastkd (cpu)", "fastkd (reference)"}
    assert len(results) == 2 * 2 * 2 * 2  # shapes, temperatures, thread counts, implementations
    assert all(r["within_tolerance"] for r in results), results
    assert "4x50x5 T=2 2thr" in lines[-1]
