"""The C++ CPU backend (fastkd._C): what the shared kernel tests in test_kd_loss.py do not cover — thread-count
determinism, the fused-gradient paths (the reduced loss in one call, and the row losses) against the backward
kernel, the host label check, the buffer pool, and the package without the extension."""

import os
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd import cpu_backend
from fastkd.dispatch import select_backend

from conftest import CPU_ISAS, assert_rel_close, logits

needs_extension = pytest.mark.skipif(not cpu_backend.AVAILABLE, reason="the C++ extension fastkd._C was not built")
DIVERGENCES = fastkd.kd.DIVERGENCES  # every divergence kd_loss offers


def loss_and_grads(s, t, upstream=None, **options):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    loss = fastkd.kd_loss(s, t, **options)
    (loss if upstream is None else loss * upstream).sum().backward()
    return loss.detach(), s.grad, t.grad


@pytest.fixture
def threads():
    """Restores torch's thread count (the kernels use torch.get_num_threads() threads)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@needs_extension
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_the_thread_count(gen, threads, isa, divergence, dtype):
    """Each row is reduced by one thread in a fixed order: 1, 2 and 3 threads give the same bits."""
    if isa not in cpu_backend.usable_isas():
        pytest.skip(f"no {isa} kernels here")
    default = cpu_backend.isa()
    cpu_backend.set_isa(isa)
    try:
        s, t = logits(gen, (37, 2500), dtype), logits(gen, (37, 2500), dtype)
        labels = torch.randint(0, 2500, (37,), generator=gen)
        labels[::4] = -100
        upstream = torch.rand(37, generator=gen)
        results = []
        for num_threads in (1, 2, 3):
            torch.set_num_threads(num_threads)
            results.append(
                loss_and_grads(
                    s,
                    t,
                    upstream,
                    temperature=2.0,
                    divergence=divergence,
                    labels=labels,
                    ce_weight=0.3,
                    reduction="none",
                    backend="cpu",
                )
            )
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)
    finally:
        cpu_backend.set_isa(default)


@needs_extension
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_fused_gradient_equals_the_backward_kernel(gen, divergence, reduction):
    """In eager mode the forward writes the gradient (the backward rescales it when the incoming gradient is not
    the one it assumed); a second backward of the same graph runs the backward kernel. Both match the reference."""
    s = logits(gen, (9, 700)).requires_grad_(True)
    t = logits(gen, (9, 700)).requires_grad_(True)
    labels = torch.randint(0, 700, (9,), generator=gen)
    labels[2] = -100
    options = dict(temperature=3.0, divergence=divergence, reduction=reduction, labels=labels, ce_weight=0.25)
    loss = fastkd.kd_loss(s, t, backend="cpu", **options)
    upstream = torch.rand(loss.shape, generator=gen) + 0.5
    fused = torch.autograd.grad((loss * upstream).sum() * 0.7, (s, t), retain_graph=True)
    kernel = torch.autograd.grad((loss * upstream).sum() * 0.7, (s, t))
    reference = fastkd.kd_loss(s, t, backend="reference", **options)
    want = torch.autograd.grad((reference * upstream).sum() * 0.7, (s, t))
    for got_fused, got_kernel, expected in zip(fused, kernel, want):
        assert_rel_close(got_fused, expected, 1e-5, what="fused")
        assert_rel_close(got_kernel, expected, 1e-5, what="backward kernel")


@needs_extension
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(reduction="sum"),
        dict(normalizer=5.5),
        dict(normalizer=torch.tensor(5.5)),
        dict(normalizer=torch.tensor(7), labels="some ignored"),
        dict(labels="some ignored", ce_weight=0.2),
        dict(labels="all ignored", ce_weight=0.2),
        dict(labels="all ignored", normalizer=torch.tensor(0.0)),
    ],
    ids=["batchmean", "sum", "normalizer", "tensor-normalizer", "int-normalizer", "labels", "all-ignored", "zero"],
)
def test_reduced_loss_in_one_call_matches_the_reference(gen, divergence, dtype, options):
    """A batchmean/sum loss of kl or reverse_kl takes one kernel call that reduces the rows (the divisor counted
    in C++ from the labels) and writes both gradients; it matches the reference, and the loss has the same bits
    with and without a gradient and with return_stats."""
    s, t = logits(gen, (11, 300), dtype), logits(gen, (11, 300), dtype)
    options = dict(options, temperature=2.0, divergence=divergence)
    if "labels" in options:
        labels = torch.randint(0, 300, (11,), generator=gen)
        labels[::3] = -100
        options["labels"] = torch.full_like(labels, -100) if options["labels"] == "all ignored" else labels
    got = loss_and_grads(s, t, backend="cpu", **options)
    want = loss_and_grads(s, t, backend="reference", **options)
    for a, b, what in zip(got, want, ("loss", "student grad", "teacher grad")):
        assert_rel_close(a, b, 1e-5 if dtype == torch.float32 else 1e-2, what=what)
    assert torch.equal(fastkd.kd_loss(s, t, backend="cpu", **options), got[0])
    with_stats, stats = fastkd.kd_loss(s.requires_grad_(True), t, backend="cpu", return_stats=True, **options)
    assert torch.equal(with_stats.detach(), got[0]) and set(stats) == set(fastkd.kd.FIDELITY_METRICS)


@needs_extension
def test_labels_are_checked_on_the_host(gen):
    """Out-of-range labels are found by one host loop over CPU labels (any integer dtype and layout)."""
    labels = torch.tensor([[1, -100, 3], [7, 2, 0]], dtype=torch.int32).t()  # (3, 2), not contiguous
    assert cpu_backend.first_bad_label(labels, 8, -100) == -1
    assert cpu_backend.first_bad_label(labels, 7, -100) == 1  # labels[0, 1] = 7
    assert cpu_backend.first_bad_label(torch.tensor([-1, 2]), 8, -100) == 0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\) or equal ignore_index=-100, got 7"):
        fastkd.kd_loss(logits(gen, (3, 2, 7)), logits(gen, (3, 2, 7)), labels=labels)


@needs_extension
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_reduced_loss_does_not_depend_on_the_thread_count(gen, threads, divergence):
    """The reduced loss sums the rows in row order: 1, 2 and 3 threads give the same bits (37·2700 logits are
    enough for 3 threads; the extension starts one per 2^15 logits)."""
    s, t = logits(gen, (37, 2700)), logits(gen, (37, 2700))
    labels = torch.randint(0, 2700, (37,), generator=gen)
    labels[::4] = -100
    results = []
    for num_threads in (1, 2, 3):
        torch.set_num_threads(num_threads)
        results.append(loss_and_grads(s, t, temperature=2.0, divergence=divergence, labels=labels, ce_weight=0.3))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_extension
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_reduced_loss_compiles_to_the_same_bits(gen, divergence):
    """Eager calls run the reduced op's function directly; torch.compile(fullgraph=True) calls the custom op
    fastkd::kd_loss_reduced: the loss and both gradients (times an incoming gradient of 0.5) are the same bits."""
    s, t = logits(gen, (6, 50)), logits(gen, (6, 50))
    labels = torch.randint(0, 50, (6,), generator=gen)
    labels[1] = -100

    def step(s, t):
        options = dict(temperature=2.0, divergence=divergence, labels=labels, ce_weight=0.5, backend="cpu")
        return fastkd.kd_loss(s, t, **options) * 0.5

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        s_leaf, t_leaf = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        loss = fn(s_leaf, t_leaf)
        loss.backward()
        results.append((loss.detach(), s_leaf.grad, t_leaf.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_extension
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_one_call_gradient_equals_the_row_path(gen, divergence):
    """The reduced loss's one call and the row path (row losses, then a sum and a division in torch) give the same
    loss and gradients to float32 rounding."""
    s, t = logits(gen, (13, 400)), logits(gen, (13, 400))
    labels = torch.randint(0, 400, (13,), generator=gen)
    labels[::5] = -100
    options = dict(temperature=3.0, divergence=divergence, labels=labels, ce_weight=0.4, backend="cpu")
    one_call = loss_and_grads(s, t, **options)
    s_leaf, t_leaf = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    rows = fastkd.kd_loss(s_leaf, t_leaf, reduction="none", **options)
    row_path = rows.sum() / (labels != -100).sum()
    row_path.backward()
    for a, b in zip(one_call, (row_path.detach(), s_leaf.grad, t_leaf.grad)):
        assert_rel_close(a, b, 1e-6)


@needs_extension
def test_no_grad_forward_allocates_no_gradient(gen):
    s, t = logits(gen, (64, 8192)).requires_grad_(True), logits(gen, (64, 8192))
    cpu_backend.empty_cache()
    with torch.no_grad():
        fastkd.kd_loss(s, t, backend="cpu")
    assert cpu_backend.cache_info()["cached_bytes"] == 0


@needs_extension
def test_buffer_pool_reuses_released_gradients(gen):
    s, t = logits(gen, (64, 8192)).requires_grad_(True), logits(gen, (64, 8192))
    cpu_backend.empty_cache()
    (grad,) = torch.autograd.grad(fastkd.kd_loss(s, t, backend="cpu"), s)
    pointer = grad.data_ptr()
    assert cpu_backend.cache_info()["cached_bytes"] == 0  # in use
    del grad
    cached = cpu_backend.cache_info()["cached_bytes"]
    assert cached >= 64 * 8192 * 4
    (grad,) = torch.autograd.grad(fastkd.kd_loss(s, t, backend="cpu"), s)
    assert grad.data_ptr() == pointer and cpu_backend.cache_info()["cached_bytes"] == 0
    kept = grad.clone()
    cpu_backend.empty_cache()  # frees cached blocks only: the live gradient stays valid
    assert torch.equal(grad, kept)
    del grad
    assert cpu_backend.cache_info()["cached_bytes"] == cached
    cpu_backend.empty_cache()
    assert cpu_backend.cache_info()["cached_bytes"] == 0


@needs_extension
def test_buffer_pool_limit_zero_caches_nothing(gen):
    limit = cpu_backend.cache_info()["limit_bytes"]
    try:
        cpu_backend.set_cache_limit(0)
        s, t = logits(gen, (64, 8192)).requires_grad_(True), logits(gen, (64, 8192))
        torch.autograd.grad(fastkd.kd_loss(s, t, backend="cpu"), s)
        assert cpu_backend.cache_info() == {"cached_bytes": 0, "limit_bytes": 0}
    finally:
        cpu_backend.set_cache_limit(limit)


@needs_extension
def test_auto_picks_the_cpu_backend_for_cpu_tensors_of_kernel_dtypes():
    x = torch.zeros(2, 3)
    assert select_backend("auto", x, x) == "cpu"
    assert select_backend("auto", x.bfloat16(), x) == "cpu"
    assert select_backend("auto", x.double(), x.double()) == "reference"
    with pytest.raises(RuntimeError, match="backend='cpu' takes float32, float16 and bfloat16"):
        select_backend("cpu", x.double(), x.double())
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cpu' runs on CPU tensors"):
            select_backend("cpu", x.cuda(), x.cuda())
    info = fastkd.backends()
    assert info["cpu"] and info["cpu_isa"] in CPU_ISAS


def test_without_the_extension_the_package_runs_the_reference():
    """As after an install where the extension could not be built: fastkd imports, reports it, auto uses the
    reference on CPU, and backend='cpu' says why it cannot run."""
    code = """
import sys
sys.modules["fastkd._C"] = None  # makes `from . import _C` fail
import torch, fastkd
from fastkd.dispatch import select_backend
assert not fastkd.backends()["cpu"] and fastkd.backends()["cpu_isa"] is None
x = torch.randn(3, 7)
assert select_backend("auto", x, x) == "reference"
assert fastkd.kd_loss(x, torch.randn(3, 7), temperature=2.0).isfinite()
try:
    fastkd.kd_loss(x, x, backend="cpu")
except RuntimeError as exc:
    assert "fastkd._C, which was not built" in str(exc), exc
else:
    raise AssertionError("backend='cpu' ran without the extension")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(os.environ.get("FASTKD_REQUIRE_CPU_EXTENSION") != "1", reason="set by .ci/run")
def test_extension_was_built_where_it_must_be():
    assert cpu_backend.AVAILABLE, cpu_backend.IMPORT_ERROR


@needs_extension
def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown instruction set"):
        cpu_backend.set_isa("sse9")


@needs_extension
def test_teacher_only_gradient_takes_the_backward_kernel(gen):
    """When only the teacher wants a gradient the forward does not write a student gradient it would drop."""

    def kernel_node(loss):
        nodes = [loss.grad_fn]
        while nodes:
            node = nodes.pop()
            if hasattr(node, "fused_grads"):
                return node
            nodes += [next_node for next_node, _ in node.next_functions if next_node is not None]
        raise AssertionError("no kd_loss kernel node in the graph")

    s, t = logits(gen, (8, 300)), logits(gen, (8, 300))
    assert kernel_node(fastkd.kd_loss(s.requires_grad_(True), t, backend="cpu")).fused_grads is not None
    s, t = s.detach(), t.requires_grad_(True)
    loss = fastkd.kd_loss(s, t, temperature=2.0, backend="cpu")
    assert kernel_node(loss).fused_grads is None
    (grad,) = torch.autograd.grad(loss, t)
    want = torch.autograd.grad(fastkd.kd_loss(s, t, temperature=2.0, backend="reference"), t)[0]
    assert_rel_close(grad, want, 1e-5)
