"""Test set-up: the Triton kernels run on CUDA tensors where a GPU is present, else on CPU tensors under the
Triton interpreter (which must be switched on before triton is imported)."""

import os
import random
import zlib
from typing import NamedTuple

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Kernel(NamedTuple):
    backend: str
    device: torch.device


def backend_device(backend: str) -> torch.device:
    """Where a backend's test tensors live: the C++ CPU backend takes CPU tensors, the others DEVICE."""
    return torch.device("cpu") if backend == "cpu" else DEVICE


def skip_unless_available(backend: str) -> None:
    from fastkd import cpu_backend

    if backend == "cpu" and not cpu_backend.AVAILABLE:
        pytest.skip(f"the C++ extension fastkd._C was not built: {cpu_backend.IMPORT_ERROR}")


CPU_ISAS = ("avx512", "avx2", "portable")


@pytest.fixture(params=["triton"] + [f"cpu-{isa}" for isa in CPU_ISAS])
def kernel(request):
    """Each kernel backend under test, with the device of its tensors: the Triton kernels (CUDA, or CPU tensors
    under the interpreter) and the C++ CPU kernels with each instruction set this CPU runs."""
    backend, _, isa = request.param.partition("-")
    skip_unless_available(backend)
    if not isa:
        yield Kernel(backend, backend_device(backend))
        return
    from fastkd import cpu_backend

    if isa not in cpu_backend.usable_isas():
        pytest.skip(f"this CPU or build has no {isa} kernels (usable: {cpu_backend.usable_isas()})")
    default = cpu_backend.isa()
    cpu_backend.set_isa(isa)
    try:
        yield Kernel(backend, backend_device(backend))
    finally:
        cpu_backend.set_isa(default)


SESSION_SEED = int(os.environ.get("FASTKD_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return (
        f"fastkd: device {DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"random inputs seeded with FASTKD_TEST_SEED={SESSION_SEED}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("fastkd", f"replay with FASTKD_TEST_SEED={SESSION_SEED}"))


@pytest.fixture
def gen(request):
    """A torch.Generator on CPU seeded from the session seed and the test id: fresh inputs on every run, and a
    failure can be replayed with FASTKD_TEST_SEED."""
    return torch.Generator().manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def logits(gen, shape, dtype=torch.float32, scale=3.0, device="cpu"):
    """Random logits, N(0, scale²) drawn in float64 from ``gen``, then cast to ``dtype`` on ``device``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def tiny_gpt2(width: int, seed: int, vocab_size: int):
    """A one-layer GPT-2 LM built from a config (no download), without dropout, weights seeded; skips the test
    without transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=16,
        n_embd=width,
        n_layer=1,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    return transformers.GPT2LMHeadModel(config)


def tvd_tie_free(s, t, temperature, margin=1e-4):
    """``t`` with the entries moved (by 10·margin·T, or 4 units in the last place of t's dtype if more) where
    log p_s and log p_t at temperature T lie within ``margin`` of each other. There the gradient of TVD,
    ½ Σ |p_s − p_t|, jumps (it holds sign(p_s − p_t)), and two float32 computations of the same row may round such
    a near-tie either way: the backends then disagree by a whole term of the gradient, although each is right to
    float32. Everything else is left as it was."""
    for _ in range(3):  # moving one entry shifts the row's normaliser a little: check again
        log_p_s = torch.log_softmax(s.double() / temperature, -1)
        log_p_t = torch.log_softmax(t.double() / temperature, -1)
        near = ((log_p_s - log_p_t).abs() < margin) & log_p_s.isfinite() & log_p_t.isfinite()
        if not bool(near.any()):
            return t
        step = torch.maximum(torch.full_like(t, 10 * margin * temperature), 4 * torch.finfo(t.dtype).eps * t.abs())
        t = torch.where(near, t + step, t).to(t.dtype).requires_grad_(t.requires_grad)
    return t


def assert_rel_close(actual, expected, rtol, *, atol=1e-7, what=""):
    """‖actual − expected‖ ≤ rtol·‖expected‖ + atol over the finite entries; NaN and ±inf must sit at exactly
    the same places (so a NaN never passes where the expected value is a number)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN pattern differs"
    finite = expected.isfinite()
    assert torch.equal(actual[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()]), (
        f"{what}: infinities differ"
    )
    assert actual[finite].isfinite().all(), f"{what}: non-finite where a finite value was expected"
    err = (actual[finite] - expected[finite]).norm().item()
    ref = expected[finite].norm().item()
    assert err <= rtol * ref + atol, (
        f"{what}: relative error {err / max(ref, 1e-300):.3e} > {rtol:g} (abs {err:.3e}, |ref| {ref:.3e})"
    )
