"""The kernels of CRD's memory-bank scores (crd_gather_dot and crd_scatter_dot: Triton, fastkd.kernels.relational,
under the interpreter on CPU; C++, csrc/relational_cpu.h, with each instruction set) against float64 math on the
gathered rows: odd widths, one and many contrast rows, empty and single-row batches, duplicate indices, a bank with
a row stride wider than its width, and mixed input dtypes."""

import pytest
import torch

from fastkd.dispatch import TRITON_AVAILABLE, launchers, triton_interpreted


@pytest.fixture
def device(kernel):
    if kernel.backend == "triton" and (
        not TRITON_AVAILABLE or (kernel.device.type == "cpu" and not triton_interpreted())
    ):
        pytest.skip("the Triton kernels need triton, and TRITON_INTERPRET=1 on CPU tensors")
    return kernel.device


@pytest.fixture
def kernels(kernel, device):
    return launchers(kernel.backend, "relational")


def randn(gen, device, *shape, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def contrast_index(gen, device, num_samples, batch, num_contrast):
    return torch.randint(num_samples, (batch, num_contrast), generator=gen).to(device)


def assert_float32_close(got, want, magnitude):
    """Float32 accuracy for sums of products: |got − want| ≤ 1e-5·|want| + 1e-6·max Σ|terms| (the atol covers sums
    that cancel to near 0). The inputs of every dtype are exact in float32, and so are their products: the kernels
    owe float32 accuracy whatever the input dtype. NaN never passes."""
    assert got.dtype == torch.float32
    atol = 1e-6 * float(magnitude.max()) if magnitude.numel() else 0.0
    torch.testing.assert_close(got.cpu().double(), want.cpu(), rtol=1e-5, atol=atol)


def check_both(kernels, bank, index, anchors, grad):
    """Both launchers against the float64 math of the gathered (B, C, d) rows of the (rounded) inputs."""
    rows = bank.double()[index]  # (B, C, d)
    products = rows * anchors.double()[:, None, :]
    assert_float32_close(kernels.crd_gather_dot(bank, index, anchors), products.sum(-1), products.abs().sum(-1))
    terms = grad.double()[:, :, None] * rows
    assert_float32_close(kernels.crd_scatter_dot(bank, index, grad), terms.sum(1), terms.abs().sum(1))


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("num_contrast", [1, 17, 70])
@pytest.mark.parametrize("dim", [1, 3, 130])
def test_gather_and_scatter_dots_match_float64(gen, kernels, device, batch, num_contrast, dim):
    bank = randn(gen, device, 40, dim)
    index = contrast_index(gen, device, 40, batch, num_contrast)
    check_both(kernels, bank, index, randn(gen, device, batch, dim), randn(gen, device, batch, num_contrast))


def test_many_contrast_rows_span_many_blocks(gen, kernels, device):
    bank = randn(gen, device, 300, 3)
    index = contrast_index(gen, device, 300, 2, 16385)
    check_both(kernels, bank, index, randn(gen, device, 2, 3), randn(gen, device, 2, 16385))


def test_duplicate_indices_count_once_per_occurrence(gen, kernels, device):
    bank = randn(gen, device, 30, 19)
    index = contrast_index(gen, device, 30, 4, 33)
    index[0, :6] = index[0, 0]  # the positive repeated among its negatives
    index[1] = 7  # one row throughout
    index[2, 10:] = index[3, 10:]  # another row's contrast rows
    anchors, grad = randn(gen, device, 4, 19), randn(gen, device, 4, 33)
    check_both(kernels, bank, index, anchors, grad)
    row, weights = bank[7].double(), grad[1].double()
    assert_float32_close(
        kernels.crd_scatter_dot(bank, index, grad)[1], row * weights.sum(), row.abs() * weights.abs().sum()
    )


def test_a_bank_with_a_wider_row_stride_or_a_column_stride(gen, kernels, device):
    wide = randn(gen, device, 25, 140)
    bank = wide[:, 5:135]  # row stride 140, width 130
    assert bank.stride() == (140, 1)
    index = contrast_index(gen, device, 25, 3, 70)
    anchors, grad = randn(gen, device, 3, 130), randn(gen, device, 3, 70)
    check_both(kernels, bank, index, anchors, grad)
    check_both(
        kernels, randn(gen, device, 130, 25).T, index, anchors, grad
    )  # column stride 25: copied to unit column stride


@pytest.mark.parametrize(
    "bank_dtype, anchors_dtype",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_low_precision_and_mixed_dtypes_are_summed_in_float32(gen, kernels, device, bank_dtype, anchors_dtype):
    bank = randn(gen, device, 50, 130, dtype=bank_dtype)
    index = contrast_index(gen, device, 50, 3, 70)
    check_both(kernels, bank, index, randn(gen, device, 3, 130, dtype=anchors_dtype), randn(gen, device, 3, 70))


def test_an_empty_batch_gives_empty_results(gen, kernels, device):
    bank = randn(gen, device, 10, 3)
    index = torch.empty((0, 17), dtype=torch.int64, device=device)
    scores = kernels.crd_gather_dot(bank, index, randn(gen, device, 0, 3))
    grad = kernels.crd_scatter_dot(bank, index, randn(gen, device, 0, 17))
    assert scores.shape == (0, 17) and scores.dtype == torch.float32 and scores.device == device
    assert grad.shape == (0, 3) and grad.dtype == torch.float32 and grad.device == device


def test_the_same_bits_every_run(gen, kernels, device):
    bank = randn(gen, device, 40, 130, dtype=torch.bfloat16)
    index = contrast_index(gen, device, 40, 3, 150)
    anchors, grad = randn(gen, device, 3, 130), randn(gen, device, 3, 150)
    first = kernels.crd_gather_dot(bank, index, anchors), kernels.crd_scatter_dot(bank, index, grad)
    second = kernels.crd_gather_dot(bank, index, anchors), kernels.crd_scatter_dot(bank, index, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_no_contrast_rows_give_empty_scores_and_a_zero_gradient(gen, kernels, device):
    bank, index = randn(gen, device, 10, 3), torch.empty((4, 0), dtype=torch.int64, device=device)
    assert kernels.crd_gather_dot(bank, index, randn(gen, device, 4, 3)).shape == (4, 0)
    assert torch.equal(kernels.crd_scatter_dot(bank, index, randn(gen, device, 4, 0)), torch.zeros(4, 3, device=device))


@pytest.mark.parametrize(
    "dim, num_contrast, bank_dtype", [(3, 1, torch.float32), (130, 17, torch.bfloat16), (20, 2100, torch.float32)]
)
def test_score_grad_reads_each_row_once_for_the_nce_gradient(gen, kernels, device, dim, num_contrast, bank_dtype):
    """Scores and Σ_c g(u_bc)·row_c, g CRD's NCE gradient of the score, against float64 math on the same inputs
    (2100 contrast rows: more than one chunk of the Triton kernel)."""
    bank = randn(gen, device, 300, dim, dtype=bank_dtype) * 0.3
    index = contrast_index(gen, device, 300, 3, num_contrast)
    anchors = randn(gen, device, 3, dim) * 0.3
    z, temperature, noise, scale = torch.tensor(2.5, device=device), 0.07, 0.05, 1 / (0.07 * 3)
    scores, grad = kernels.crd_score_grad(
        bank, index, anchors, z, temperature=temperature, noise=noise, grad_scale=scale
    )
    rows = bank.double()[index]
    products = rows * anchors.double()[:, None, :]
    want_scores = products.sum(-1)
    assert_float32_close(scores, want_scores, products.abs().sum(-1))
    x = torch.exp(want_scores / temperature) / 2.5
    g = torch.where(torch.arange(num_contrast, device=device) == 0, -noise, x) * scale / (x + noise)
    terms = g[:, :, None] * rows
    torch.testing.assert_close(
        grad.cpu().double(), terms.sum(1).cpu(), rtol=1e-5, atol=1e-6 * float(terms.abs().sum(1).max())
    )
