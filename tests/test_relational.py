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
