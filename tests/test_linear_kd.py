"""linear_kd_loss: every backend against float64 truth (tests/float64_truth.py, computed from the heads' logits in
float64) and against its specification (kd_loss on materialised logits), chunking, heads, and the API contract."""

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import linear_kd
from fastkd.linear_kd import default_chunk_rows, linear_kd_loss, linear_kd_loss_reference

import float64_truth as truth
from conftest import DEVICE, assert_rel_close, backend_device, skip_unless_available

DIVERGENCES = fastkd.kd.DIVERGENCES
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
BACKENDS = ("triton", "cpu", "reference")


def device_of(backend):
    skip_unless_available(backend)
    return backend_device(backend) if backend != "reference" else torch.device("cpu")


def heads(gen, num_rows, vocab, *, hidden=16, teacher_hidden=24, teacher_vocab=None, dtype=torch.float32, device):
    """Student hidden (N, H) / weight (V, H) / bias (V,) that require grad; teacher hidden, weight and bias."""

    def draw(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    s = [draw(num_rows, hidden), draw(vocab, hidden, scale=0.5), draw(vocab)]
    for x in s:
        x.requires_grad_()
    teacher_vocab = teacher_vocab or vocab
    t = [draw(num_rows, teacher_hidden), draw(teacher_vocab, teacher_hidden, scale=0.5), draw(teacher_vocab)]
    return s, t


def float64_logits(hidden, weight, bias, vocab, softcap=None):
    z = hidden.double() @ weight.double()[:vocab].T
    if bias is not None:
        z = z + bias.double()[:vocab]
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def truth_and_grads(student, teacher, vocab, *, grad_output=None, softcap=None, topk=None, **options):
    """The float64 truth of linear_kd_loss and its gradients w.r.t. the student's hidden, weight and bias."""
    leaves = [x.detach().double().requires_grad_() for x in student]
    z_s = float64_logits(*leaves, vocab, softcap)
    if topk is not None:
        loss = truth.kd_topk_loss(z_s, topk.values.double(), topk.indices, **options)
    else:
        if isinstance(teacher, torch.Tensor):
            z_t = teacher.double()[..., :vocab]
        else:
            z_t = float64_logits(*teacher, vocab, softcap)
        divergence = options.pop("divergence", "kl")
        loss = truth.kd_loss(z_s, z_t, divergence_kind=divergence, **options)
    grads = torch.autograd.grad(loss, leaves, grad_output if grad_output is not None else torch.ones_like(loss))
    return loss.detach(), grads


def check(actual, grads, expected, expected_grads, rtol, what):
    assert_rel_close(actual, expected, rtol, what=f"{what}: loss")
    for name, g, e in zip(("hidden", "weight", "bias"), grads, expected_grads):
        assert_rel_close(g, e, rtol, what=f"{what}: grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_matches_float64_truth(gen, backend, divergence):
    device = device_of(backend)
    num_rows, vocab = 37, 50  # 37 = 4 chunks of 8 and one of 5
    (h, w, b), (th, tw, tb) = heads(gen, num_rows, vocab, device=device)
    labels = torch.randint(0, vocab, (num_rows,), generator=gen)
    labels[torch.rand(num_rows, generator=gen) < 0.3] = -100
    labels = labels.to(device)
    options = dict(temperature=2.0, divergence=divergence, labels=labels, ce_weight=0.3)
    loss = linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb, chunk_rows=8, backend=backend, **options)
    grads = torch.autograd.grad(loss, (h, w, b))
    expected, expected_grads = truth_and_grads((h, w, b), (th, tw, tb), vocab, **options)
    check(loss, grads, expected, expected_grads, RTOL[torch.float32], f"{backend} {divergence}")


@pytest.mark.parametrize("backend", ("triton", "cpu"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_heads_within_1e_2_of_float64_truth(gen, backend, dtype):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 21, 40, dtype=dtype, device=device)
    loss = linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb, temperature=2.0, chunk_rows=8, backend=backend)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert all(g.dtype == dtype for g in grads)
    expected, expected_grads = truth_and_grads((h, w, b), (th, tw, tb), 40, temperature=2.0)
    check(loss, grads, expected, expected_grads, RTOL[dtype], f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ("none", "sum", "batchmean"))
def test_reductions_and_incoming_gradients(gen, backend, reduction):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 2 * 9, 30, device=device)
    h3 = h.reshape(2, 9, 16)  # (B, L, H) hidden states
    th3 = th.reshape(2, 9, 24)
    labels = torch.randint(0, 30, (2, 9), generator=gen)
    labels[0, :4] = -100
    labels = labels.to(device)
    options = dict(temperature=1.5, labels=labels, ce_weight=0.5, reduction=reduction, divergence="reverse_kl")
    loss = linear_kd_loss(h3, w, th3, tw, student_bias=b, teacher_bias=tb, chunk_rows=4, backend=backend, **options)
    assert loss.shape == ((2, 9) if reduction == "none" else ())
    grad_output = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(loss, (h, w, b), grad_output.float().to(device))
    expected, expected_grads = truth_and_grads((h3, w, b), (th3, tw, tb), 30, grad_output=grad_output, **options)
    expected_grads = (expected_grads[0].reshape(h.shape),) + expected_grads[1:]
    check(loss, grads, expected, expected_grads, RTOL[torch.float32], f"{backend} {reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_gives_zero_loss_and_gradients(gen, backend):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 6, 20, device=device)
    labels = torch.full((6,), -100, device=device)
    loss = linear_kd_loss(h, w, th, tw, student_bias=b, labels=labels, ce_weight=1.0, chunk_rows=4, backend=backend)
    grads = torch.autograd.grad(loss, (h, w, b))
    assert loss.item() == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_rows", (0, 3))
def test_fewer_rows_than_a_chunk_and_no_rows(gen, backend, num_rows):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, num_rows, 20, device=device)
    loss = linear_kd_loss(
        h, w, th, tw, student_bias=b, teacher_bias=tb, temperature=3.0, chunk_rows=64, backend=backend
    )
    grads = torch.autograd.grad(loss, (h, w, b))
    expected, expected_grads = truth_and_grads((h, w, b), (th, tw, tb), 20, temperature=3.0)
    check(loss, grads, expected, expected_grads, RTOL[torch.float32], f"{backend} N={num_rows}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_drops_padded_rows_of_both_heads(gen, backend):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 11, 53, teacher_vocab=60, device=device)
    loss = linear_kd_loss(
        h, w, th, tw, student_bias=b, teacher_bias=tb, vocab_size=50, temperature=2.0, chunk_rows=4, backend=backend
    )
    grads = torch.autograd.grad(loss, (h, w, b))
    expected, expected_grads = truth_and_grads((h, w, b), (th, tw, tb), 50, temperature=2.0)
    check(loss, grads, expected, expected_grads, RTOL[torch.float32], f"{backend} vocab_size")
    assert torch.equal(grads[1][50:], torch.zeros_like(grads[1][50:]))  # absent classes: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_logit_softcap_and_its_gradient(gen, backend):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 13, 30, device=device)
    with torch.no_grad():
        w.mul_(8)  # logits well into tanh's curve
    options = dict(temperature=2.0, divergence="jsd")
    loss = linear_kd_loss(
        h, w, th, tw, student_bias=b, teacher_bias=tb, logit_softcap=4.0, chunk_rows=4, backend=backend, **options
    )
    grads = torch.autograd.grad(loss, (h, w, b))
    expected, expected_grads = truth_and_grads((h, w, b), (th, tw, tb), 30, softcap=4.0, **options)
    check(loss, grads, expected, expected_grads, RTOL[torch.float32], f"{backend} softcap")


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_teacher_logits(gen, backend):
    device = device_of(backend)
    (h, w, b), _ = heads(gen, 10, 30, device=device)
    teacher = (torch.randn(10, 34, generator=gen) * 3).to(device)  # a teacher with 4 padded columns
    options = dict(temperature=2.0, divergence="kl")
    loss = linear_kd_loss(
        h, w, student_bias=b, teacher_logits=teacher, vocab_size=30, chunk_rows=3, backend=backend, **options
    )
    grads = torch.autograd.grad(loss, (h, w, b))
    expected, expected_grads = truth_and_grads((h, w, b), teacher, 30, **options)
    check(loss, grads, expected, expected_grads, RTOL[torch.float32], f"{backend} teacher logits")


@pytest.mark.parametrize("backend", ("triton", "auto"))
@pytest.mark.parametrize("tail", ("bucket", "renormalize"))
def test_topk_teacher(gen, backend, tail):
    """Triton's TopK kernels, and on CPU tensors ("auto") the reference rows chunk by chunk."""
    device = DEVICE if backend == "triton" else torch.device("cpu")
    (h, w, b), _ = heads(gen, 12, 40, device=device)
    top = fastkd.topk_teacher(torch.randn(12, 40, generator=gen).to(device) * 3, 6)
    labels = torch.tensor([3, -100] * 6, device=device)
    options = dict(temperature=2.0, labels=labels, ce_weight=0.2, tail=tail)
    loss = linear_kd_loss(h, w, student_bias=b, teacher_logits=top, chunk_rows=5, backend=backend, **options)
    grads = torch.autograd.grad(loss, (h, w, b))
    expected, expected_grads = truth_and_grads((h, w, b), None, 40, topk=top, **options)
    check(loss, grads, expected, expected_grads, RTOL[torch.float32], f"{backend} TopK {tail}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_its_specification_with_stats(gen, backend):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 9, 25, device=device)
    labels = torch.tensor([0, 1, -100, 3, 4, 5, 6, 7, 8], device=device)
    options = dict(temperature=2.0, labels=labels, ce_weight=0.1, return_stats=True)
    loss, stats = linear_kd_loss(
        h, w, th, tw, student_bias=b, teacher_bias=tb, chunk_rows=2, backend=backend, **options
    )
    ref_loss, ref_stats = linear_kd_loss_reference(h, w, th, tw, student_bias=b, teacher_bias=tb, **options)
    assert_rel_close(loss, ref_loss, 1e-5, what="loss")
    assert stats.keys() == ref_stats.keys()
    for key in stats:
        assert_rel_close(stats[key], ref_stats[key], 1e-5, atol=1e-6, what=key)


@pytest.mark.parametrize("backend", ("triton", "cpu"))
def test_frozen_head_allocates_no_weight_gradient(gen, backend, monkeypatch):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 8, 20, device=device)
    w.requires_grad_(False)
    asked = []
    chunks = linear_kd._chunks

    def spy(*args, wants, **kwargs):
        asked.append(wants)
        return chunks(*args, wants=wants, **kwargs)

    monkeypatch.setattr(linear_kd, "_chunks", spy)
    loss = linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb, chunk_rows=4, backend=backend)
    grads = torch.autograd.grad(loss, (h, b))
    assert asked == [(True, False, True)]
    expected, expected_grads = truth_and_grads((h, w, b), (th, tw, tb), 20)
    assert_rel_close(grads[0], expected_grads[0], 1e-5, what="grad hidden")
    assert_rel_close(grads[1], expected_grads[2], 1e-5, what="grad bias")


def test_teacher_gets_no_gradient(gen):
    (h, w, b), (th, tw, tb) = heads(gen, 8, 20, device="cpu")
    th.requires_grad_()
    loss = linear_kd_loss(h, w, th, tw)
    assert loss.grad_fn is not None
    loss.backward()
    assert th.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_over_gradient_accumulation_equals_one_batch(gen, backend):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 12, 20, device=device)
    labels = torch.tensor([1, -100, 2, 3, -100, 5, 6, 7, 8, -100, -100, 11], device=device)
    counted = (labels != -100).sum()
    options = dict(temperature=2.0, labels=labels, ce_weight=0.5, chunk_rows=4, backend=backend)
    whole = linear_kd_loss(h, w, th, tw, student_bias=b, **options)
    expected = torch.autograd.grad(whole, (h, w, b))
    total = 0
    for rows in (slice(0, 5), slice(5, 12)):
        micro = dict(options, labels=labels[rows])
        part = linear_kd_loss(h[rows], w, th[rows], tw, student_bias=b, normalizer=counted, **micro)
        part.backward()
        total = total + part.detach()
    assert_rel_close(total, whole, 1e-6, what="loss")
    for g, e, name in zip((h.grad, w.grad, b.grad), expected, ("hidden", "weight", "bias")):
        assert_rel_close(g, e, 1e-6, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_second_backward_through_retained_graph(gen, backend, reduction):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 10, 20, device=device)
    loss = linear_kd_loss(h, w, th, tw, student_bias=b, reduction=reduction, chunk_rows=4, backend=backend).sum()
    first = [g.clone() for g in torch.autograd.grad(loss, (h, w, b), retain_graph=True)]
    second = torch.autograd.grad(loss, (h, w, b))
    for f, s in zip(first, second):
        assert_rel_close(s, f, 1e-6, what="second backward")


def test_create_graph_is_refused(gen):
    (h, w, b), (th, tw, tb) = heads(gen, 4, 10, device="cpu")
    loss = linear_kd_loss(h, w, th, tw)
    (g,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("backend", ("triton", "cpu"))
def test_compile_fullgraph(gen, backend):
    device = device_of(backend)
    (h, w, b), (th, tw, tb) = heads(gen, 10, 20, device=device)
    labels = torch.tensor([1, 2, -100, 4, 5, 6, 7, 8, 9, 0], device=device)

    def step(h, w, b):
        return linear_kd_loss(h, w, th, tw, student_bias=b, labels=labels, ce_weight=0.5, chunk_rows=4, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(h, w, b)
    grads = torch.autograd.grad(loss, (h, w, b))
    expected = step(h, w, b)
    expected_grads = torch.autograd.grad(expected, (h, w, b))
    check(loss, grads, expected, expected_grads, 1e-6, f"compiled {backend}")


def test_linear_kd_loss_module_with_linear_and_tied_embedding_heads(gen):
    student_head = torch.nn.Linear(16, 30)
    embedding = torch.nn.Embedding(30, 24)  # a teacher whose lm_head is tied to its embedding
    loss_fn = fastkd.LinearKDLoss(student_head, embedding, temperature=2.0, chunk_rows=4)
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    h, th = torch.randn(2, 5, 16, generator=gen, requires_grad=True), torch.randn(2, 5, 24, generator=gen)
    loss = loss_fn(h, th)
    loss.backward()
    expected = fastkd.kd_loss(student_head(h), th @ embedding.weight.T, temperature=2.0, backend="reference")
    assert_rel_close(loss, expected, 1e-5, what="module")
    assert student_head.weight.grad is not None and embedding.weight.grad is None


def test_half_precision_weight_gradient_in_blocks_equals_one_product(gen):
    """The float16/bfloat16 weight-gradient update runs in blocks of rows no larger than the chunk's logits."""
    accumulator = torch.zeros(50, 7)
    a = torch.randn(50, 3, generator=gen).to(torch.bfloat16)  # 150 elements: blocks of 150 // 7 = 21 rows
    b = torch.randn(3, 7, generator=gen).to(torch.bfloat16)
    linear_kd._add_product(accumulator, a, b)
    assert torch.equal(accumulator, torch.mm(a, b).float())


def test_default_chunk_rows_rule():
    assert default_chunk_rows(4096, 1024, 32000) == 512
    assert default_chunk_rows(8192, 4096, 128256) == 512
    assert default_chunk_rows(10, 8, 1 << 25) == 1  # a vocabulary larger than the budget: one row at a time
    assert default_chunk_rows(3, 8, 64) == 1 << 18


def test_bad_input_names_the_argument(gen):
    (h, w, b), (th, tw, tb) = heads(gen, 4, 10, device="cpu")
    cases = [
        (dict(student_weight=torch.randn(10, 15)), ValueError, "student_weight must have shape"),
        (dict(teacher_weight=torch.randn(12, 24)), ValueError, "give vocab_size"),
        (dict(student_weight=w.detach().double()), TypeError, "student_weight must have the dtype"),
        (dict(student_bias=torch.randn(9)), ValueError, "student_bias must have shape"),
        (dict(teacher_hidden=torch.randn(5, 24)), ValueError, "teacher_hidden must have the leading dims"),
        (dict(teacher_weight=torch.randn(10, 24, device="meta")), ValueError, "teacher_weight must be on the device"),
        (dict(teacher_logits=torch.randn(4, 10)), ValueError, "either as teacher_hidden"),
        (dict(teacher_weight=None), ValueError, "needs both teacher_hidden and teacher_weight"),
        (dict(vocab_size=11), ValueError, "vocab_size must lie in"),
        (dict(logit_softcap=0.0), ValueError, "logit_softcap"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(labels=torch.tensor([1, 2, 10, 3])), ValueError, "labels must lie in"),
        (dict(tail="bucket"), ValueError, "tail applies to a TopK teacher"),
    ]
    base = dict(student_hidden=h, student_weight=w, teacher_hidden=th, teacher_weight=tw)
    for change, error, message in cases:
        args = dict(base, **change)
        with pytest.raises(error, match=message):
            linear_kd_loss(
                args.pop("student_hidden"),
                args.pop("student_weight"),
                args.pop("teacher_hidden"),
                args.pop("teacher_weight"),
                **args,
            )
    top = fastkd.topk_teacher(torch.randn(4, 10), 3)  # the C++ backend takes a TopK teacher too
    assert_rel_close(
        linear_kd_loss(h, w, teacher_logits=top, backend="cpu"),
        linear_kd_loss(h, w, teacher_logits=top, backend="reference"),
        1e-5,
    )


def test_eager_expression_agrees(gen):
    """The docstring's claim: with the defaults it is F.kl_div on the heads' log-softmax times T²."""
    (h, w, b), (th, tw, tb) = heads(gen, 7, 20, device="cpu")
    loss = linear_kd_loss(h, w, th, tw, student_bias=b, teacher_bias=tb, temperature=3.0)
    z_s, z_t = F.linear(h, w, b), F.linear(th, tw, tb)
    eager = F.kl_div(F.log_softmax(z_s / 3, -1), F.log_softmax(z_t / 3, -1), log_target=True, reduction="batchmean")
    assert_rel_close(loss, eager * 9, 1e-5, what="eager")


def test_distiller_linear_kd_term_equals_kd_loss_on_the_logits(gen):
    """A Distiller over headless models with a LinearKD term: the loss and the gradients of the student's body and
    head are those of kd_loss + CE on the logits the heads would give."""
    from fastkd.distiller import KD, Distiller, LinearKD

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    student_body = torch.nn.Sequential(torch.nn.Embedding(40, 16), torch.nn.Linear(16, 16))
    teacher_body = torch.nn.Sequential(torch.nn.Embedding(40, 24), torch.nn.Linear(24, 24))
    student_head, teacher_head = torch.nn.Linear(16, 40), torch.nn.Linear(24, 40, bias=False)
    tokens = torch.randint(0, 40, (2, 7), generator=gen)
    labels = torch.randint(0, 40, (2, 7), generator=gen)
    labels[0, :3] = -100
    term = LinearKD(student_head, teacher_head, temperature=2.0, ce_weight=0.5, chunk_rows=4)
    distiller = Distiller(student_body, teacher_body, terms={"kd": term})
    out = distiller(tokens, labels)
    assert out.output.shape == (2, 7, 16) and set(out.metrics) == set(fastkd.kd.FIDELITY_METRICS)
    params = [*student_body.parameters(), *student_head.parameters()]
    grads = torch.autograd.grad(out.loss, params)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_body(tokens))
    expected = fastkd.kd_loss(
        student_head(student_body(tokens)),
        teacher_logits,
        temperature=2.0,
        labels=labels,
        ce_weight=0.5,
        backend="reference",
    )
    expected_grads = torch.autograd.grad(expected, params)
    assert_rel_close(out.loss, expected, 1e-5, what="loss")
    for g, e in zip(grads, expected_grads):
        assert_rel_close(g, e, 1e-5, what="grad")
    with pytest.raises(ValueError, match="cannot share a Distiller"):
        Distiller(student_body, teacher_body, terms={"kd": term, "logits": KD()})
