"""Benchmark harness behind ``fastkd bench``: fastkd's ops against the expressions users run today.

Ops (``--op``): ``kd`` (kd_loss vs the eager KL expression, torch.compile of it and Liger-Kernel), ``overhead``
(kd_loss per call at classification shapes on every backend, against eager and torch.compile; CPU with 1 and 2
threads), ``topk`` (kd_loss against a sparse teacher, its top-K log-probabilities with the bucket tail, at T = 1 and
T = 2: the kernels against the reference; CPU with 1 and 2 threads), ``linear``
(linear_kd_loss from the heads' hidden states vs materialised logits + kd_loss, the eager expression on them,
torch.compile of it and Liger-Kernel's fused linear JSD at β = 0, forward KL), ``feature``
(feature_loss with a spatial mask and per-channel standardisation vs the eager expression and torch.compile of it)
and ``lipschitz`` (one power iteration over every Linear/Conv weight of ResNet-18 vs a per-layer torch loop).

For each shape, every implementation's loss and student gradient are first checked against the float64
truth (fastkd's reference on float64 copies of the inputs), then timed (median over repeats) for forward alone
and forward+backward through autograd, and its peak extra memory is read. The table also gives the share of
the memory roofline: forward reads student and teacher once, backward reads both again and writes the student
gradient, at a copy bandwidth measured in the same run (device to device on CUDA, a 1 GiB tensor copy with
torch's threads on CPU). On CPU fastkd's fused gradient moves less than that (the forward writes the gradient,
the backward reads nothing), so its share can pass 100%.

Timing: CUDA uses ``triton.testing.do_bench`` (CUDA events, L2 flushed before every repeat, median), which
includes the host's launch overhead whenever the host is slower than the GPU (small shapes); the "graph ms"
column replays the forward+backward step captured in a CUDA graph, the GPU time without that overhead. CPU
uses ``time.perf_counter`` around each call (median after 3 warm-up calls: the steady state of a training
loop, in which the C++ backend's buffer pool hands back the gradient memory of the previous step). Memory: CUDA
reads ``torch.cuda.max_memory_allocated`` above what was allocated before the call; CPU reads the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) above its resident set before the call less the free
blocks of the C++ backend's buffer pool (which the call reuses), and reports nothing where Linux does not offer
that.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import cpu_backend, cuda_backend
from .features import feature_loss
from .kd import kd_loss
from .linear_kd import linear_kd_loss
from .lipschitz import init_state, spectral_norms
from .teacher_cache import TeacherCache
from .topk import TopK, topk_teacher

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPS = ("kd", "linear", "feature", "lipschitz", "overhead", "topk")
DEFAULT_SHAPES = {
    "kd": {
        "cuda": ["256x100:fp32", "1024x1000:fp32", "8192x32000:bf16", "4096x128256:bf16"],
        "cpu": ["256x100:fp32", "1024x1000:fp32", "512x32000:fp32"],
    },
    "linear": {"cuda": ["8192x4096x128256:bf16"], "cpu": ["4096x1024x32000:fp32"]},
    "feature": {"cuda": ["64x256x28x28:bf16", "256x256x28x28:bf16"], "cpu": ["16x64x28x28:fp32"]},
    "lipschitz": {"cuda": ["resnet18:fp32", "resnet18:bf16"], "cpu": ["resnet18:fp32"]},
    "overhead": {device: ["8x10", "128x100", "256x100", "256x1000", "1024x1000"] for device in ("cuda", "cpu")},
    "topk": {"cuda": ["8192x32000x64:bf16"], "cpu": ["2048x32000x64:fp32"]},
}

CPU = torch.device("cpu")


@dataclasses.dataclass
class Result:
    shape: str
    implementation: str
    forward_ms: Optional[float]
    forward_backward_ms: Optional[float]
    graph_ms: Optional[float]
    peak_extra_mib: Optional[float]
    roofline_pct: Optional[float]
    max_rel_error: Optional[float]
    within_tolerance: Optional[bool]
    note: str = ""


SHAPE_FORMS = {
    "kd": "ROWSxVOCAB",
    "linear": "ROWSxHIDDENxVOCAB",
    "feature": "NxCxHxW",
    "lipschitz": "resnet18",
    "overhead": "ROWSxVOCAB",
    "topk": "ROWSxVOCABxK",
}


def parse_spec(spec: str, op: str = "kd", default_dtype: str = "fp32") -> tuple[tuple, torch.dtype]:
    """``"8192x32000:bf16"`` → ((8192, 32000), torch.bfloat16) for ``op`` (``"resnet18"`` for lipschitz); the
    dtype defaults to ``default_dtype``."""
    dims, _, dtype = spec.partition(":")
    if dtype and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r} in {spec!r}")
    form = SHAPE_FORMS[op]
    if op == "lipschitz":
        if dims != "resnet18":
            raise ValueError(f"lipschitz benchmarks the weights of {form}: write resnet18[:dtype], got {spec!r}")
        return (), DTYPES[dtype or default_dtype]
    try:
        shape = tuple(int(x) for x in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != len(form.split("x")) or min(shape, default=0) < 1:
        raise ValueError(f"a {op} shape is written {form}[:fp32|fp16|bf16], got {spec!r}")
    return shape, DTYPES[dtype or default_dtype]


def parse_shape(spec: str) -> tuple[int, int, torch.dtype]:
    """``"8192x32000:bf16"`` → (8192, 32000, torch.bfloat16); the dtype defaults to fp32."""
    (rows, cols), dtype = parse_spec(spec, "kd")
    return rows, cols, dtype


def eager_kd(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """The expression KD code writes today (torchdistill, mdistiller, most training scripts)."""
    return (
        F.kl_div(
            F.log_softmax(s / temperature, dim=-1),
            F.log_softmax(t / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature
        * temperature
    )


def implementations(
    temperature: float, device: torch.device = CPU
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """kd_loss (its default backend for the device) and the baselines; on CUDA also the CUDA C++ kernels when they
    can run (``"fastkd (cuda)"``)."""
    impls = {
        "fastkd": lambda s, t: kd_loss(s, t, temperature=temperature),
        "torch eager": lambda s, t: eager_kd(s, t, temperature),
        "torch.compile": torch.compile(lambda s, t: eager_kd(s, t, temperature), dynamic=False),
    }
    if device.type == "cuda" and cuda_backend.available():
        impls["fastkd (cuda)"] = lambda s, t: kd_loss(s, t, temperature=temperature, backend="cuda")
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss

        liger = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        impls["liger-kernel"] = lambda s, t: (
            liger(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)) * temperature**2
        )
    return impls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup * 10, rep=reps * 10, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def graph_replay_ms(step: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median time of one replay of a CUDA graph that captured ``step``: the GPU time of a training step whose
    host launch overhead is gone. Raises RuntimeError where ``step`` cannot be captured (a host sync inside)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return median_ms(graph.replay, device, reps=reps)


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak memory above what was in use before ``fn()`` (MiB); None where it cannot be measured."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
        # memory the C++ backend's buffer pool holds for reuse is resident already: count it as extra
        before = _read_status_kib("VmRSS") - cpu_backend.cache_info()["cached_bytes"] // 1024
        fn()
        return max(_read_status_kib("VmHWM") - before, 0) / 1024
    except (OSError, KeyError):
        return None


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 2**30) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def float64_truth(student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk_rows: int = 1024):
    """Batchmean loss and student gradient of the default kd_loss, computed in float64 a few rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    grad = torch.empty(student.shape, dtype=torch.float64, device=student.device)
    for start in range(0, student.shape[0], chunk_rows):
        s = student[start : start + chunk_rows].detach().double().requires_grad_(True)
        loss = kd_loss(
            s,
            teacher[start : start + chunk_rows].double(),
            temperature=temperature,
            reduction="sum",
            backend="reference",
        )
        (grad[start : start + chunk_rows],) = torch.autograd.grad(loss, s)
        total += loss.detach()
    rows = max(student.shape[0], 1)
    return total / rows, grad.div_(rows)


def bench_shape(
    spec: str, device: torch.device, temperature: float, impls, bandwidth_gbs: Optional[float], reps: int
) -> list[Result]:
    rows, cols, dtype = parse_shape(spec)
    gen = torch.Generator(device="cpu").manual_seed(rows * 1_000_003 + cols)
    student = (torch.randn(rows, cols, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = (torch.randn(rows, cols, generator=gen) * 2).to(device=device, dtype=dtype)
    elem = student.element_size()
    roofline_bytes = rows * cols * 5 * elem  # forward: s + t, backward: s + t + ∂s
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2  # a bf16/fp16 gradient is rounded to 2^-8 or 2^-11

    ref_loss, ref_grad = float64_truth(student, teacher, temperature)
    return _bench_implementations(
        spec,
        device,
        impls,
        (student, teacher),
        (student,),
        ref_loss,
        (ref_grad,),
        roofline_bytes,
        bandwidth_gbs,
        tolerance,
        reps,
    )


def _bench_implementations(
    spec: str,
    device: torch.device,
    impls: dict,
    inputs: tuple,
    wrt: tuple,
    truth_loss: torch.Tensor,
    truth_grads: tuple,
    roofline_bytes: Optional[float],
    bandwidth_gbs: Optional[float],
    tolerance: float,
    reps: int,
) -> list[Result]:
    """For each ``impl(*inputs)``: its loss and its gradients w.r.t. ``wrt`` against the truth, then its forward
    and forward+backward times, memory, roofline share and (CUDA) CUDA-graph replay time. Failures (out of memory,
    say) are reported in the row, not raised."""
    results = []
    for name, impl in impls.items():
        try:
            loss = impl(*inputs)
            grads = torch.autograd.grad(loss, wrt)
            error = max(relative_error(x, y) for x, y in zip((loss, *grads), (truth_loss, *truth_grads)))
            del loss, grads

            def forward(impl=impl):
                with torch.no_grad():
                    return impl(*inputs)

            def forward_backward(impl=impl):
                return torch.autograd.grad(impl(*inputs), wrt)

            result = _timed_result(
                spec, name, device, forward, forward_backward, reps, roofline_bytes, bandwidth_gbs, error, tolerance
            )
        except RuntimeError as exc:
            result = Result(spec, name, None, None, None, None, None, None, None, f"{type(exc).__name__}: {exc}"[:80])
        if device.type == "cuda" and result.forward_backward_ms is not None:
            try:
                result.graph_ms = graph_replay_ms(forward_backward, device, reps)
            except RuntimeError:
                result.note = "not capturable in a CUDA graph (host sync)"
        results.append(result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _timed_result(
    spec: str,
    name: str,
    device: torch.device,
    forward,
    forward_backward,
    reps: int,
    roofline_bytes: Optional[float],
    bandwidth_gbs: Optional[float],
    error: float,
    tolerance: float,
) -> Result:
    """Time ``forward`` (and ``forward_backward`` unless None), read the peak memory, fill a Result."""
    fwd = median_ms(forward, device, reps=reps)
    fwd_bwd = median_ms(forward_backward, device, reps=reps) if forward_backward is not None else None
    memory = peak_extra_mib(forward_backward or forward, device)
    timed = fwd_bwd if fwd_bwd is not None else fwd
    roofline = None
    if bandwidth_gbs is not None and roofline_bytes is not None:
        roofline = 100 * (roofline_bytes / (bandwidth_gbs * 1e9) * 1e3) / timed
    return Result(spec, name, fwd, fwd_bwd, None, memory, roofline, error, error <= tolerance)


def linear_implementations(temperature: float) -> dict:
    """name → impl(h, w, th, tw) for the linear benchmark: fastkd's fused-linear loss and the ways users get the
    same loss by materialising the logits."""

    def logits(h, w, th, tw):
        with torch.no_grad():
            teacher = th @ tw.T
        return h @ w.T, teacher

    eager = torch.compile(lambda h, w, th, tw: eager_kd(*logits(h, w, th, tw), temperature), dynamic=False)
    impls = {
        "fastkd": lambda h, w, th, tw: linear_kd_loss(h, w, th, tw, temperature=temperature),
        "logits + kd_loss": lambda h, w, th, tw: kd_loss(*logits(h, w, th, tw), temperature=temperature),
        "torch eager": lambda h, w, th, tw: eager_kd(*logits(h, w, th, tw), temperature),
        "torch.compile": eager,
    }
    if importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)  # β = 0: forward KL, without T²
        impls["liger-kernel"] = lambda h, w, th, tw: liger(h, w, th, tw) * temperature**2
    return impls


def bench_linear_shape(spec: str, device: torch.device, temperature: float, reps: int) -> list[Result]:
    """linear_kd_loss on (N, H) hidden states and (V, H) heads (the teacher's of the same sizes) against the
    implementations that build the logits: loss, hidden and weight gradients checked against float64 (the
    reference rows, chunk by chunk, on float64 copies), then timed; memory is the peak above the inputs."""
    (rows, hidden, vocab), dtype = parse_spec(spec, "linear")
    gen = torch.Generator(device="cpu").manual_seed(rows + hidden + vocab)

    def draw(*shape, scale):
        return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)

    h, th = draw(rows, hidden, scale=1.0).requires_grad_(True), draw(rows, hidden, scale=1.0)
    w, tw = (
        draw(vocab, hidden, scale=hidden**-0.5 * 2).requires_grad_(True),
        draw(vocab, hidden, scale=hidden**-0.5 * 2),
    )
    leaves = [x.detach().double().requires_grad_(True) for x in (h, w)]
    truth = linear_kd_loss(*leaves, th.double(), tw.double(), temperature=temperature, backend="reference")
    truth_grads = torch.autograd.grad(truth, leaves)
    del leaves
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    impls = linear_implementations(temperature)
    return _bench_implementations(
        spec, device, impls, (h, w, th, tw), (h, w), truth, truth_grads, None, None, tolerance, reps
    )


def interleaved_ms(fns: dict, device: torch.device, rounds: int, block_s: float = 2e-3) -> dict:
    """name → median over ``rounds`` of the mean ms per call of ``fns[name]()``. Each round times a block of calls
    of every function in turn (about ``block_s`` seconds each), so the host's drift over the run, which moves
    µs-scale timings by up to 2× on a shared VM, falls on all of them alike."""

    def block(fn, calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3 / calls

    calls = {}
    for name, fn in fns.items():
        block(fn, 3)  # warm-up
        calls[name] = max(1, int(block_s * 1e3 / max(block(fn, 3), 1e-6)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(block(fn, calls[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def bench_overhead_shape(spec: str, device: torch.device, temperature: float, reps: int) -> list[Result]:
    """Per-call time at classification shapes, where the host's work decides the step: kd_loss on every kernel
    backend that runs here (and the reference) against the eager expression and torch.compile of it, forward alone
    (no grad) and forward+backward through autograd, timed in ``reps`` interleaved rounds (:func:`interleaved_ms`;
    µs: the ms columns × 1000); on CPU once with 1 thread and once with 2 (the shape names the thread count)."""
    (rows, cols), dtype = parse_spec(spec, "overhead")
    gen = torch.Generator(device="cpu").manual_seed(rows + cols)
    student = (torch.randn(rows, cols, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = (torch.randn(rows, cols, generator=gen) * 2).to(device=device, dtype=dtype)
    truth_loss, truth_grad = float64_truth(student, teacher, temperature)
    backends = ["triton", "cuda"] if device.type == "cuda" else (["cpu"] if cpu_backend.AVAILABLE else [])
    impls = {
        f"fastkd ({b})": (lambda b: lambda s, t: kd_loss(s, t, temperature=temperature, backend=b))(b) for b in backends
    }
    impls["fastkd (reference)"] = lambda s, t: kd_loss(s, t, temperature=temperature, backend="reference")
    impls["torch eager"] = lambda s, t: eager_kd(s, t, temperature)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    before = torch.get_num_threads()
    results = []
    try:
        for threads in [None] if device.type == "cuda" else [1, 2]:
            if threads is not None:
                torch.set_num_threads(threads)
            # compiled afresh for each shape and thread count: the thread count is part of dynamo's guards, and
            # past its recompile limit a compiled function silently runs eagerly
            torch._dynamo.reset()
            impls["torch.compile"] = torch.compile(lambda s, t: eager_kd(s, t, temperature), dynamic=False)
            label = spec if threads is None else f"{spec} {threads}thr"
            steps, errors = {}, {}
            for name, impl in impls.items():
                loss = impl(student, teacher)
                (grad,) = torch.autograd.grad(loss, student)
                errors[name] = max(relative_error(loss, truth_loss), relative_error(grad, truth_grad))

                def forward(impl=impl):
                    with torch.no_grad():
                        return impl(student, teacher)

                steps[name, "fwd"] = forward
                steps[name, "fwd+bwd"] = lambda impl=impl: torch.autograd.grad(impl(student, teacher), student)
            times = interleaved_ms(steps, device, reps)
            for name in impls:
                fwd, fwd_bwd = times[name, "fwd"], times[name, "fwd+bwd"]
                error = errors[name]
                results.append(Result(label, name, fwd, fwd_bwd, None, None, None, error, error <= tolerance))
    finally:
        torch.set_num_threads(before)
    return results


TOPK_TEMPERATURES = (1.0, 2.0)


def topk_float64_truth(student: torch.Tensor, teacher: TopK, temperature: float, chunk_rows: int = 256):
    """Batchmean loss and student gradient of kd_loss against a sparse teacher (tail "bucket"), computed by the
    reference in float64 a few rows at a time."""
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    grad = torch.empty(student.shape, dtype=torch.float64, device=student.device)
    for start in range(0, student.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        s = student[rows].detach().double().requires_grad_(True)
        chunk = TopK(teacher.values[rows].double(), teacher.indices[rows])
        loss = kd_loss(s, chunk, temperature=temperature, tail="bucket", reduction="sum", backend="reference")
        (grad[rows],) = torch.autograd.grad(loss, s)
        total += loss.detach()
    rows = max(student.shape[0], 1)
    return total / rows, grad.div_(rows)


def bench_topk_shape(spec: str, device: torch.device, reps: int) -> list[Result]:
    """kd_loss against a sparse teacher (the top-K log-probabilities of N(0, 2²) teacher logits, tail "bucket",
    batchmean) at each of :data:`TOPK_TEMPERATURES`: the kernel backend of the device (C++ on CPU, Triton on CUDA)
    against the reference, forward alone (no grad) and forward+backward through autograd, timed in ``reps``
    interleaved rounds (:func:`interleaved_ms`; CPU timings drift, which then falls on both alike); on CPU once with
    1 thread and once with 2 (the row's label names T and the thread count). rel err against float64."""
    (rows, cols, k), dtype = parse_spec(spec, "topk")
    if k > cols:
        raise ValueError(f"a topk shape needs K <= VOCAB, got {spec!r}")
    gen = torch.Generator(device="cpu").manual_seed(rows * 1_000_003 + cols + k)
    student = (torch.randn(rows, cols, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = topk_teacher((torch.randn(rows, cols, generator=gen) * 2).to(device), k)
    kernels = ["triton"] if device.type == "cuda" else (["cpu"] if cpu_backend.AVAILABLE else [])
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    before = torch.get_num_threads()
    results = []
    try:
        for temperature in TOPK_TEMPERATURES:
            truth_loss, truth_grad = topk_float64_truth(student, teacher, temperature)
            impls = {
                f"fastkd ({b})": (
                    lambda b: lambda s: kd_loss(s, teacher, temperature=temperature, tail="bucket", backend=b)
                )(b)
                for b in kernels + ["reference"]
            }
            steps, errors = {}, {}
            for name, impl in impls.items():
                loss = impl(student)
                (grad,) = torch.autograd.grad(loss, student)
                errors[name] = max(relative_error(loss, truth_loss), relative_error(grad, truth_grad))
                del loss, grad

                def forward(impl=impl):
                    with torch.no_grad():
                        return impl(student)

                steps[name, "fwd"] = forward
                steps[name, "fwd+bwd"] = lambda impl=impl: torch.autograd.grad(impl(student), student)
            for threads in [None] if device.type == "cuda" else [1, 2]:
                if threads is not None:
                    torch.set_num_threads(threads)
                label = f"{spec} T={temperature:g}" + ("" if threads is None else f" {threads}thr")
                times = interleaved_ms(steps, device, reps)
                for name in impls:
                    error = errors[name]
                    results.append(
                        Result(
                            label,
                            name,
                            times[name, "fwd"],
                            times[name, "fwd+bwd"],
                            None,
                            None,
                            None,
                            error,
                            error <= tolerance,
                        )
                    )
    finally:
        torch.set_num_threads(before)
    return results


def teacher_cache_figures(
    root: str, vocab_size: int, k: int, *, samples: int = 512, length: int = 512, batch: int = 8, runs: int = 3
) -> dict:
    """A :class:`fastkd.TeacherCache` on this machine: bytes per token (every part on disk), write and read
    throughput in tokens/s (medians of ``runs``). ``samples`` of ``length`` tokens, random top-k log-probabilities
    in bfloat16 (the teacher's own top-k is not timed); writes include the fsync, checksums and atomic renames;
    reads are random batches through ``collate``, timed on the second pass (warm page cache, checksums verified on
    the first), the figure a training loop sees after its first epoch."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        TopK(
            -torch.rand(batch, length, k, generator=gen) * 10 - 3,  # log-probs well below log(1/k)
            torch.randint(0, vocab_size, (batch, length, k), generator=gen),
        )
        for _ in range(samples // batch)
    ]
    tokens = len(batches) * batch * length
    writes, reads = [], []
    for run in range(runs):
        path = os.path.join(root, f"v{vocab_size}-k{k}-{run}")
        start = time.perf_counter()
        with TeacherCache.write(path, k=k, vocab_size=vocab_size) as writer:
            for b, top in enumerate(batches):
                writer.add(range(b * batch, (b + 1) * batch), top)
        writes.append(tokens / (time.perf_counter() - start))
        cache = TeacherCache(path)
        order = torch.randperm(len(batches) * batch, generator=gen).tolist()
        for _epoch in range(2):
            start = time.perf_counter()
            for i in range(0, len(order), batch):
                cache.collate(order[i : i + batch])
        reads.append(tokens / (time.perf_counter() - start))
        payload = sum(size for shard in cache.index["shards"] for size in shard["bytes"].values())
        shutil.rmtree(path)
    return dict(
        vocab_size=vocab_size,
        k=k,
        bytes_per_token=payload / tokens,
        write_tokens_per_s=statistics.median(writes),
        read_tokens_per_s=statistics.median(reads),
    )


def eager_feature_loss(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked, per-channel standardised MSE between (N, C, H, W) maps, as eager code writes it."""
    count = mask.sum((2, 3), keepdim=True).clamp_min(1)

    def standardise(x):
        mean = (x * mask).sum((2, 3), keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum((2, 3), keepdim=True) / count
        return (x - mean) / torch.sqrt(var + 1e-5)

    diff = standardise(s.float()) - standardise(t.float())
    return (diff**2 * mask).sum() / mask.expand_as(diff).sum()


def bench_feature_shape(spec: str, device: torch.device, bandwidth_gbs: Optional[float], reps: int) -> list[Result]:
    """feature_loss (spatial mask, normalize="channel", mse) forward and forward+backward against eager code."""
    shape, dtype = parse_spec(spec, "feature")
    gen = torch.Generator(device="cpu").manual_seed(sum(shape))
    student = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    teacher = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    mask = (torch.rand(shape[0], 1, *shape[2:], generator=gen) > 0.2).to(device=device, dtype=torch.float32)
    impls = {
        "fastkd": lambda s, t: feature_loss(s, t, mask=mask, normalize="channel"),
        "torch eager": lambda s, t: eager_feature_loss(s, t, mask),
        "torch.compile": torch.compile(lambda s, t: eager_feature_loss(s, t, mask), dynamic=False),
    }
    s64 = student.detach().double().requires_grad_(True)
    truth = feature_loss(s64, teacher.double(), mask=mask.double(), normalize="channel", backend="reference")
    (truth_grad,) = torch.autograd.grad(truth, s64)
    # forward reads s, t and the mask; backward reads them again and writes the gradient of s
    roofline_bytes = student.numel() * student.element_size() * 5 + 2 * mask.numel() * mask.element_size()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    return _bench_implementations(
        spec,
        device,
        impls,
        (student, teacher),
        (student,),
        truth,
        (truth_grad,),
        roofline_bytes,
        bandwidth_gbs,
        tolerance,
        reps,
    )


def resnet18_weight_shapes() -> list:
    """The 21 Linear/Conv weight shapes of torchvision's ResNet-18 (11.7M parameters), without torchvision."""
    shapes = [(64, 3, 7, 7)]
    channels = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(width, channels if block == 0 else width, 3, 3), (width, width, 3, 3)]
            if block == 0 and (stride != 1 or channels != width):
                shapes.append((width, channels, 1, 1))
        channels = width
    return shapes + [(1000, 512)]


def resnet18_weights(dtype: torch.dtype, device, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=g) / shape[1] ** 0.5).to(dtype).to(device) for shape in resnet18_weight_shapes()
    ]


def loop_power_iteration(weights: list, us: list, vs: list, eps: float = 1e-12) -> torch.Tensor:
    """The iteration of spectral_norms, layer by layer in PyTorch (W v and Wᵀ u: each weight read twice); updates
    us/vs in place and returns σ."""
    sigmas = []
    for i, w in enumerate(weights):
        matrix = w.reshape(w.shape[0], -1)
        a = torch.mv(matrix, vs[i].to(w.dtype)).float()
        b = torch.mv(matrix.T, us[i].to(w.dtype)).float()
        sigma = a.norm()
        us[i], vs[i] = a / sigma.clamp_min(eps), b / b.norm().clamp_min(eps)
        sigmas.append(sigma)
    return torch.stack(sigmas)


def power_iteration_steps(weights: list) -> dict:
    """name → step(): one power iteration over the whole list, each implementation with its own state."""
    state = [init_state(weights, generator=torch.Generator().manual_seed(1))]
    us = list(state[0].u.split([w.shape[0] for w in weights]))
    vs = list(state[0].v.split([w[0].numel() for w in weights]))

    def fused():
        sigma, state[0] = spectral_norms(weights, n_iter=1, state=state[0])
        return sigma

    return {"fastkd": fused, "per-layer torch loop": lambda: loop_power_iteration(weights, us, vs)}


def bench_lipschitz(spec: str, device: torch.device, bandwidth_gbs: Optional[float], reps: int) -> list[Result]:
    """One power iteration over ResNet-18's weights: fastkd's grouped pass against the per-layer loop. The
    roofline is reading every weight once; "rel err" is the relative difference (2-norm over the 21 σ) between
    the two implementations after 200 iterations of each."""
    _, dtype = parse_spec(spec, "lipschitz")
    weights = resnet18_weights(dtype, device)
    steps = power_iteration_steps(weights)
    sigmas = {}
    for name, step in steps.items():
        for _ in range(200):
            sigmas[name] = step()
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    fastkd_sigma, loop_sigma = sigmas.values()
    difference = relative_error(fastkd_sigma, loop_sigma.double())
    return [
        _timed_result(spec, name, device, step, None, reps, nbytes, bandwidth_gbs, difference, tolerance)
        for name, step in steps.items()
    ]


def environment(device: torch.device) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    if device.type == "cpu":
        env["threads"] = torch.get_num_threads()
        env["fastkd_cpu_backend"] = cpu_backend.isa() or "not built (reference)"
    return env


def format_table(results: list[Result]) -> str:
    """One line per (shape, implementation); the speedup compares forward+backward (forward alone where an op has
    no backward) with fastkd's on the same shape."""

    def fmt(x, spec):
        return format("-", ">" + spec.split(".")[0]) if x is None else format(x, spec)

    def timed(r):
        return r.forward_backward_ms if r.forward_backward_ms is not None else r.forward_ms

    base = {}  # the first fastkd row of each shape
    for r in results:
        if r.implementation.startswith("fastkd") and r.shape not in base:
            base[r.shape] = timed(r)
    width = max([18] + [len(r.shape) for r in results])  # topk labels name T and the thread count too
    header = (
        f"{'shape':<{width}} {'implementation':<20} {'fwd ms':>9} {'fwd+bwd ms':>11} {'graph ms':>9} "
        f"{'fastkd speedup':>14} {'peak MiB':>9} {'roofline':>8} {'rel err':>8}  within tolerance"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        speedup = timed(r) / base[r.shape] if timed(r) and base.get(r.shape) else None
        within = "-" if r.within_tolerance is None else ("yes" if r.within_tolerance else "NO")
        lines.append(
            f"{r.shape:<{width}} {r.implementation:<20} {fmt(r.forward_ms, '9.3f')} "
            f"{fmt(r.forward_backward_ms, '11.3f')} {fmt(r.graph_ms, '9.3f')} {fmt(speedup, '13.2f')}x "
            f"{fmt(r.peak_extra_mib, '9.1f')} {fmt(r.roofline_pct, '7.1f')}"
            f"{' ' if r.roofline_pct is None else '%'} {fmt(r.max_rel_error, '8.1e')}  {within} {r.note}"
        )
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Save a figure of ``report`` (from :func:`run`): for kd_loss and feature_loss, forward+backward time against
    the problem size (vocabulary; elements per sample) and the share of the memory roofline, per implementation;
    for the spectral norms, one iteration's time per implementation. Needs matplotlib (``pip install
    'fastkd[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastkd[bench]'") from exc
    ops = [op for op in OPS if report["results"].get(op) and op not in ("overhead", "topk")]  # tables only
    figure, axes = plt.subplots(2, len(ops), figsize=(5 * len(ops), 7), squeeze=False)
    for column, op in enumerate(ops):
        results = report["results"][op]
        time_axis, roofline_axis = axes[0][column], axes[1][column]
        if op == "lipschitz":
            labels = [f"{r['implementation']}\n{r['shape']}" for r in results]
            time_axis.bar(labels, [r["forward_ms"] or 0 for r in results])
            roofline_axis.bar(labels, [r["roofline_pct"] or 0 for r in results])
            time_axis.set_ylabel("one iteration, ms")
        else:

            def split(spec):  # (the size on the x axis, the rest of the shape and the dtype: the line's label)
                shape, dtype = parse_spec(spec, op)
                dtype = str(dtype).replace("torch.", "")
                if op == "kd":
                    return shape[1], f"{shape[0]} rows", dtype
                if op == "linear":
                    return shape[2], f"{shape[0]} rows, H={shape[1]}", dtype
                return shape[1] * shape[2] * shape[3], f"N={shape[0]}", dtype

            lines = {}
            for r in results:
                if r["forward_backward_ms"] is not None:
                    size, rest, dtype = split(r["shape"])
                    lines.setdefault(f"{r['implementation']}, {rest}, {dtype}", []).append(
                        (size, r["forward_backward_ms"], r["roofline_pct"] or 0)
                    )
            for label, points in lines.items():
                points.sort(key=lambda p: p[0])
                time_axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
                roofline_axis.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
            for axis in (time_axis, roofline_axis):
                axis.set_xscale("log")
                axis.set_xlabel("elements per sample (C·H·W)" if op == "feature" else "vocabulary size")
            time_axis.set_yscale("log")
            time_axis.set_ylabel("forward+backward, ms")
            time_axis.legend()
        time_axis.set_title(f"{op} on {report['environment']['device']}")
        roofline_axis.set_ylabel("% of memory roofline")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run(
    shapes: Optional[list[str]] = None,
    *,
    op: str = "kd",
    device: Optional[str] = None,
    temperature: float = 4.0,
    reps: int = 20,
    dtype: Optional[str] = None,
    json_path: Optional[str] = None,
    plot_path: Optional[str] = None,
    log=print,
) -> dict:
    """Benchmark ``op`` (one of :data:`OPS`, or ``"all"`` with the default shapes of each) on ``shapes`` (default:
    sized for the device; ``dtype`` is the dtype of every default shape and of given shapes that name none),
    print the table, optionally write JSON and a plot; returns the report."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if op not in OPS + ("all",):
        raise ValueError(f"op must be one of {OPS + ('all',)}, got {op!r}")
    if op == "all" and shapes:
        raise ValueError("--op all runs each op's default shapes; give --shapes with a single --op")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'fastkd[bench]'")

    def with_dtype(spec: str, default: bool) -> str:  # --dtype: for shapes that name none, and every default shape
        if dtype is None or (":" in spec and not default):
            return spec
        return f"{spec.partition(':')[0]}:{dtype}"

    plan = {
        name: [with_dtype(spec, not shapes) for spec in (shapes or DEFAULT_SHAPES[name][dev.type])]
        for name in (OPS if op == "all" else (op,))
    }
    for name, specs in plan.items():
        for spec in specs:
            parse_spec(spec, name)  # fail before any timing
    env = environment(dev)
    bandwidth = copy_bandwidth_gbs(dev)
    env["copy_bandwidth_gbs"] = round(bandwidth, 1)
    log(f"fastkd bench: {env}")
    report = {"environment": env, "temperature": temperature, "results": {}}
    for name, specs in plan.items():
        if name == "kd":
            log(
                f"kd_loss forward+backward, T={temperature}, batchmean; speedup = implementation time / fastkd "
                f"time; rel err = max relative error of loss and student gradient against float64; roofline = "
                f"time to read s and t twice and write the gradient at the copy bandwidth / measured time"
            )
            impls = implementations(temperature, dev)
            results = [r for spec in specs for r in bench_shape(spec, dev, temperature, impls, bandwidth, reps)]
        elif name == "linear":
            log(
                f"linear_kd_loss from (N, H) hidden states and (V, H) heads, forward+backward (gradients of the "
                f"student's hidden states and weight), T={temperature}, batchmean; rel err = max relative error of "
                f"loss and gradients against float64; peak MiB above the inputs"
            )
            results = [r for spec in specs for r in bench_linear_shape(spec, dev, temperature, reps)]
        elif name == "overhead":
            log(
                f"kd_loss per call at classification shapes, T={temperature}, batchmean: fwd (no grad) and fwd+bwd "
                f"(autograd) in ms (×1000 for µs), medians of {reps} interleaved rounds of ~2 ms blocks of calls; "
                f"speedup = implementation time / fastkd time (the first fastkd row); rel err against float64"
            )
            results = [r for spec in specs for r in bench_overhead_shape(spec, dev, temperature, reps)]
        elif name == "topk":
            log(
                f"kd_loss against a sparse teacher: its top-K log-probabilities, tail='bucket', batchmean, at T = "
                f"{' and '.join(f'{t:g}' for t in TOPK_TEMPERATURES)} (--temperature does not apply): fwd (no grad) "
                f"and fwd+bwd (autograd) in ms, medians of {reps} interleaved rounds; speedup = implementation time "
                f"/ fastkd time (the first fastkd row); rel err = max relative error of loss and student gradient "
                f"against float64"
            )
            results = [r for spec in specs for r in bench_topk_shape(spec, dev, reps)]
            with tempfile.TemporaryDirectory() as root:
                caches = []
                for spec in specs:
                    (_, vocab_size, k), _ = parse_spec(spec, "topk")
                    caches.append(teacher_cache_figures(root, vocab_size, k, samples=64))
            report["teacher_cache"] = caches
            for figures in caches:
                log(
                    f"TeacherCache V={figures['vocab_size']} k={figures['k']} (64 samples x 512 tokens, bfloat16): "
                    f"{figures['bytes_per_token']:.1f} bytes/token, write {figures['write_tokens_per_s']:.3g} "
                    f"tokens/s, read {figures['read_tokens_per_s']:.3g} tokens/s (warm, through collate)"
                )
        elif name == "feature":
            log(
                "feature_loss (mse, spatial mask, normalize='channel') forward and forward+backward; rel err against "
                "float64; roofline = time to read s, t and the mask twice and write the gradient / measured time"
            )
            results = [r for spec in specs for r in bench_feature_shape(spec, dev, bandwidth, reps)]
        else:
            log(
                "spectral norms: one power iteration over the 21 Linear/Conv weights of ResNet-18 (fwd ms); rel err "
                "= relative difference of the two implementations' σ after 200 iterations each; roofline = time to "
                "read every weight once / measured time"
            )
            results = [r for spec in specs for r in bench_lipschitz(spec, dev, bandwidth, reps)]
        log(format_table(results))
        report["results"][name] = [dataclasses.asdict(r) for r in results]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    if plot_path:
        plot(report, plot_path)
    return report
