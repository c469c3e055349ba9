"""fastkd.meta (MetaDistil's pilot update): the teacher's meta-gradient through the pilot student equals the one from
the reference backend and a finite difference in float64; the student module is left unchanged."""

import pytest
import torch

import fastkd
from fastkd import meta

from conftest import assert_rel_close, skip_unless_available


def models(dtype=torch.float32):
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5)).to(dtype)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).to(dtype)
    return student, teacher


def meta_gradient(backend, dtype=torch.float32, divergence="kl"):
    student, teacher = models(dtype)
    g = torch.Generator().manual_seed(1)
    x, x_quiz = torch.randn(7, 4, generator=g).to(dtype), torch.randn(5, 4, generator=g).to(dtype)
    y_quiz = torch.randint(0, 5, (5,), generator=g)
    before = [p.detach().clone() for p in student.parameters()]
    pilot = meta.pilot_update(student, x, teacher(x), lr=0.5, temperature=2.0, divergence=divergence, backend=backend)
    meta.quiz_loss(student, pilot, x_quiz, y_quiz).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    return [p.grad for p in teacher.parameters()], (student, teacher, x, x_quiz, y_quiz)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_the_teachers_meta_gradient_equals_the_reference(backend, divergence):
    skip_unless_available(backend)
    got, _ = meta_gradient(backend, divergence=divergence)
    want, _ = meta_gradient("reference", divergence=divergence)
    assert all(g is not None and g.abs().max() > 0 for g in got)
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-5)


def test_the_meta_gradient_is_the_derivative_of_the_quiz_loss():
    grads, (student, teacher, x, x_quiz, y_quiz) = meta_gradient("reference", torch.float64)
    weight = teacher[2].weight
    direction = torch.randn_like(weight)

    def quiz(step):
        with torch.no_grad():
            weight.add_(step * direction)
        pilot = meta.pilot_update(student, x, teacher(x), lr=0.5, temperature=2.0, backend="reference")
        value = float(meta.quiz_loss(student, pilot, x_quiz, y_quiz).detach())
        with torch.no_grad():
            weight.sub_(step * direction)
        return value

    numeric = (quiz(1e-6) - quiz(-1e-6)) / 2e-6
    assert abs(numeric - float((grads[2] * direction).sum())) <= 1e-6 * max(1.0, abs(numeric))


def test_pilot_update_refusals():
    student, teacher = models()
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        meta.pilot_update(student, x, teacher(x), lr=0)
    student.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        meta.pilot_update(student, x, teacher(x), lr=0.1)
    assert fastkd.meta is meta


def test_the_pilot_leaves_the_students_batchnorm_statistics_alone():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 5)).train()
    x = torch.randn(8, 4)
    before = {name: b.clone() for name, b in student.named_buffers()}
    meta.pilot_update(student, x, torch.randn(8, 5), lr=0.1)
    assert all(torch.equal(before[name], b) for name, b in student.named_buffers())
