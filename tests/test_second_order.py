"""Double backward (create_graph=True) through kd_loss and dkd_loss on the kernel backends: the gradient of the
gradient equals the reference's for every divergence, the CE term, ensembles and DKD, with respect to the student's
and the teacher's logits; gradgradcheck of the reference in float64; a plain backward still takes the kernels."""

import pytest
import torch

import fastkd
from fastkd import second_order

from conftest import assert_rel_close, backend_device, logits, skip_unless_available

DIVERGENCES = ["kl", "reverse_kl", "jsd", "cosine", "tvd"]


def second_order_grads(loss_fn, s, t, probe_s, probe_t):
    """(∂/∂s, ∂/∂t) of ⟨∂loss/∂s, probe_s⟩ + ⟨∂loss/∂t, probe_t⟩: one double backward."""
    s, t = s.clone().requires_grad_(), t.clone().requires_grad_()
    grad_s, grad_t = torch.autograd.grad(loss_fn(s, t), (s, t), create_graph=True)
    return torch.autograd.grad((grad_s * probe_s).sum() + (grad_t * probe_t).sum(), (s, t), allow_unused=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_double_backward_of_kd_loss_equals_the_reference(gen, backend, divergence):
    skip_unless_available(backend)
    device = backend_device(backend)
    s, t = logits(gen, (5, 13), device=device), logits(gen, (5, 13), device=device)
    probe_s, probe_t = logits(gen, (5, 13), device=device), logits(gen, (5, 13), device=device)
    labels = torch.tensor([1, -100, 12, 0, 5], device=device)
    options = dict(temperature=2.0, divergence=divergence, beta=0.3, labels=labels, ce_weight=0.4)
    results = {}
    for name in (backend, "reference"):
        results[name] = second_order_grads(
            lambda s, t, name=name: fastkd.kd_loss(s, t, backend=name, **options), s, t, probe_s, probe_t
        )
    for got, want in zip(results[backend], results["reference"]):
        assert_rel_close(got, want, 1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("ensemble", ["prob", "logit"])
def test_double_backward_of_an_ensemble_and_of_dkd(gen, backend, ensemble):
    skip_unless_available(backend)
    device = backend_device(backend)
    s = logits(gen, (4, 9), device=device)
    teachers = logits(gen, (3, 4, 9), device=device)
    probe_s, probe_t = logits(gen, (4, 9), device=device), logits(gen, (3, 4, 9), device=device)
    labels = torch.tensor([2, 8, -100, 0], device=device)
    results = {}
    for name in (backend, "reference"):

        def loss(s, t, name=name):
            return fastkd.kd_loss(s, list(t), temperature=3.0, ensemble=ensemble, labels=labels, backend=name)

        results[name] = second_order_grads(loss, s, teachers, probe_s, probe_t)
    for got, want in zip(results[backend], results["reference"]):
        assert_rel_close(got, want, 1e-5)
    # dkd's kernels give the teacher no gradient (with backend="auto" a teacher that wants one runs the
    # reference): the Hessian-vector product with respect to the student
    t = teachers[0]
    hvp = {}
    for name in (backend, "reference"):
        leaf = s.clone().requires_grad_()
        (grad,) = torch.autograd.grad(
            fastkd.dkd_loss(leaf, t, labels, temperature=4.0, backend=name), leaf, create_graph=True
        )
        (hvp[name],) = torch.autograd.grad((grad * probe_s).sum(), leaf)
    assert_rel_close(hvp[backend], hvp["reference"], 1e-5)


def test_the_reduced_cpu_path_double_backward_with_a_normalizer(gen):
    skip_unless_available("cpu")
    s, t = logits(gen, (6, 11)), logits(gen, (6, 11))
    probe_s, probe_t = logits(gen, (6, 11)), logits(gen, (6, 11))
    labels = torch.tensor([1, -100, 10, 0, 5, 5])
    for normalizer in (None, 7.0, torch.tensor(3.0)):
        results = [
            second_order_grads(
                lambda s, t, name=name, normalizer=normalizer: fastkd.kd_loss(
                    s, t, temperature=2.0, labels=labels, ce_weight=0.5, normalizer=normalizer, backend=name
                ),
                s,
                t,
                probe_s,
                probe_t,
            )
            for name in ("cpu", "reference")
        ]
        for got, want in zip(*results):
            assert_rel_close(got, want, 1e-5)


def test_gradgradcheck_of_the_reference_rows_in_float64(gen):
    s = logits(gen, (3, 6), torch.float64).requires_grad_()
    t = logits(gen, (3, 6), torch.float64).requires_grad_()
    for divergence in ("kl", "reverse_kl", "jsd"):
        assert torch.autograd.gradgradcheck(
            lambda s, t, d=divergence: fastkd.kd_loss(s, t, temperature=2.0, divergence=d, beta=0.3), (s, t)
        )
    labels = torch.tensor([0, 5, 2])
    assert torch.autograd.gradgradcheck(lambda s, t: fastkd.dkd_loss(s, t, labels, temperature=2.0), (s, t))


def test_a_plain_backward_still_takes_the_kernels(gen, monkeypatch):
    skip_unless_available("cpu")
    calls = []
    original = second_order.reference_rows
    monkeypatch.setattr(second_order, "reference_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    s = logits(gen, (4, 7)).requires_grad_()
    fastkd.kd_loss(s, logits(gen, (4, 7)), divergence="jsd", backend="cpu").backward()
    fastkd.kd_loss(s, logits(gen, (4, 7)), backend="cpu").backward()
    assert calls == []


@pytest.mark.filterwarnings("ignore:Input #")  # gradgradcheck warns about float32: the kernels take no float64
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradgradcheck_on_the_kernel_backends_in_float32(gen, backend):
    """gradgradcheck of the kernel paths, with float32 finite differences (eps 1e-2) and tolerances to match."""
    skip_unless_available(backend)
    device = backend_device(backend)
    s = logits(gen, (3, 6), scale=1.0, device=device).requires_grad_()
    t = logits(gen, (3, 6), scale=1.0, device=device).requires_grad_()
    loose = dict(eps=1e-2, atol=1e-2, rtol=1e-2)
    for divergence in ("kl", "reverse_kl", "jsd"):
        assert torch.autograd.gradgradcheck(
            lambda s, t, d=divergence: fastkd.kd_loss(s, t, temperature=2.0, divergence=d, beta=0.3, backend=backend),
            (s, t),
            **loose,
        )
    labels = torch.tensor([0, 5, 2], device=device)
    assert torch.autograd.gradgradcheck(
        lambda s: fastkd.dkd_loss(s, t.detach(), labels, temperature=2.0, backend=backend), (s,), **loose
    )
