"""torch.library.opcheck of every fastkd custom op on each kernel backend: the schema, the fake (meta) kernel
against the real one, and AOT dispatch with dynamic shapes (torch.compile's path). The ops are called by the
autograd.Functions of fastkd.kd, fastkd.linear_kd, fastkd.features, fastkd.lipschitz and fastkd.relational, which
own their gradients:
the ops register no autograd kernel, so the registration check runs with inputs that need no gradient."""

import pytest
import torch

import fastkd  # noqa: F401  (registers the ops)
from fastkd.kernel_args import FeatureGroup

from conftest import backend_device, skip_unless_available

KD_OPTIONS = dict(temperature=2.0, divergence="kl", beta=0.5, ignore_index=-100, ce_weight=0.5, kd_scale=4.0, alpha=1.0)
TOPK_OPTIONS = dict(
    temperature=2.0, teacher_temperature=2.0, tail="bucket", ignore_index=-100, ce_weight=0.5, kd_scale=4.0
)


def kd_cases(device, backend):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 37, generator=g).to(device), torch.randn(5, 37, generator=g).to(device)
    labels = torch.tensor([1, -100, 36, 0, 7], device=device)
    rows, stats, _ = torch.ops.fastkd.kd_loss_rows(
        s, t, None, labels, **KD_OPTIONS, ensemble="none", backend=backend, with_metrics=False
    )
    grad_loss = torch.ones(5, device=device)
    cases = [
        (
            torch.ops.fastkd.kd_loss_rows.default,
            (s, t, None, labels),
            dict(KD_OPTIONS, ensemble="none", backend=backend, with_metrics=True),
        ),
        (
            torch.ops.fastkd.kd_loss_rows_backward.default,
            (grad_loss, s, t, None, labels, stats),
            dict(KD_OPTIONS, ensemble="none", backend=backend, teacher_grad=True),
        ),
    ]
    if backend == "cpu":  # a reduced loss with its gradient in one call is the C++ backend's
        reduced = dict(KD_OPTIONS, divisor=0.0, grad=True, with_metrics=True)
        normalizer = torch.tensor(2.5)
        cases.append((torch.ops.fastkd.kd_loss_reduced.default, (s, t, labels, None), dict(reduced, teacher_grad=True)))
        cases.append(
            (torch.ops.fastkd.kd_loss_reduced.default, (s, t, None, normalizer), dict(reduced, teacher_grad=False))
        )
    if backend == "triton":  # the ensembles and the sparse teacher are Triton's
        teachers, weights = torch.randn(3, 5, 37, generator=g).to(device), torch.tensor([0.2, 0.3, 0.5], device=device)
        cases.append(
            (
                torch.ops.fastkd.kd_loss_rows.default,
                (s, teachers, weights, labels),
                dict(KD_OPTIONS, ensemble="prob", backend=backend, with_metrics=True),
            )
        )
        top = torch.log_softmax(t, -1).topk(4)
        _, topk_stats, _ = torch.ops.fastkd.kd_topk_rows(
            s, top.values, top.indices, labels, **TOPK_OPTIONS, backend=backend, with_metrics=False
        )
        cases.append(
            (
                torch.ops.fastkd.kd_topk_rows.default,
                (s, top.values, top.indices, labels),
                dict(TOPK_OPTIONS, backend=backend, with_metrics=True),
            )
        )
        cases.append(
            (
                torch.ops.fastkd.kd_topk_rows_backward.default,
                (grad_loss, s, top.values, top.indices, labels, topk_stats),
                dict(TOPK_OPTIONS, backend=backend),
            )
        )
    return cases


def feature_cases(device, backend):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 10, generator=g).to(device), torch.randn(2, 3, 10, generator=g).to(device)
    mask = (torch.rand(2, 1, 10, generator=g) > 0.3).to(torch.uint8).to(device).expand(2, 3, 10)
    options = dict(kind="mse", normalize="channel", group=int(FeatureGroup.CHANNEL), beta=1.0, backend=backend)
    scale = torch.ones(1, device=device)
    cases = [
        (torch.ops.fastkd.feature_loss_groups.default, (s, t, mask, None), options),
        (torch.ops.fastkd.feature_loss_backward.default, (scale, s, t, mask, None), dict(options, teacher_grad=True)),
    ]
    if backend == "cpu":  # plain features: the loss and its gradients in one call is the C++ backend's
        flat = dict(kind="smooth_l1", beta=0.5, mean=True)
        cases.append((torch.ops.fastkd.feature_loss_flat.default, (s, t), dict(flat, grad=True, teacher_grad=True)))
        cases.append((torch.ops.fastkd.feature_loss_flat.default, (s, t), dict(flat, grad=False, teacher_grad=False)))
    return cases


def power_iteration_cases(device, backend):
    g = torch.Generator().manual_seed(2)
    matrices = [torch.randn(6, 4, generator=g).to(device), torch.randn(3, 5, generator=g).to(device)]
    u, v = torch.randn(9, generator=g).to(device), torch.randn(9, generator=g).to(device)
    return [(torch.ops.fastkd.power_iteration.default, (matrices, u / u.norm(), v / v.norm(), 3, 1e-12, backend), {})]


def linear_kd_cases(device, backend):
    g = torch.Generator().manual_seed(3)
    h, w, b = (torch.randn(shape, generator=g).to(device) for shape in ((7, 6), (11, 6), (11,)))
    th, tw = torch.randn(7, 5, generator=g).to(device), torch.randn(11, 5, generator=g).to(device)
    labels = torch.tensor([1, -100, 9, 0, 7, 3, 2], device=device)
    tensors = (h, w, b, th, tw, None, None, None, None, labels)
    options = dict(
        KD_OPTIONS,
        tail="",
        teacher_temperature=KD_OPTIONS["temperature"],
        vocab_size=10,
        softcap=3.0,
        chunk_rows=3,
        backend=backend,
        grad_hidden=True,
        grad_weight=True,
    )
    del options["alpha"]
    grad_rows = torch.rand(7, generator=g).to(device)
    return [
        (torch.ops.fastkd.linear_kd_forward.default, tensors, dict(options, with_metrics=True, grad_bias=True)),
        (torch.ops.fastkd.linear_kd_backward.default, (grad_rows,) + tensors, dict(options, grad_bias=False)),
    ]


def relational_cases(device, backend):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, 5, generator=g).to(device), torch.randn(7, 3, generator=g).to(device)
    d_s, d_t = torch.cdist(x, x), torch.cdist(y, y)
    bank, contrast_index = torch.randn(30, 6, generator=g).to(device), torch.randint(30, (4, 9), generator=g).to(device)
    anchors, grad = torch.randn(4, 6, generator=g).to(device), torch.randn(4, 9, generator=g).to(device)
    return [
        (torch.ops.fastkd.rkd_angle_sum.default, (d_s, d_t, backend), {}),
        (torch.ops.fastkd.rkd_angle_grad.default, (d_s, d_t, torch.tensor(0.5, device=device), backend), {}),
        (torch.ops.fastkd.crd_gather_dot.default, (bank, contrast_index, anchors, backend), {}),
        (torch.ops.fastkd.crd_scatter_dot.default, (bank, contrast_index, grad, backend), {}),
        (
            torch.ops.fastkd.crd_score_grad.default,
            (bank, contrast_index, anchors, torch.tensor(2.0, device=device), 0.07, 0.05, 0.5, backend),
            {},
        ),
    ]


ALL_CASES = [kd_cases, feature_cases, power_iteration_cases, linear_kd_cases, relational_cases]


@pytest.mark.parametrize("cases", ALL_CASES)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_opcheck(backend, cases):
    skip_unless_available(backend)
    for op, args, kwargs in cases(backend_device(backend), backend):
        torch.library.opcheck(op, args, kwargs)


EAGER_CALLS = {  # the callables fastkd's autograd.Functions use: in eager mode they run the op's function directly
    "kd_loss_rows": fastkd.kd._kd_loss_rows_op,
    "kd_loss_rows_backward": fastkd.kd._kd_loss_rows_backward_op,
    "kd_loss_reduced": fastkd.kd._kd_loss_reduced_op,
    "kd_topk_rows": fastkd.kd._kd_topk_rows_op,
    "kd_topk_rows_backward": fastkd.kd._kd_topk_rows_backward_op,
    "feature_loss_groups": fastkd.features._feature_loss_groups_op,
    "feature_loss_backward": fastkd.features._feature_loss_backward_op,
    "feature_loss_flat": fastkd.features._feature_loss_flat_op,
    "power_iteration": fastkd.lipschitz._power_iteration_op,
    "linear_kd_forward": fastkd.linear_kd._linear_kd_forward_op,
    "linear_kd_backward": fastkd.linear_kd._linear_kd_backward_op,
    "rkd_angle_sum": fastkd.relational._rkd_angle_sum_op,
    "rkd_angle_grad": fastkd.relational._rkd_angle_grad_op,
    "crd_gather_dot": fastkd.relational._crd_gather_dot_op,
    "crd_scatter_dot": fastkd.relational._crd_scatter_dot_op,
    "crd_score_grad": fastkd.relational._crd_score_grad_op,
}


@pytest.mark.parametrize("cases", ALL_CASES)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_eager_calls_and_custom_ops_give_the_same_bits(backend, cases):
    skip_unless_available(backend)
    for op, args, kwargs in cases(backend_device(backend), backend):
        name = op.name().split("::")[1]
        through_op = op(*args, **kwargs)
        direct = EAGER_CALLS[name](*args, **kwargs)
        if isinstance(through_op, torch.Tensor):  # one output
            through_op, direct = (through_op,), (direct,)
        for a, b in zip(through_op, direct):
            for x, y in zip(a, b) if isinstance(a, list) else ((a, b),):
                assert torch.equal(x, y), f"{name}: the eager call and the custom op differ"
