"""kd_loss checks that need a real GPU (skipped without CUDA)."""

import pytest
import torch

import fastkd

from conftest import assert_rel_close

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_auto_backend_picks_triton_on_cuda():
    from fastkd.dispatch import select_backend

    x = torch.zeros(2, 3, device="cuda")
    assert select_backend("auto", x, x) == "triton"
    assert select_backend("auto", x.double(), x.double()) == "reference"


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_no_host_sync_in_forward_and_backward(divergence):
    s = torch.randn(64, 1000, device="cuda", requires_grad=True)
    t = torch.randn(64, 1000, device="cuda")
    labels = torch.randint(0, 1000, (64,), device="cuda")
    labels[::3] = -100
    normalizer = torch.tensor(7.0, device="cuda")  # a host-to-device copy, itself a sync: made before the check
    fastkd.kd_loss(s, t, labels=labels, ce_weight=0.5, divergence=divergence).backward()  # compile first
    fastkd.kd_loss(s, t, labels=labels, divergence=divergence, return_stats=True)[0].backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fastkd.kd_loss(s, t, temperature=2.0, labels=labels, ce_weight=0.5, divergence=divergence)
        loss.backward()
        fastkd.kd_loss(s, t, normalizer=normalizer).backward()
        loss, stats = fastkd.kd_loss(s, t, labels=labels, divergence=divergence, return_stats=True)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_rows_beyond_2_to_the_31_elements():
    """N·V > 2^31: row offsets must be 64-bit. Checks the last rows against the reference on those rows."""
    rows, vocab = 16_500, 131_072  # 2.16e9 elements, 4.3 GB per bf16 tensor
    needed = 4 * rows * vocab * 2  # student, teacher, gradient, headroom
    if torch.cuda.mem_get_info()[0] < needed:
        pytest.skip("not enough GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    t = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=gen)
    loss = fastkd.kd_loss(s, t, temperature=2.0, reduction="none")
    (grad,) = torch.autograd.grad(loss[-4:].sum(), s)
    tail_s = s[-4:].detach().clone().requires_grad_(True)
    ref = fastkd.kd_loss(tail_s, t[-4:], temperature=2.0, reduction="none", backend="reference")
    (ref_grad,) = torch.autograd.grad(ref.sum(), tail_s)
    assert_rel_close(loss[-4:], ref, 1e-5, what="last rows' loss")
    assert_rel_close(grad[-4:], ref_grad, 1e-2, what="last rows' gradient")
    assert not grad[:-4].any()
