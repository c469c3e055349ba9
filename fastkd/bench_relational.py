"""``fastkd bench --op relational``: RKD (distance + angle) and CRD, forward+backward, fastkd against the eager
formulations as the authors' code writes them (:func:`fastkd.reference.rkd_distance_loss`,
:func:`fastkd.reference.rkd_angle_loss`: the (B, B, D) differences and (B, B, B) angles;
:func:`fastkd.reference.crd_scores`: the gathered (B, K+1, d) rows) and ``torch.compile`` of them: agreement first,
then the median time per step (interleaved rounds) and the peak extra memory of one step (CUDA: the allocator's
peak; CPU: the growth of the peak resident set, VmHWM, reset after the setup, of a fresh process set up for only
that step, with glibc mapping every block from 64 kB up on its own so that freed memory leaves the resident set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from . import reference, relational
from .bench import interleaved_ms

RKD_SHAPE = (256, 512)  # B, D
CRD_SHAPE = (64, 16384, 128, 50000)  # B, K, d, N
CRD_LARGE_SAMPLES = 1281167  # N of ImageNet-1k's training set: past 8·(K+1), fastkd's gather-dot kernels run


def _rkd_inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    batch, width = RKD_SHAPE
    s = torch.randn(batch, width, generator=g).to(device, dtype).requires_grad_()
    return s, torch.randn(batch, width, generator=g).to(device, dtype)


def _rkd_eager(s, t):
    return 25 * reference.rkd_distance_loss(s, t) + 50 * reference.rkd_angle_loss(s, t)


def _crd_setup(device, samples=None):
    batch, negatives, dim, default_samples = CRD_SHAPE
    samples = samples or default_samples
    torch.manual_seed(0)
    crd = relational.CRDLoss(samples, 256, 256, feat_dim=dim, num_negatives=negatives).to(device)
    g = torch.Generator().manual_seed(1)
    f_s = torch.randn(batch, 256, generator=g).to(device).requires_grad_()
    f_t = torch.randn(batch, 256, generator=g).to(device)
    index = torch.randperm(samples, generator=g)[:batch].to(device)
    contrast = torch.cat([index[:, None], torch.randint(samples, (batch, negatives), generator=g).to(device)], 1)
    return crd, f_s, f_t, index, contrast


def _crd_eager(crd, f_s, f_t, contrast):
    """One CRD step as RepDistiller writes it: the gathered rows per side, then the same NCE and bank update."""
    v_s = torch.nn.functional.normalize(crd.embed_student(f_s), dim=1)
    v_t = torch.nn.functional.normalize(crd.embed_teacher(f_t), dim=1)
    u_s = reference.crd_scores(crd.teacher_bank, contrast, v_s)
    u_t = reference.crd_scores(crd.student_bank, contrast, v_t)
    options = dict(temperature=crd.temperature, num_samples=crd.num_samples)
    loss = reference.crd_nce_loss(u_s, crd.normalizers[0], **options)
    loss = loss + reference.crd_nce_loss(u_t, crd.normalizers[1], **options)
    with torch.no_grad():
        index = contrast[:, 0]
        for bank, v in ((crd.student_bank, v_s), (crd.teacher_bank, v_t)):
            rows = bank[index] * crd.momentum + v * (1 - crd.momentum)
            bank.index_copy_(0, index, rows / rows.norm(dim=1, keepdim=True))
    return loss


def _steps(device, only=None):
    """name → a callable running one forward+backward step (``only``: build just that one, so that nothing else's
    setup raises the peak that :func:`_peak_mb` reads)."""
    steps = {}
    if only is None or only.startswith("rkd"):
        s, t = _rkd_inputs(device)
        compiled_rkd = torch.compile(_rkd_eager)
        steps["rkd fastkd"] = lambda: relational.rkd_loss(s, t).backward()
        steps["rkd eager"] = lambda: _rkd_eager(s, t).backward()
        steps["rkd torch.compile"] = lambda: compiled_rkd(s, t).backward()
    for suffix, samples in (("", None), (" large N", CRD_LARGE_SAMPLES)):
        if only is not None and only not in (f"crd fastkd{suffix}", f"crd eager{suffix}"):
            continue
        crd, f_s, f_t, index, contrast = _crd_setup(device, samples)
        crd(f_s, f_t, index, contrast)  # sets Z from a first batch, as training does
        steps[f"crd fastkd{suffix}"] = lambda c=crd, a=(f_s, f_t, index, contrast): c(*a).backward()
        steps[f"crd eager{suffix}"] = lambda c=crd, a=(f_s, f_t, contrast): _crd_eager(c, *a).backward()
    return steps if only is None else {only: steps[only]}


def _agreement(device) -> dict:
    s, t = _rkd_inputs(device)
    ours, eager = relational.rkd_loss(s, t), _rkd_eager(s, t)
    (grad_ours,) = torch.autograd.grad(ours, s)
    (grad_eager,) = torch.autograd.grad(eager, s)
    result = {
        "rkd loss rel. error": float(((ours - eager) / eager).abs().detach()),
        "rkd grad rel. error": float((grad_ours - grad_eager).norm() / grad_eager.norm()),
    }
    for suffix, samples in (("", None), (" large N", CRD_LARGE_SAMPLES)):
        crd, f_s, f_t, index, contrast = _crd_setup(device, samples)
        crd(f_s, f_t, index, contrast)
        twin = _crd_setup(device, samples)[0]
        twin.load_state_dict(crd.state_dict())
        loss_ours, loss_eager = crd(f_s, f_t, index, contrast), _crd_eager(twin, f_s, f_t, contrast)
        (grad_ours,) = torch.autograd.grad(loss_ours, f_s)
        (grad_eager,) = torch.autograd.grad(loss_eager, f_s)
        result[f"crd{suffix} loss rel. error"] = float(((loss_ours - loss_eager) / loss_eager).abs().detach())
        result[f"crd{suffix} grad rel. error"] = float((grad_ours - grad_eager).norm() / grad_eager.norm())
    return result


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss_kb() -> int:
    """Reset this process's peak resident set (VmHWM) to what it holds now and return that (kB): the setup, which
    runs a first step, must not leave a peak above the measured step's. Not ``ru_maxrss``: Linux carries it over
    from the parent across fork and exec, and it cannot be reset."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    return _status_kb("VmRSS")


def _peak_mb(name: str, device) -> float:
    """Peak extra memory (MB) of one step of ``name`` (see the module docstring)."""
    if device.type == "cuda":
        step = _steps(device, name)[name]
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    code = (
        "import torch\n"
        "from fastkd import bench_relational as b\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"b.RKD_SHAPE, b.CRD_SHAPE, b.CRD_LARGE_SAMPLES = {RKD_SHAPE}, {CRD_SHAPE}, {CRD_LARGE_SAMPLES}\n"
        f"step = b._steps(torch.device('cpu'), {name!r})[{name!r}]\n"
        "before = b._reset_peak_rss_kb()\n"
        "step()\n"
        "print((b._status_kb('VmHWM') - before) / 1024)\n"
    )
    # every block from 64 kB up mapped on its own and unmapped when freed: the resident set then follows the live
    # tensors, instead of keeping blocks the setup freed, which the step would reuse unseen
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def run(device=None, reps: int = 5, json_path=None) -> dict:
    """Print the table (and write it as JSON) on ``device`` (default cuda when available)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    agreement = _agreement(device)
    steps = _steps(device)
    peaks = {name: _peak_mb(name, device) for name in steps if "compile" not in name}  # compile keeps its buffers
    times = interleaved_ms(steps, device, rounds=reps, block_s=0.2)
    batch, width = RKD_SHAPE
    crd_batch, negatives, dim, samples = CRD_SHAPE
    print(f"device {device}, threads {torch.get_num_threads()}, fp32, forward+backward, medians of {reps} rounds")
    print(
        f"RKD B={batch} D={width}; CRD B={crd_batch} K={negatives} d={dim} N={samples} (large N: {CRD_LARGE_SAMPLES})"
    )
    for key, value in agreement.items():
        print(f"  agreement: {key} {value:.2e}")
    print(f"{'step':<20} {'ms':>10} {'peak MB':>10}")
    for name, ms in times.items():
        peak = f"{peaks[name]:.1f}" if name in peaks else "-"
        print(f"{name:<20} {ms:>10.1f} {peak:>10}")
    result = dict(device=str(device), agreement=agreement, ms=times, peak_mb=peaks)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result
