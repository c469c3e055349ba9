"""The CUDA C++ backend of kd_loss (csrc/kd_cuda.cu, fastkd/cuda_backend.py).

Without a GPU (CI): the sources compile for sm_80 and sm_90 through the just-in-time builder, which caches the
module per key; the module links, imports and checks its arguments; the kernels' row math and work split
(csrc/kd_cuda_row.h: per-thread chunks, warp butterflies, the merge of the warps) run on the host through
tests/kd_cuda_row_harness.cpp against the reference; backend="cuda" refuses CPU tensors. With a GPU (marked
``cuda``): the kernels against the reference over the case matrix, the Triton fallback for what they do not cover,
and compute-sanitizer's memcheck on a small case.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastkd
from fastkd import cuda_backend, cuda_build, reference
from fastkd.kernel_args import NUM_STATS, Divergence, KDOptions, kd_launch_args

from conftest import assert_rel_close, logits

HERE = os.path.dirname(os.path.abspath(__file__))
needs_nvcc = pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="needs nvcc")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------------------------------------------
# without a GPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_module(tmp_path_factory):
    """The extension for sm_80 and sm_90, built by the just-in-time builder into a fresh cache."""
    cache = tmp_path_factory.mktemp("fastkd-cache")
    previous = os.environ.get("FASTKD_CACHE_DIR")
    os.environ["FASTKD_CACHE_DIR"] = str(cache)
    try:
        path = cuda_build.cached_build(("80", "90"))
    finally:
        if previous is None:
            del os.environ["FASTKD_CACHE_DIR"]
        else:
            os.environ["FASTKD_CACHE_DIR"] = previous
    return cache, path


@needs_nvcc
def test_cuda_sources_compile_for_sm80_and_sm90_and_the_build_is_cached(built_module, monkeypatch):
    cache, path = built_module
    assert path.is_file() and path.parent.parent == cache and path.name == cuda_build.module_filename()
    mtime = path.stat().st_mtime_ns
    monkeypatch.setenv("FASTKD_CACHE_DIR", str(cache))
    monkeypatch.setattr(cuda_build, "build", lambda *a, **k: pytest.fail("rebuilt a cached module"))
    assert cuda_build.cached_build(("80", "90")) == path and path.stat().st_mtime_ns == mtime


@needs_nvcc
def test_cuda_build_without_ninja_runs_the_steps_one_by_one(tmp_path, monkeypatch):
    """Where ninja is missing (a GPU machine without the pip package, say) nvcc alone builds the same module."""
    monkeypatch.setattr(cuda_build, "find_ninja", lambda: None)
    path = cuda_build.build(tmp_path / cuda_build.module_filename(), arches=("90",))
    # imported in a child process: this one may hold another build of the same extension already
    probe = f"from fastkd import cuda_backend; print(cuda_backend._import_path({str(path)!r}).archs)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "90"


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the launch error without a GPU")
def test_cuda_module_imports_checks_its_arguments_and_reports_a_missing_gpu(built_module):
    module = cuda_backend._import_path(built_module[1])
    assert module.threads_per_row(32000, 8) == 256 and module.threads_per_row(100, 4) == 32
    assert module.archs == "80,90" and module.runtime_version // 1000 == cuda_build.nvcc_major()
    s, t = torch.randn(2, 16), torch.randn(2, 16)
    stats, loss = torch.empty(NUM_STATS, 2), torch.empty(2)
    options = KDOptions(temperature=2.0, divergence="kl", beta=0.5, ignore_index=-100, ce_weight=0.0, kd_scale=4.0)
    args, _keep = kd_launch_args(s, t, None, stats, options, num_threads=1)
    args.update(loss=loss.data_ptr(), stream=0)
    with pytest.raises(ValueError, match="divergences kl and reverse_kl"):
        module.kd_forward({**args, "divergence": int(Divergence.JSD)})
    with pytest.raises(ValueError, match="one dtype"):
        module.kd_forward({**args, "teacher": (t.data_ptr(), 2, 16)})
    with pytest.raises(ValueError, match="missing kernel argument 'stream'"):
        module.kd_forward({k: v for k, v in args.items() if k != "stream"})
    with pytest.raises(RuntimeError, match="fastkd CUDA kd_loss forward: cuda"):
        module.kd_forward(args)  # the launch fails cleanly: there is no device


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("needs a C++ compiler")
    exe = tmp_path_factory.mktemp("harness") / "kd_cuda_row_harness"
    subprocess.run(
        [
            compiler,
            "-std=c++17",
            "-O2",
            f"-I{os.path.join(HERE, '..', 'csrc')}",
            os.path.join(HERE, "kd_cuda_row_harness.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    return exe


def run_harness(
    exe, tmp_path, s, t, labels, grad_loss, *, vec, divergence, temperature, kd_scale, ce_weight, ignore_index=-100
):
    rows, cols = s.shape
    header = np.array([rows, cols, vec, divergence == "reverse_kl", labels is not None, ignore_index], np.int64)
    with open(tmp_path / "in.bin", "wb") as f:
        header.tofile(f)
        np.array([1.0 / temperature, kd_scale, ce_weight], np.float32).tofile(f)
        s.numpy().astype(np.float32).tofile(f)
        t.numpy().astype(np.float32).tofile(f)
        if labels is not None:
            labels.numpy().astype(np.int64).tofile(f)
        grad_loss.numpy().astype(np.float32).tofile(f)
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", np.float32))
    loss, stats, grad_s, grad_t = out.split([rows, NUM_STATS * rows, rows * cols, rows * cols])
    return loss, stats.view(NUM_STATS, rows), grad_s.view(rows, cols), grad_t.view(rows, cols)


def reference_rows_and_grads(s, t, labels, grad_loss, **options):
    """The reference's row losses (float32 math) and the float64 gradients of Σ grad_loss·row_loss."""
    rows = reference.kd_loss_rows(s, t, labels, beta=0.5, ignore_index=-100, scale_by_t2=True, **options)
    s64, t64 = s.double().requires_grad_(True), t.double().requires_grad_(True)
    rows64 = reference.kd_loss_rows(s64, t64, labels, beta=0.5, ignore_index=-100, scale_by_t2=True, **options)
    grads = torch.autograd.grad((rows64 * grad_loss.double()).sum(), (s64, t64), allow_unused=True)
    return (rows,) + tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (s64, t64)))


@pytest.mark.parametrize("num_cols", [1, 5, 100, 257, 1000, 4099])
@pytest.mark.parametrize("vec", [1, 4, 8])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_cuda_row_math_on_the_host_matches_the_reference(harness, tmp_path, gen, num_cols, vec, divergence):
    """Labels with an ignored row, CE, T = 2.5, logits up to ±30: loss and both gradients within 1e-5."""
    s, t = logits(gen, (5, num_cols), scale=10.0), logits(gen, (5, num_cols), scale=10.0)
    labels = torch.tensor([0, -100, num_cols - 1, num_cols // 2, 0])
    grad_loss = torch.rand(5, generator=gen) + 0.5
    options = dict(temperature=2.5, divergence=divergence, ce_weight=0.3, kd_weight=1.0)
    loss, stats, grad_s, grad_t = run_harness(
        harness,
        tmp_path,
        s,
        t,
        labels,
        grad_loss,
        vec=vec,
        divergence=divergence,
        temperature=2.5,
        kd_scale=6.25,
        ce_weight=0.3,
    )
    want, want_s, want_t = reference_rows_and_grads(s, t, labels, grad_loss, **options)
    assert_rel_close(loss, want, 1e-5, what="loss")
    assert_rel_close(grad_s, want_s, 1e-5, what="student grad")
    assert_rel_close(grad_t, want_t, 1e-5, what="teacher grad")
    assert (stats[:, 1] == 0).all() and (grad_s[1] == 0).all()  # the ignored row


def test_cuda_row_math_on_the_host_edge_rows(harness, tmp_path, gen):
    """CE only (kd_weight 0), no labels with KD only, logits spread over ±1e4, and a NaN logit (its row NaN)."""
    s, t = logits(gen, (4, 300), scale=3e3), logits(gen, (4, 300), scale=3e3)
    grad_loss = torch.ones(4)
    labels = torch.tensor([3, 4, 5, 6])
    loss, _, grad_s, _ = run_harness(
        harness, tmp_path, s, t, labels, grad_loss, vec=8, divergence="kl", temperature=1.0, kd_scale=0.0, ce_weight=1.0
    )
    want, want_s, _ = reference_rows_and_grads(
        s, t, labels, grad_loss, temperature=1.0, divergence="kl", ce_weight=1.0, kd_weight=0.0
    )
    assert_rel_close(loss, want, 1e-5, what="CE only")
    assert_rel_close(grad_s, want_s, 1e-5, what="CE only grad")
    s[2, 17] = float("nan")
    loss, _, _, _ = run_harness(
        harness,
        tmp_path,
        s,
        t,
        None,
        grad_loss,
        vec=4,
        divergence="reverse_kl",
        temperature=3.0,
        kd_scale=9.0,
        ce_weight=0.0,
    )
    want, _, _ = reference_rows_and_grads(
        s, t, None, grad_loss, temperature=3.0, divergence="reverse_kl", ce_weight=0.0, kd_weight=1.0
    )
    assert_rel_close(loss, want, 1e-5, what="KD only, NaN row")
    assert loss[2].isnan() and loss[[0, 1, 3]].isfinite().all()


def test_which_prebuilt_modules_run_on_which_gpus():
    assert cuda_backend.runs_on("80,90", (8, 0)) and cuda_backend.runs_on("80,90", (8, 9))  # sm_80 code on 8.x
    assert cuda_backend.runs_on("80,90", (9, 0)) and cuda_backend.runs_on("80,90", (12, 0))  # PTX of 9.0
    assert not cuda_backend.runs_on("80,90", (7, 5)) and not cuda_backend.runs_on("86", (8, 0))


def test_compute_capabilities_are_parsed_or_refused():
    assert cuda_build.parse_arches("80;90") == cuda_build.parse_arches("8.0, 9.0") == ["80", "90"]
    for bad in ("", "sm_80", "8"):
        with pytest.raises(ValueError, match="compute capabilities"):
            cuda_build.parse_arches(bad)


def test_backend_cuda_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match="backend='cuda' runs on CUDA tensors"):
        fastkd.kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), backend="cuda")
    with pytest.raises(RuntimeError, match="dkd_loss has no 'cuda' backend"):
        fastkd.dkd_loss(torch.zeros(2, 5), torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), backend="cuda")


# ----------------------------------------------------------------------------------------------------------------
# on a GPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned rows", "strided"])
@pytest.mark.parametrize("num_cols", [7, 1000, 32000])
def test_cuda_kernels_match_the_reference(gen, divergence, dtype, rtol, layout, num_cols):
    rows = 9
    wide = num_cols + (1 if layout == "unaligned rows" else 0)
    s = logits(gen, (rows, wide * (2 if layout == "strided" else 1)), dtype).cuda()
    t = logits(gen, (rows, wide * (2 if layout == "strided" else 1)), dtype).cuda()
    s, t = (s[:, ::2], t[:, ::2]) if layout == "strided" else (s[:, :num_cols], t[:, :num_cols])
    labels = torch.tensor([0, -100, num_cols - 1, 3 % num_cols, 0, 1 % num_cols, -100, 2 % num_cols, 0]).cuda()
    options = dict(temperature=2.0, divergence=divergence, labels=labels, ce_weight=0.2)
    results = []
    for backend in ("cuda", "reference"):
        s_leaf = s.detach().clone().requires_grad_(True)
        t_leaf = t.detach().clone().requires_grad_(True)
        loss = fastkd.kd_loss(s_leaf, t_leaf, backend=backend, reduction="none", **options)
        (loss * torch.linspace(0.5, 1.5, rows, device="cuda")).sum().backward()
        results.append((loss, s_leaf.grad, t_leaf.grad))
    for got, want, what in zip(results[0], results[1], ("loss", "student grad", "teacher grad")):
        assert_rel_close(got, want, rtol, what=what)


@pytest.mark.cuda
@needs_gpu
def test_cuda_backend_hands_what_it_does_not_cover_to_triton(gen):
    s, t = logits(gen, (4, 300)).cuda(), logits(gen, (4, 300)).cuda()
    for options in (dict(divergence="jsd"), dict(return_stats=True), dict(divergence="cosine")):
        got = fastkd.kd_loss(s, t, backend="cuda", **options)
        want = fastkd.kd_loss(s, t, backend="triton", **options)
        assert_rel_close(got[0] if isinstance(got, tuple) else got, want[0] if isinstance(want, tuple) else want, 0)
    teacher = fastkd.topk_teacher(t, 5)  # a TopK teacher too
    assert_rel_close(fastkd.kd_loss(s, teacher, backend="cuda"), fastkd.kd_loss(s, teacher, backend="triton"), 0)
    assert fastkd.dispatch.select_backend("auto", s, kernels=("triton", "cpu", "cuda")) == "triton"


@pytest.mark.cuda
@needs_gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="needs compute-sanitizer")
def test_cuda_kernels_are_memcheck_clean():
    # 1000 columns: the 16-byte vector kernels; rows of 1001 in a stride of 1008: vector loads with a partial last
    # vector, scalar gradient stores; 1001 contiguous: the one-entry kernels
    script = textwrap.dedent("""
        import torch, fastkd
        for dtype in (torch.float32, torch.bfloat16):
            for cols, stride in ((1000, 1000), (1001, 1008), (1001, 1001)):
                s = torch.randn(5, stride, device="cuda", dtype=dtype)[:, :cols].requires_grad_(True)
                t = torch.randn(5, stride, device="cuda", dtype=dtype)[:, :cols].requires_grad_(True)
                labels = torch.tensor([0, -100, cols - 1, 3, 4], device="cuda")
                fastkd.kd_loss(s, t, labels=labels, ce_weight=0.5, backend="cuda").backward()
        torch.cuda.synchronize()
        print("ok")
    """)
    result = subprocess.run(
        ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
