"""Relational KD (RKD): the memory-light distance and angle losses against the reference (the authors' (B, B, D)
formulation) in float64 and float32, degenerate batches (B = 1, 2, duplicate embeddings: finite, no NaN), odd
widths, gradcheck, the teacher without gradient, bad input, and the Distiller's RKD term."""

import pytest
import torch

import fastkd
from fastkd import reference, relational

from conftest import assert_rel_close


def embeddings(gen, batch, width, dtype=torch.float64, scale=1.0):
    return (torch.randn(batch, width, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("part", ["rkd_distance_loss", "rkd_angle_loss"])
@pytest.mark.parametrize("batch, student_width, teacher_width", [(1, 3, 5), (2, 4, 4), (7, 5, 9), (37, 17, 33)])
def test_matches_the_reference_in_float64(gen, part, batch, student_width, teacher_width):
    s = embeddings(gen, batch, student_width).requires_grad_()
    t = embeddings(gen, batch, teacher_width)
    got, want = getattr(relational, part)(s, t), getattr(reference, part)(s, t)
    assert got.isfinite() and got.dtype == torch.float64
    assert_rel_close(got, want, 1e-12)
    (grad,) = torch.autograd.grad(got, s)
    assert_rel_close(grad, torch.autograd.grad(want, s)[0], 1e-10)


def test_duplicate_embeddings_have_zero_distances_and_no_nan(gen):
    s, t = embeddings(gen, 6, 4), embeddings(gen, 6, 3)
    s[4] = s[1]
    t[2] = t[5] = t[0]
    s.requires_grad_()
    for part in ("rkd_distance_loss", "rkd_angle_loss"):
        got, want = getattr(relational, part)(s, t), getattr(reference, part)(s, t)
        assert_rel_close(got, want, 1e-12)
        (grad,) = torch.autograd.grad(got, s)
        assert grad.isfinite().all()
        assert_rel_close(grad, torch.autograd.grad(want, s)[0], 1e-10)
    same = embeddings(gen, 1, 4).expand(5, 4).clone().requires_grad_()  # every distance 0
    loss = fastkd.rkd_loss(same, embeddings(gen, 5, 4))
    loss.backward()
    assert loss.isfinite() and same.grad.isfinite().all()


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_low_precision_inputs_match_the_float64_reference(gen, dtype, rtol):
    s, t = embeddings(gen, 40, 24), embeddings(gen, 40, 12)
    got = fastkd.rkd_loss(s.to(dtype), t.to(dtype))
    assert got.dtype == torch.float32
    want = 25 * reference.rkd_distance_loss(s.to(dtype).double(), t.to(dtype).double())
    want = want + 50 * reference.rkd_angle_loss(s.to(dtype).double(), t.to(dtype).double())
    assert_rel_close(got, want, rtol)


def test_gradcheck_in_float64(gen):
    s, t = embeddings(gen, 5, 3).requires_grad_(), embeddings(gen, 5, 4)
    assert torch.autograd.gradcheck(lambda x: fastkd.rkd_loss(x, t), (s,))


def test_blocks_of_anchors_give_the_one_block_result(gen, monkeypatch):
    s, t = embeddings(gen, 19, 6).requires_grad_(), embeddings(gen, 19, 6)
    whole = relational.rkd_angle_loss(s, t)
    (whole_grad,) = torch.autograd.grad(whole, s)
    monkeypatch.setattr(relational, "ANCHOR_BLOCK_ELEMENTS", 19 * 19 * 3)  # blocks of 3 anchors
    blocks = relational.rkd_angle_loss(s, t)
    assert_rel_close(blocks, whole, 1e-12)
    assert_rel_close(torch.autograd.grad(blocks, s)[0], whole_grad, 1e-12)


def test_the_teacher_gets_no_gradient(gen):
    s, t = embeddings(gen, 6, 4).requires_grad_(), embeddings(gen, 6, 4).requires_grad_()
    fastkd.rkd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(4), torch.randn(4, 3)), ValueError, "student embeddings must have shape"),
        (lambda: (torch.randn(4, 3), torch.randn(5, 3)), ValueError, "the same batch"),
        (lambda: (torch.randn(4, 3), torch.ones(4, 3, dtype=torch.int64)), TypeError, "teacher embeddings must be"),
    ],
)
def test_bad_input_names_the_argument(make, error, match):
    s, t = make()
    with pytest.raises(error, match=match):
        fastkd.rkd_loss(s, t)
    with pytest.raises(ValueError, match="angle_weight must be a number >= 0"):
        fastkd.rkd_loss(torch.randn(3, 2), torch.randn(3, 2), angle_weight=-1.0)


def test_the_distiller_rkd_term_reads_the_named_embeddings(gen):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    terms = {"rkd": fastkd.distiller.RKD("1", "1", distance_weight=2.0, angle_weight=3.0)}
    distiller = fastkd.Distiller(student, teacher, terms=terms)
    x = embeddings(gen, 8, 6, torch.float32)
    out = distiller(x)
    want = fastkd.rkd_loss(student[:2](x), teacher[:2](x), distance_weight=2.0, angle_weight=3.0)
    assert torch.equal(out.losses["rkd"], want)


def float64_graph(x, knn=None):
    """The normalised graph written out: cosine similarities, zero diagonal, optional symmetric kNN, D^-1/2 A D^-1/2."""
    x = x.flatten(1).double()
    x = x / x.norm(dim=1, keepdim=True)
    a = x @ x.T
    a.fill_diagonal_(0)
    if knn is not None:
        keep = torch.zeros_like(a, dtype=torch.bool)
        for i in range(a.shape[0]):
            others = [j for j in range(a.shape[0]) if j != i]
            best = sorted(others, key=lambda j: -float(a[i, j]))[:knn]
            keep[i, best] = True
        a = torch.where(keep | keep.T, a, 0)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


@pytest.mark.parametrize("knn", [None, 2])
def test_graph_kd_loss_is_the_mean_squared_difference_of_the_normalised_graphs(gen, knn):
    layers_s = [embeddings(gen, 6, 5).abs(), embeddings(gen, 6, 12).abs().reshape(6, 3, 4)]  # post-ReLU-like
    layers_t = [embeddings(gen, 6, 7).abs(), embeddings(gen, 6, 2).abs()]
    got = fastkd.graph_kd_loss(layers_s, layers_t, knn=knn)
    want = sum(((float64_graph(s, knn) - float64_graph(t, knn)) ** 2).mean() for s, t in zip(layers_s, layers_t)) / 2
    assert_rel_close(got, want, 1e-12)
    single = fastkd.graph_kd_loss(layers_s[0], layers_t[0].float(), knn=knn)
    assert_rel_close(single, ((float64_graph(layers_s[0], knn) - float64_graph(layers_t[0], knn)) ** 2).mean(), 1e-6)


def test_graph_kd_loss_degenerate_batches_and_gradient(gen):
    for batch in (1, 2):
        s = embeddings(gen, batch, 3).requires_grad_()
        loss = fastkd.graph_kd_loss(s, embeddings(gen, batch, 4))
        loss.backward()
        assert loss.isfinite() and s.grad.isfinite().all()
    s = embeddings(gen, 5, 3).abs().requires_grad_()
    t = embeddings(gen, 5, 4).abs()
    assert torch.autograd.gradcheck(lambda x: fastkd.graph_kd_loss(x, t), (s,))
    with pytest.raises(ValueError, match="as many student as teacher layers"):
        fastkd.graph_kd_loss([s], [t, t])
    with pytest.raises(ValueError, match="knn must be an int >= 1"):
        fastkd.graph_kd_loss(s, t, knn=0)


def test_the_distiller_graph_term_reads_the_named_layers(gen):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    distiller = fastkd.Distiller(student, teacher, terms={"graph": fastkd.distiller.GraphKD(["1", "2"], ["1", "2"])})
    x = embeddings(gen, 8, 6, torch.float32)
    want = fastkd.graph_kd_loss([student[:2](x), student(x)], [teacher[:2](x), teacher(x)])
    assert torch.equal(distiller(x).losses["graph"], want)


def crd_reference_step(crd, f_s, f_t, contrast_index):
    """One step of CRD as RepDistiller computes it (its gathered (B, K+1, d) rows), on a copy of ``crd``: the loss
    (Z from this batch when not set yet) and the banks after the momentum update."""
    z = crd.normalizers.clone()
    v_s = torch.nn.functional.normalize(crd.embed_student(f_s.flatten(1)), dim=1)
    v_t = torch.nn.functional.normalize(crd.embed_teacher(f_t.flatten(1)), dim=1)
    u_s = reference.crd_scores(crd.teacher_bank, contrast_index, v_s)
    u_t = reference.crd_scores(crd.student_bank, contrast_index, v_t)
    for slot, u in enumerate((u_s, u_t)):
        if z[slot] < 0:
            z[slot] = torch.exp(u / crd.temperature).mean().detach() * crd.num_samples
    options = dict(temperature=crd.temperature, num_samples=crd.num_samples)
    loss = reference.crd_nce_loss(u_s, z[0], **options) + reference.crd_nce_loss(u_t, z[1], **options)
    banks = []
    with torch.no_grad():
        index = contrast_index[:, 0]
        for bank, v in ((crd.student_bank, v_s), (crd.teacher_bank, v_t)):
            rows = bank[index] * crd.momentum + v * (1 - crd.momentum)
            banks.append(bank.index_copy(0, index, rows / rows.norm(dim=1, keepdim=True)))
    return loss, banks


def assert_crd_steps_follow_the_authors(crd, twin, gen, *, loss_rtol, grad_rtol, bank_rtol=None, features=None):
    """Three steps of ``crd`` against :func:`crd_reference_step` on ``twin`` (float64), with positives among the
    negatives: the losses, the parameters' gradients and the banks (bank_rtol None: the same bits). ``features``
    puts the float64 features where ``crd`` takes them."""
    num_samples, num_negatives = crd.num_samples, crd.num_negatives
    for step in range(3):
        f_s, f_t = embeddings(gen, 8, 5), embeddings(gen, 8, 9)
        index = torch.randperm(num_samples, generator=gen)[:8]
        negatives = torch.randint(num_samples, (8, num_negatives), generator=gen)
        negatives[0, :3] = index[0]  # the positive among its own negatives, and other rows' positives too
        negatives[1, :2] = index[2]
        contrast_index = torch.cat([index[:, None], negatives], 1)
        inputs = (f_s, f_t) if features is None else (features(f_s), features(f_t))
        loss = crd(*inputs, index, contrast_index)
        want, banks = crd_reference_step(twin, f_s, f_t, contrast_index)
        assert_rel_close(loss, want, loss_rtol, what=f"loss at step {step}")
        got_grads = torch.autograd.grad(loss, list(crd.parameters()))
        want_grads = torch.autograd.grad(want, list(twin.parameters()))
        for got, expected in zip(got_grads, want_grads):
            assert_rel_close(got, expected, grad_rtol, what=f"gradient at step {step}")
        with torch.no_grad():
            twin.student_bank.copy_(banks[0])
            twin.teacher_bank.copy_(banks[1])
            twin.normalizers.copy_(crd.normalizers)
        for got, expected in ((crd.student_bank, twin.student_bank), (crd.teacher_bank, twin.teacher_bank)):
            if bank_rtol is None:
                assert torch.equal(got, expected)
            else:
                assert_rel_close(got, expected, bank_rtol, what=f"bank at step {step}")


@pytest.mark.parametrize("num_samples", [60, 3000])  # one matrix product for all N scores, or gathered blocks
def test_crd_matches_the_authors_algorithm_over_steps(gen, num_samples, monkeypatch):
    import copy

    monkeypatch.setattr(relational, "CONTRAST_BLOCK", 7)
    torch.manual_seed(1)
    crd = relational.CRDLoss(num_samples, 5, 9, feat_dim=6, num_negatives=20, seed=4).double()
    assert_crd_steps_follow_the_authors(crd, copy.deepcopy(crd), gen, loss_rtol=1e-12, grad_rtol=1e-10)


def test_crd_negatives_are_deterministic_for_a_seed_and_checkpointed(gen):
    f_s, f_t, index = embeddings(gen, 4, 3, torch.float32), embeddings(gen, 4, 3, torch.float32), torch.arange(4)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        crd = relational.CRDLoss(100, 3, 3, feat_dim=4, num_negatives=16, seed=11)
        runs.append([crd(f_s, f_t, index).detach() for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    torch.manual_seed(0)
    crd = relational.CRDLoss(100, 3, 3, feat_dim=4, num_negatives=16, seed=11)
    crd(f_s, f_t, index)
    state = {
        key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in crd.state_dict().items()
    }
    after = crd(f_s, f_t, index).detach()
    restored = relational.CRDLoss(100, 3, 3, feat_dim=4, num_negatives=16, seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored(f_s, f_t, index).detach(), after)  # banks, Z and the generator's state restored


def test_crd_refuses_bad_indices(gen):
    crd = relational.CRDLoss(10, 3, 3, feat_dim=4, num_negatives=5)
    f = embeddings(gen, 2, 3, torch.float32)
    with pytest.raises(ValueError, match=r"must lie in \[0, num_samples=10\)"):
        crd(f, f, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="index must be an int tensor of shape \\(2,\\)"):
        crd(f, f, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="column 0"):
        crd(f, f, torch.tensor([0, 1]), torch.tensor([[1, 2], [0, 3]]))
    with pytest.raises(ValueError, match="num_negatives must be an int >= 1"):
        relational.CRDLoss(10, 3, 3, num_negatives=0)
    with pytest.raises(ValueError, match="at least one sample"):
        crd(f[:0], f[:0], torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="backend must be one of"):
        relational.CRDLoss(10, 3, 3, backend="gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.rkd_loss(f, f, backend="gpu")
    in_float64 = relational.CRDLoss(10, 3, 3, feat_dim=4, num_negatives=5, backend="cpu").double()
    with pytest.raises(RuntimeError, match="use backend='reference' for other dtypes"):
        in_float64(f.double(), f.double(), torch.tensor([0, 1]))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_crd_in_half_precision_keeps_z_and_the_loss_in_float32(gen, half):
    """Scores of aligned pairs pass τ·ln(65504) ≈ 0.78, where exp(u/τ) overflows fp16, and Z ≈ exp(1/τ)·N lies past
    it: Z stays float32 and the loss is taken in float32, against float64 math on the same rounded module."""
    import copy

    torch.manual_seed(0)
    crd = relational.CRDLoss(50, 4, 4, feat_dim=3, num_negatives=9, temperature=0.07)
    index = torch.arange(6)
    contrast_index = torch.cat([index[:, None], torch.randint(50, (6, 9), generator=gen)], 1)
    f = embeddings(gen, 6, 4, torch.float32)
    with torch.no_grad():
        crd.embed_teacher.load_state_dict(crd.embed_student.state_dict())
        crd.student_bank[:6] = crd.teacher_bank[:6] = torch.nn.functional.normalize(crd.embed_student(f), dim=1)
    crd(f, f, index, contrast_index)  # Z from a first batch
    half_crd = crd.to(half)
    assert half_crd.normalizers.dtype == torch.float32 and half_crd.student_bank.dtype == half
    twin = copy.deepcopy(half_crd).double()
    loss = half_crd(f.to(half), f.to(half), index, contrast_index)
    want, _ = crd_reference_step(twin, f.to(half).double(), f.to(half).double(), contrast_index)
    assert loss.dtype == torch.float32 and loss.isfinite()
    assert_rel_close(loss, want, 1e-2)
    with torch.no_grad():  # a forward without grad mode takes no gradient, and gives the same loss
        assert half_crd(f.to(half), f.to(half), index, contrast_index).isfinite()


@pytest.mark.parametrize("compiled", [False, True])
def test_a_backward_after_another_forward_keeps_its_own_gradient(gen, compiled):
    """Gradient accumulation: the second forward moves bank rows the first one scored (the positives of one are
    the negatives of the other), yet each loss's gradient is the one of the bank it was scored against; also
    compiled with inductor, which may reuse the bank's memory in place."""
    import copy

    crd = relational.CRDLoss(500, 5, 4, feat_dim=6, num_negatives=7)
    s, t = embeddings(gen, 9, 5, torch.float32), embeddings(gen, 9, 4, torch.float32)
    batches = []
    for _ in range(2):
        index = torch.randperm(500, generator=gen)[:9]
        batches.append(torch.cat([index[:, None], torch.randint(500, (9, 7), generator=gen)], 1))
    batches[1][:, 1:4] = batches[0][:, :3]
    crd(s, t, batches[0][:, 0], batches[0])  # Z from a first batch
    alone = copy.deepcopy(crd)
    leaf = s.clone().requires_grad_()
    want = torch.autograd.grad(alone(leaf, t, batches[1][:, 0], batches[1]), leaf)[0]
    step = torch.compile(crd, fullgraph=True) if compiled else crd
    leaf = s.clone().requires_grad_()
    first = step(leaf, t, batches[1][:, 0], batches[1])
    step(s, t, batches[0][:, 0], batches[0])
    assert_rel_close(torch.autograd.grad(first, leaf)[0], want, 1e-6)


def test_the_distiller_crd_term_trains_its_heads_and_checkpoints_its_banks(gen):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    term = fastkd.distiller.CRD("1", "1", num_samples=50, student_dim=5, teacher_dim=9, num_negatives=12)
    distiller = fastkd.Distiller(student, teacher, terms={"crd": term})
    assert any(p is term.crd.embed_student.weight for p in distiller.parameters())
    assert "adapters.crd.student_bank" in distiller.state_dict()
    x = embeddings(gen, 4, 6, torch.float32)
    with pytest.raises(ValueError, match="sample_ids="):
        distiller(x)
    out = distiller(x, sample_ids=torch.tensor([3, 7, 1, 0]))
    out.loss.backward()
    assert term.crd.embed_student.weight.grad is not None and student[0].weight.grad is not None


def test_graph_knn_of_at_least_b_minus_1_neighbours_is_the_dense_graph(gen):
    s, t = embeddings(gen, 5, 4).abs(), embeddings(gen, 5, 3).abs()
    dense = fastkd.graph_kd_loss(s, t)
    for knn in (4, 5, 50):  # B − 1 = 4 neighbours is every other sample
        assert torch.equal(fastkd.graph_kd_loss(s, t, knn=knn), dense)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch", [1, 2, 9, 20])
def test_the_angle_kernels_match_the_float64_reference(gen, kernel, batch, dtype, rtol):
    """The kernels (Triton tiles, under the interpreter on CPU; C++ with each instruction set) against the
    authors' formulation in float64 on the same (rounded) inputs, loss and gradient, also with equal rows."""
    s, t = embeddings(gen, batch, 5, dtype), embeddings(gen, batch, 7, dtype)
    if batch > 5:
        s[4] = s[1]
        t[3] = t[0]
    leaf = s.clone().to(kernel.device).requires_grad_()
    loss = fastkd.rkd_loss(leaf, t.to(kernel.device), backend=kernel.backend)
    loss.backward()
    truth = s.double().requires_grad_()
    want = 25 * reference.rkd_distance_loss(truth, t.double()) + 50 * reference.rkd_angle_loss(truth, t.double())
    want.backward()
    assert loss.dtype == torch.float32
    assert_rel_close(loss, want, rtol, what="loss")
    assert_rel_close(leaf.grad, truth.grad, rtol, what="grad")


def test_the_cpu_angle_kernels_give_the_same_bits_on_any_thread_count(gen):
    from conftest import skip_unless_available

    skip_unless_available("cpu")
    s, t = embeddings(gen, 45, 6, torch.float32), embeddings(gen, 45, 3, torch.float32)
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            leaf = s.clone().requires_grad_()
            loss = relational.rkd_angle_loss(leaf, t, backend="cpu")
            loss.backward()
            results.append((loss.detach(), leaf.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for result in results[1:] for a, b in zip(result, results[0]))


@pytest.mark.parametrize("num_negatives", [4, 70])  # N = 500 > 8·(K+1): the gather-dot kernels; 70: one matmul
def test_crd_on_the_kernels_matches_the_float64_algorithm_over_steps(gen, kernel, num_negatives):
    import copy

    torch.manual_seed(1)
    crd = relational.CRDLoss(500, 5, 9, feat_dim=6, num_negatives=num_negatives, backend=kernel.backend)
    twin = copy.deepcopy(crd).double()

    def features(x):
        return x.float().to(kernel.device)

    options = dict(features=features, loss_rtol=1e-5, grad_rtol=1e-5, bank_rtol=1e-6)
    assert_crd_steps_follow_the_authors(crd.to(kernel.device), twin, gen, **options)


def test_rkd_and_crd_compile_fullgraph_to_the_eager_results(gen, kernel):
    """torch.compile sees the kernels as custom ops (no graph break): the same loss and gradients as eager."""
    s, t = (
        embeddings(gen, 9, 5, torch.float32).to(kernel.device),
        embeddings(gen, 9, 4, torch.float32).to(kernel.device),
    )

    def rkd_step(x):
        return fastkd.rkd_loss(x, t, backend=kernel.backend)

    results = []
    for step in (rkd_step, torch.compile(rkd_step, fullgraph=True, backend="aot_eager")):
        leaf = s.clone().requires_grad_()
        loss = step(leaf)
        results.append((loss, torch.autograd.grad(loss, leaf)[0]))
    for got, want in zip(*results):
        assert_rel_close(got, want, 1e-6)
    gathered = relational.CRDLoss(500, 5, 4, feat_dim=6, num_negatives=7, backend=kernel.backend).to(kernel.device)
    index = torch.randperm(500, generator=gen)[:9].to(kernel.device)
    contrast_index = torch.cat([index[:, None], torch.randint(500, (9, 7), generator=gen).to(kernel.device)], 1)
    gathered(s, t, index, contrast_index)  # Z from a first batch
    import copy

    twin = copy.deepcopy(gathered)
    leaf = s.clone().requires_grad_()
    want = gathered(leaf, t, index, contrast_index)
    (want_grad,) = torch.autograd.grad(want, leaf)
    leaf = s.clone().requires_grad_()
    got = torch.compile(twin, fullgraph=True, backend="aot_eager")(leaf, t, index, contrast_index)
    (got_grad,) = torch.autograd.grad(got, leaf)
    assert_rel_close(got, want, 1e-6)
    assert_rel_close(got_grad, want_grad, 1e-6)
    assert torch.equal(twin.student_bank, gathered.student_bank)


def test_a_nan_teacher_row_gives_the_same_angle_loss_on_every_backend(gen, kernel):
    """A NaN distance fails every backend's d > 0 test: its triplets count as cosine 0, the same everywhere."""
    s, t = embeddings(gen, 7, 5, torch.float32), embeddings(gen, 7, 4, torch.float32)
    t[2] = float("nan")
    got = relational.rkd_angle_loss(s.to(kernel.device), t.to(kernel.device), backend=kernel.backend)
    want = reference.rkd_angle_loss(s.double(), t.double())
    assert want.isfinite()
    assert_rel_close(got, want, 1e-5)
