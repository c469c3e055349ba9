"""Vocabulary-parallel kd_loss over gloo in spawned processes (world sizes 2 and 3): every rank's loss equals the
single-process loss on the whole rows, each rank's gradients are its slices of the full gradients, one collective
per forward and none per backward, DTensor logits placed Shard(-1), and slices that do not tile the vocabulary."""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd

from conftest import assert_rel_close

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "broadcast",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)


def cases():
    """(name, V, divergence, dtype, temperature, with labels and CE)."""
    out = []
    for num_classes in (1000, 1001):
        for divergence in ("kl", "reverse_kl", "jsd", "cosine", "tvd"):
            for dtype in (torch.float32, torch.bfloat16):
                out.append((f"{num_classes}-{divergence}-{dtype}", num_classes, divergence, dtype))
    return out


def inputs(num_classes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + num_classes)
    s = (torch.randn(2, 5, num_classes, generator=g) * 3).to(dtype)
    t = (torch.randn(2, 5, num_classes, generator=g) * 3).to(dtype)
    labels = torch.randint(0, num_classes, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100
    return s, t, labels


OPTIONS = dict(temperature=2.0, ce_weight=0.3, beta=0.3)


def linear_inputs():
    """Hidden states (2, 5, 6), heads (V = 301) of both sides, labels with ignored rows."""
    g = torch.Generator().manual_seed(7)
    h, th = torch.randn(2, 5, 6, generator=g), torch.randn(2, 5, 4, generator=g)
    w, b, tw = torch.randn(301, 6, generator=g), torch.randn(301, generator=g), torch.randn(301, 4, generator=g)
    labels = torch.randint(0, 301, (2, 5), generator=g)
    labels[1, 2] = -100
    return h, w, b, th, tw, labels


def count_collectives(counter):
    """Wrap torch.distributed's collectives to count the calls (in this process)."""
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def counted(*args, _original=original, _name=name, **kwargs):
            counter.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = []
    count_collectives(calls)
    results = {}
    for name, num_classes, divergence, dtype in cases():
        s, t, labels = inputs(num_classes, dtype)
        sizes = [len(part) for part in torch.arange(num_classes).tensor_split(world)]
        start = sum(sizes[:rank])
        local_s = s[..., start : start + sizes[rank]].clone().requires_grad_()
        local_t = t[..., start : start + sizes[rank]].clone().requires_grad_()
        even = len(set(sizes)) == 1
        calls.clear()
        loss, stats = fastkd.kd_loss(
            local_s,
            local_t,
            labels=labels,
            divergence=divergence,
            group=dist.group.WORLD,
            vocab_start=None if even else start,
            return_stats=True,
            **OPTIONS,
        )
        forward_calls = list(calls)
        calls.clear()
        loss.backward()
        results[name] = dict(
            loss=loss.detach(),
            stats=stats,
            grad_s=local_s.grad,
            grad_t=local_t.grad,
            forward_calls=forward_calls,
            backward_calls=list(calls),
        )
    # dkd_loss: the non-target statistics and both target logits in one all-gather
    for num_classes in (1000, 1001):
        s, t, labels = inputs(num_classes, torch.float32)
        sizes = [len(part) for part in torch.arange(num_classes).tensor_split(world)]
        start = sum(sizes[:rank])
        local_s = s[..., start : start + sizes[rank]].clone().requires_grad_()
        calls.clear()
        loss = fastkd.dkd_loss(
            local_s,
            t[..., start : start + sizes[rank]],
            labels,
            temperature=4.0,
            ce_weight=0.3,
            group=dist.group.WORLD,
            vocab_start=start,
        )
        forward_calls = list(calls)
        calls.clear()
        loss.backward()
        results[f"dkd-{num_classes}"] = dict(
            loss=loss.detach(), grad_s=local_s.grad, forward_calls=forward_calls, backward_calls=list(calls)
        )
    # linear_kd_loss over vocabulary-sharded heads (hidden states replicated), from teacher heads or logits
    h, w, b, th, tw, labels = linear_inputs()
    sizes = [len(part) for part in torch.arange(w.shape[0]).tensor_split(world)]
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for teacher_as, divergence in (("head", "kl"), ("logits", "kl"), ("head", "jsd"), ("head", "tvd")):
        leaf_h, leaf_w, leaf_b = h.clone().requires_grad_(), w[start:end].clone().requires_grad_(), b[start:end].clone()
        leaf_b.requires_grad_()
        teacher = (
            dict(teacher_hidden=th, teacher_weight=tw[start:end])
            if teacher_as == "head"
            else dict(teacher_logits=(th @ tw.T)[..., start:end])
        )
        calls.clear()
        loss = fastkd.linear_kd_loss(
            leaf_h,
            leaf_w,
            student_bias=leaf_b,
            labels=labels,
            chunk_rows=3,
            group=dist.group.WORLD,
            vocab_start=start,
            divergence=divergence,
            **teacher,
            **OPTIONS,
        )
        forward_calls = list(calls)
        calls.clear()
        loss.backward()
        results[f"linear-{teacher_as}-{divergence}"] = dict(
            loss=loss.detach(),
            grad_h=leaf_h.grad,
            grad_w=leaf_w.grad,
            grad_b=leaf_b.grad,
            forward_calls=forward_calls,
            backward_calls=list(calls),
        )
    # more ranks than classes (an empty slice takes part too), and float64 logits: float64 math
    for num_classes, dtype in ((world - 1, torch.float32), (7, torch.float64)):
        s, t, labels = inputs(num_classes, dtype)
        sizes = [len(part) for part in torch.arange(num_classes).tensor_split(world)]
        start = sum(sizes[:rank])
        local_s = s[..., start : start + sizes[rank]].clone().requires_grad_()
        loss = fastkd.kd_loss(
            local_s,
            t[..., start : start + sizes[rank]],
            labels=labels,
            group=dist.group.WORLD,
            vocab_start=start,
            **OPTIONS,
        )
        loss.backward()
        results[f"edge-{num_classes}-{dtype}"] = dict(loss=loss.detach(), grad_s=local_s.grad)
    # slices that do not tile [0, V): every rank raises, none hangs
    s, t, labels = inputs(1000, torch.float32)
    try:
        fastkd.kd_loss(s[..., :10], t[..., :10], group=dist.group.WORLD, vocab_start=5 * rank + 1)
    except ValueError as exc:
        results["tiling_error"] = str(exc)
    if world == 2:  # DTensor logits placed Shard(-1)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        s, t, labels = inputs(1001, torch.float32)
        ds = distribute_tensor(s, mesh, [Shard(2)]).requires_grad_()
        dt = distribute_tensor(t, mesh, [Shard(2)])
        loss = fastkd.kd_loss(ds, dt, labels=labels, **OPTIONS)
        loss.backward()
        results["dtensor"] = dict(loss=loss.detach(), grad_s=ds.grad.to_local())
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_kd_loss_equals_the_single_process_loss(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, num_classes, divergence, dtype in cases():
        rtol = 1e-5 if dtype == torch.float32 else 1e-2
        s, t, labels = inputs(num_classes, dtype)
        s, t = s.requires_grad_(), t.requires_grad_()
        want, want_stats = fastkd.kd_loss(s, t, labels=labels, divergence=divergence, return_stats=True, **OPTIONS)
        want.backward()
        exchanges = 2 if divergence in ("jsd", "tvd") else 1
        for rank, results in enumerate(ranks):
            got = results[name]
            assert_rel_close(got["loss"], want, rtol, what=f"{name} loss on rank {rank}")
            for metric, value in want_stats.items():
                assert_rel_close(got["stats"][metric], value, rtol, what=f"{name} {metric}")
            assert got["forward_calls"] in (["all_gather_single"] * exchanges, ["all_gather_into_tensor"] * exchanges)
            assert got["backward_calls"] == []
        for which, full in (("grad_s", s.grad), ("grad_t", t.grad)):
            gathered = torch.cat([results[name][which] for results in ranks], dim=-1)
            assert gathered.dtype == dtype
            assert_rel_close(gathered, full, rtol, what=f"{name} {which}")
        assert all(torch.equal(results[name]["loss"], ranks[0][name]["loss"]) for results in ranks)
    for results in ranks:
        assert "must be contiguous in rank order" in results["tiling_error"]
    h, w, b, th, tw, labels = linear_inputs()
    for teacher_as, divergence in (("head", "kl"), ("logits", "kl"), ("head", "jsd"), ("head", "tvd")):
        leaf_h, leaf_w, leaf_b = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        want = fastkd.linear_kd_loss(
            leaf_h, leaf_w, th, tw, student_bias=leaf_b, labels=labels, divergence=divergence, **OPTIONS
        )
        want.backward()
        name = f"linear-{teacher_as}-{divergence}"
        exchanges = 2 if divergence in ("jsd", "tvd") else 1
        for results in ranks:
            assert_rel_close(results[name]["loss"], want, 1e-5, what=name)
            assert len(results[name]["forward_calls"]) == exchanges and results[name]["backward_calls"] == []
        # the hidden states' gradient: each rank's part, summed over the group (as the TP layer's reduction does)
        assert_rel_close(sum(r[name]["grad_h"] for r in ranks), leaf_h.grad, 1e-5, what=f"{name} grad_h")
        assert_rel_close(torch.cat([r[name]["grad_w"] for r in ranks]), leaf_w.grad, 1e-5, what=f"{name} grad_w")
        assert_rel_close(torch.cat([r[name]["grad_b"] for r in ranks]), leaf_b.grad, 1e-5, what=f"{name} grad_b")
    for num_classes in (1000, 1001):
        s, t, labels = inputs(num_classes, torch.float32)
        s.requires_grad_()
        want = fastkd.dkd_loss(s, t, labels, temperature=4.0, ce_weight=0.3)
        want.backward()
        name = f"dkd-{num_classes}"
        for results in ranks:
            assert_rel_close(results[name]["loss"], want, 1e-5, what=name)
            assert len(results[name]["forward_calls"]) == 1 and results[name]["backward_calls"] == []
        assert_rel_close(torch.cat([r[name]["grad_s"] for r in ranks], dim=-1), s.grad, 1e-5, what=name)
    for num_classes, dtype in ((world - 1, torch.float32), (7, torch.float64)):
        s, t, labels = inputs(num_classes, dtype)
        s.requires_grad_()
        want = fastkd.kd_loss(s, t, labels=labels, **OPTIONS)
        want.backward()
        name = f"edge-{num_classes}-{dtype}"
        for results in ranks:
            assert results[name]["loss"].dtype == dtype
            assert_rel_close(results[name]["loss"], want, 1e-5 if dtype == torch.float32 else 1e-12, what=name)
        grad = torch.cat([results[name]["grad_s"] for results in ranks], dim=-1)
        assert_rel_close(grad, s.grad, 1e-5 if dtype == torch.float32 else 1e-12, what=name)
    if world == 2:
        s, t, labels = inputs(1001, torch.float32)
        s.requires_grad_()
        want = fastkd.kd_loss(s, t, labels=labels, **OPTIONS)
        want.backward()
        for results in ranks:
            assert_rel_close(results["dtensor"]["loss"], want, 1e-5)
        gathered = torch.cat([results["dtensor"]["grad_s"] for results in ranks], dim=-1)
        assert_rel_close(gathered, s.grad, 1e-5)


def test_group_refusals():
    s = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        fastkd.kd_loss(s, s, group=object())
    with pytest.raises(ValueError, match="one full teacher"):
        fastkd.kd_loss(s, fastkd.topk_teacher(s, 2), vocab_start=0)
    h, w, tw = torch.randn(3, 4), torch.randn(10, 4), torch.randn(10, 2)
    with pytest.raises(ValueError, match="no TopK teacher, vocab_size or logit_softcap"):
        fastkd.linear_kd_loss(h, w, torch.randn(3, 2), tw, logit_softcap=30.0, vocab_start=0)
    with pytest.raises(ValueError, match="teacher_weight must hold this rank's 10 classes"):
        fastkd.linear_kd_loss(h, w, torch.randn(3, 2), tw[:9], vocab_start=0)
    with pytest.raises(ValueError, match="gives teacher_logits no gradient"):
        fastkd.dkd_loss(s, s.clone().requires_grad_(), torch.tensor([0, 1, 2]), vocab_start=0)


def _mlp(seed, width):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))


def _fsdp_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 6, generator=g), torch.randint(0, 10, (8,), generator=g)


def _distiller_terms():
    return {
        "kd": fastkd.distiller.KD(temperature=2.0),
        "ce": fastkd.distiller.CrossEntropy(),
        "hidden": fastkd.distiller.Features("1", "1", adapter=None),  # a hook by module path inside the shards
    }


def _fsdp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    student, teacher = _mlp(0, 8), _mlp(1, 8)
    for layer in (student[0], student[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    teacher.requires_grad_(False)  # forward only: no gradient state
    for layer in (teacher[0], teacher[2]):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
    distiller = fastkd.Distiller(student, teacher, terms=_distiller_terms(), normalize_across_ranks=True)
    x, y = _fsdp_batch()
    out = distiller(x.chunk(world)[rank], y.chunk(world)[rank])
    out.loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in student.named_parameters()}
    teacher_params = {name: p.to_local().numel() for name, p in teacher.named_parameters()}
    torch.save(dict(grads=grads, teacher_params=teacher_params), os.path.join(out_dir, f"fsdp{rank}.pt"))
    dist.destroy_process_group()


def test_an_fsdp2_distiller_step_equals_the_unsharded_step(tmp_path):
    """Student and teacher sharded with fully_shard over 2 gloo ranks, half the batch each: the student's gradients
    (FSDP averages them over the ranks; normalize_across_ranks divides by the global row count over the world
    size) equal the single-process step's on the whole batch, and the teacher stays sharded after its forward."""
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    student, teacher = _mlp(0, 8), _mlp(1, 8)
    x, y = _fsdp_batch()
    fastkd.Distiller(student, teacher, terms=_distiller_terms())(x, y).loss.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"fsdp{rank}.pt")
        for name, p in student.named_parameters():
            assert_rel_close(result["grads"][name], p.grad, 1e-5, what=name)
        full = {name: p.numel() for name, p in teacher.named_parameters()}
        assert all(result["teacher_params"][name] < full[name] for name in full if full[name] > 1)
