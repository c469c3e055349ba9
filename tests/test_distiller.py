"""fastkd.Distiller: hooks, the frozen teacher, state_dict, the loss terms and their reduction, schedules,
autocast, torch.compile of the student, and DDP (two CPU processes with gloo)."""

import copy
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd import schedules
from fastkd.distiller import DKD, KD, CrossEntropy, Custom, Distiller, Features, London

from conftest import assert_rel_close

CLASSES = 7


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU())

    def forward(self, x):
        return x + self.mlp(x)


class Net(nn.Module):
    """An MLP with nested modules, dropout, and one block applied twice (weight sharing)."""

    def __init__(self, width, shared_twice=False, dropout=0.0):
        super().__init__()
        self.stem = nn.Linear(10, width)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, CLASSES)
        self.shared_twice = shared_twice

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        if self.shared_twice:
            h = self.blocks[1](h)
        return self.head(self.drop(h))


def make_pair(seed=0, **student_options):
    torch.manual_seed(seed)
    return Net(12, **student_options), Net(20, dropout=0.5)


def batch(rows=9, seed=1, ignored=(0,)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 10, generator=g)
    y = torch.randint(0, CLASSES, (rows,), generator=g)
    y[list(ignored)] = -100
    return x, y


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_default_terms_are_kd_and_metrics_come_with_the_output():
    student, teacher = make_pair()
    x, y = batch()
    out = Distiller(student, teacher)(x, y)
    with torch.no_grad():
        t = teacher(x)
    expected, stats = fastkd.kd_loss(student(x), t, temperature=4.0, labels=y, return_stats=True)
    assert list(out.losses) == ["kd"]
    assert_rel_close(out.loss, expected, 1e-5)
    assert out.metrics.keys() == stats.keys()
    for key in stats:
        assert_rel_close(out.metrics[key], stats[key], 1e-5)
        assert not out.metrics[key].requires_grad


def test_terms_are_weighted_and_share_one_divisor_of_counted_rows():
    student, teacher = make_pair()
    x, y = batch(ignored=(0, 3))
    distiller = Distiller(
        student,
        teacher,
        terms={
            "ce": CrossEntropy(0.1),
            "kd": KD(0.9, temperature=2.0),
            "dkd": DKD(0.5, beta=2.0),
            "smooth": CrossEntropy(0.2, label_smoothing=0.3),
        },
    )
    out = distiller(x, y)
    s, t = student(x), teacher(x).detach()
    counted = y != -100
    assert_rel_close(out.losses["ce"], 0.1 * F.cross_entropy(s[counted], y[counted]), 1e-5)
    assert_rel_close(out.losses["smooth"], 0.2 * F.cross_entropy(s[counted], y[counted], label_smoothing=0.3), 1e-5)
    assert_rel_close(out.losses["kd"], 0.9 * fastkd.kd_loss(s[counted], t[counted], temperature=2.0), 1e-5)
    assert_rel_close(out.losses["dkd"], 0.5 * fastkd.dkd_loss(s[counted], t[counted], y[counted], beta=2.0), 1e-5)
    assert_rel_close(out.loss, sum(out.losses.values()), 1e-6)


def test_a_weight_of_one_is_the_term_itself_and_other_weights_multiply_it():
    student, teacher = make_pair()
    x, y = batch()
    out = Distiller(student, teacher, terms={"ce": CrossEntropy(1.0), "kd": KD(2.5)})(x, y)
    kd_alone = Distiller(student, teacher, terms={"kd": KD()})(x, y).loss
    assert type(out.losses["ce"].grad_fn).__name__ == "DivBackward0"  # no ×1 node after the term's own division
    assert torch.equal(out.losses["kd"], 2.5 * kd_alone)


def test_a_custom_ignore_index_skips_those_rows_in_every_term_and_in_the_divisor():
    student, teacher = make_pair()
    x, y = batch(ignored=())
    y[[1, 4, 5]] = -1
    distiller = Distiller(
        student, teacher, ignore_index=-1, terms={"ce": CrossEntropy(), "kd": KD(temperature=2.0), "dkd": DKD(beta=2.0)}
    )
    assert distiller.counted_rows(y).item() == 6
    out = distiller(x, y)
    s, t = student(x), teacher(x).detach()
    counted = y != -1
    assert_rel_close(out.losses["ce"], F.cross_entropy(s[counted], y[counted]), 1e-5)
    assert_rel_close(out.losses["kd"], fastkd.kd_loss(s[counted], t[counted], temperature=2.0), 1e-5)
    assert_rel_close(out.losses["dkd"], fastkd.dkd_loss(s[counted], t[counted], y[counted], beta=2.0), 1e-5)


def test_metrics_without_a_kd_term_average_over_the_counted_rows():
    student, teacher = make_pair()
    x, y = batch(ignored=(0, 3, 4))
    out = Distiller(student, teacher, terms={"ce": CrossEntropy()})(x, y)
    counted = y != -100
    with torch.no_grad():
        _, expected = fastkd.kd_loss(student(x)[counted], teacher(x)[counted], return_stats=True)
    assert out.metrics.keys() == expected.keys()
    for key in expected:
        assert_rel_close(out.metrics[key], expected[key], 1e-5, what=key)


def test_hooks_capture_nested_module_paths():
    student, teacher = make_pair()
    seen = {}
    student.blocks[1].mlp[0].register_forward_hook(lambda m, a, o: seen.setdefault("s", o))
    teacher.blocks[0].register_forward_hook(lambda m, a, o: seen.setdefault("t", o))
    captured = {}

    def record(batch_):
        captured["s"] = batch_.student_features["blocks.1.mlp.0"][-1]
        captured["t"] = batch_.teacher_features["blocks.0"][-1]
        return batch_.student_logits.sum() * 0

    distiller = Distiller(
        student,
        teacher,
        terms={"hint": Features("blocks.1.mlp.0", "blocks.0", adapter=nn.Linear(12, 20)), "probe": record},
    )
    distiller(batch()[0])
    assert captured["s"] is seen["s"] and captured["t"] is seen["t"]
    assert all(not outputs for store in distiller._capture.outputs.values() for outputs in store.values())


def test_a_module_called_twice_records_both_calls_and_call_picks_one():
    student, teacher = make_pair(shared_twice=True)
    x = batch()[0]
    calls = []
    student.blocks[1].register_forward_hook(lambda m, a, o: calls.append(o))
    picked = {}
    terms = {
        f"call{c}": Features(
            "blocks.1",
            "blocks.1",
            adapter=nn.Identity(),
            call=c,
            loss=lambda s, t, c=c: picked.setdefault(c, s).sum() * 0,
        )
        for c in (0, -1)
    }
    distiller = Distiller(student, Net(12), terms=terms)
    distiller(x)
    assert len(calls) == 2
    assert picked[0] is calls[0] and picked[-1] is calls[1]
    distiller.terms["call0"].call = 2
    with pytest.raises(IndexError, match="ran 2 time"):
        distiller(x)


def test_features_term_matches_mse_of_the_auto_adapter_output():
    student, teacher = make_pair()
    x = batch()[0]
    distiller = Distiller(
        student, teacher, terms={"hint": Features("blocks", "blocks", weight=2.0)}, example_inputs=x[:3]
    )
    adapter = distiller.adapters["hint"]
    assert isinstance(adapter.project, nn.Linear) and adapter.project.in_features == 12
    out = distiller(x)
    h_s = student.blocks(torch.relu(student.stem(x)))
    h_t = teacher.blocks(torch.relu(teacher.stem(x))).detach()
    assert_rel_close(out.losses["hint"], 2.0 * F.mse_loss(adapter(h_s), h_t), 1e-5)
    out.loss.backward()
    assert adapter.project.weight.grad is not None and student.stem.weight.grad.abs().sum() > 0


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradient():
    student, teacher = make_pair()
    teacher.train()
    distiller = Distiller(
        student,
        teacher,
        terms={"ce": CrossEntropy(), "kd": KD(), "hint": Features("blocks", "blocks")},
        example_inputs=batch()[0],
    )
    distiller.train()
    assert distiller.student.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x, y = batch()
    first = distiller(x, y)
    first.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert_rel_close(distiller(x, y).losses["kd"], first.losses["kd"], 1e-6)  # dropout off: the same teacher
    registered = {id(p) for p in distiller.parameters()}
    assert not any(id(p) in registered for p in teacher.parameters())


def test_inputs_that_require_grad_get_their_gradient_through_the_student_only():
    student, teacher = make_pair()
    x, y = batch()
    seen = {}

    def record(b):
        seen["teacher_requires_grad"] = b.teacher_logits.requires_grad
        return b.student_logits.sum() * 0

    leaf = x.clone().requires_grad_()
    Distiller(student, teacher, terms={"kd": KD(), "probe": record})(leaf, y).loss.backward()
    assert seen["teacher_requires_grad"] is False
    alone = x.clone().requires_grad_()
    fastkd.kd_loss(student(alone), teacher(x).detach(), temperature=4.0, labels=y).backward()
    assert_rel_close(leaf.grad, alone.grad, 1e-5)


def test_moving_the_distiller_moves_the_teacher_along():
    student, teacher = make_pair()
    x, y = batch()
    distiller = Distiller(student, teacher).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    out = distiller(x.double(), y)
    expected = fastkd.kd_loss(student(x.double()), teacher(x.double()), temperature=4.0, labels=y)
    assert out.output.dtype == torch.float64
    assert_rel_close(out.loss, expected, 1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_building_adapters_keeps_the_student_mode_and_its_batchnorm_statistics(training):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, CLASSES))
    teacher = Net(20)
    student.train(training)
    before = copy.deepcopy(student[1].state_dict())
    distiller = Distiller(student, teacher, terms={"hint": Features("1", "blocks")}, example_inputs=batch()[0])
    assert isinstance(distiller.adapters["hint"].project, nn.Linear)
    assert student.training is training
    for key, value in student[1].state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_holds_student_adapters_and_schedule_step_but_not_the_teacher():
    student, teacher = make_pair()
    x, y = batch()
    terms = {"kd": KD(schedules.Linear(1.0, 0.0, steps=10)), "hint": Features("blocks", "blocks")}
    distiller = Distiller(student, teacher, terms=terms, example_inputs=x)
    distiller.advance_schedules(3)
    state = distiller.state_dict()
    assert not any(key.startswith("teacher") for key in state)
    assert {key.split(".")[0] for key in state} == {"student", "adapters", "_extra_state"}
    fresh_student, fresh_teacher = make_pair(seed=5)
    fresh_teacher.load_state_dict(teacher.state_dict())
    restored = Distiller(fresh_student, fresh_teacher, terms=terms, example_inputs=x)
    restored.load_state_dict(state)
    assert restored.schedule_step == 3
    assert_rel_close(restored(x, y).loss, distiller(x, y).loss, 1e-6)


def test_distiller_pickles_and_deep_copies_with_its_hooks():
    student, teacher = make_pair()
    x, y = batch()
    distiller = Distiller(student, teacher, terms={"kd": KD(), "hint": Features("blocks", "blocks")}, example_inputs=x)
    expected = distiller(x, y).loss
    buffer = io.BytesIO()
    torch.save(distiller, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(distiller)):
        assert clone.student is not student
        assert_rel_close(clone(x, y).loss, expected, 1e-6)


def test_remove_hooks_leaves_features_terms_with_a_clear_error():
    student, teacher = make_pair()
    distiller = Distiller(student, teacher, terms={"hint": Features("blocks", "blocks", adapter=nn.Linear(12, 20))})
    distiller.remove_hooks()
    assert not student.blocks._forward_hooks and not teacher.blocks._forward_hooks
    with pytest.raises(RuntimeError, match="student's feature 'blocks' was not produced"):
        distiller(batch()[0])


def test_outputs_mode_reads_features_the_models_return():
    class WithFeatures(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            h = self.net.blocks(torch.relu(self.net.stem(x)))
            return self.net.head(h), {"h": h}

    student, teacher = make_pair()
    x, y = batch()
    by_hooks = Distiller(student, teacher, terms={"kd": KD(), "hint": Features("blocks", "blocks")}, example_inputs=x)
    by_outputs = Distiller(
        WithFeatures(student),
        WithFeatures(teacher),
        capture="outputs",
        terms={"kd": KD(), "hint": Features("h", "h", adapter=by_hooks.adapters["hint"])},
    )
    a, b = by_hooks(x, y), by_outputs(x, y)
    for name in ("kd", "hint"):
        assert_rel_close(b.losses[name], a.losses[name], 1e-6)
    with pytest.raises(ValueError, match="must return \\(logits, features\\)"):
        Distiller(student, teacher, capture="outputs")(x, y)


def test_schedules_weight_the_terms_at_the_distiller_step():
    student, teacher = make_pair()
    x, y = batch()
    distiller = Distiller(
        student,
        teacher,
        terms={
            "kd": KD(schedules.Linear(1.0, 0.0, steps=4), temperature=schedules.Step(4.0, [2], gamma=0.5)),
            "dkd": DKD(schedules.Warmup(2)),
        },
    )
    s, t = student(x), teacher(x).detach()
    for step in range(4):
        out = distiller(x, y)
        kd = fastkd.kd_loss(s, t, labels=y, temperature=4.0 if step < 2 else 2.0)
        assert_rel_close(out.losses["kd"], (1 - step / 4) * kd, 1e-5)
        assert_rel_close(out.losses["dkd"], min(step / 2, 1) * fastkd.dkd_loss(s, t, y), 1e-5)
        assert distiller.advance_schedules() == step + 1


@pytest.mark.parametrize("as_number", [False, True])
def test_gradient_accumulation_with_the_step_normalizer_equals_the_whole_batch(as_number):
    student, teacher = make_pair()
    x, y = batch(rows=12, ignored=(0, 1, 2, 7))
    terms = {"ce": CrossEntropy(0.3), "kd": KD(0.7, temperature=2.0)}
    distiller = Distiller(student, teacher, terms=terms)
    distiller(x, y).loss.backward()
    whole = grads(student)
    student.zero_grad()
    parts = [(x[:5], y[:5]), (x[5:], y[5:])]
    step_rows = sum(distiller.counted_rows(part_y) for _, part_y in parts)
    assert step_rows == 8
    if as_number:
        step_rows = int(step_rows)
    for part_x, part_y in parts:
        distiller(part_x, part_y, normalizer=step_rows).loss.backward()
    for got, want in zip(grads(student), whole):
        assert_rel_close(got, want, 1e-5)


def test_token_logits_are_averaged_over_every_token_without_labels_and_over_counted_tokens_with_them():
    torch.manual_seed(0)
    student, teacher = nn.Linear(10, CLASSES), nn.Linear(10, CLASSES)
    x = torch.randn(3, 4, 10)  # (N, L, features) → (N, L, V) logits: 12 rows, not 3
    y = torch.randint(0, CLASSES, (3, 4))
    y[0, 1:] = -100
    s, t = student(x).reshape(12, CLASSES), teacher(x).detach().reshape(12, CLASSES)
    without_labels = Distiller(student, teacher, terms={"kd": KD(temperature=2.0)})(x)
    assert_rel_close(without_labels.loss, fastkd.kd_loss(s, t, temperature=2.0), 1e-5)
    out = Distiller(student, teacher, terms={"ce": CrossEntropy(), "kd": KD(temperature=2.0)})(x, y)
    counted = y.reshape(12) != -100
    assert_rel_close(out.losses["ce"], F.cross_entropy(s[counted], y.reshape(12)[counted]), 1e-5)
    assert_rel_close(out.losses["kd"], fastkd.kd_loss(s[counted], t[counted], temperature=2.0), 1e-5)


def test_a_batch_with_every_row_ignored_gives_zero_loss_and_zero_gradient():
    student, teacher = make_pair()
    x, y = batch(rows=4, ignored=range(4))
    out = Distiller(student, teacher, terms={"ce": CrossEntropy(), "kd": KD(), "dkd": DKD()})(x, y)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in student.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_with_grad_scaler_stays_close_to_float32(dtype):
    student, teacher = make_pair()
    x, y = batch()
    distiller = Distiller(
        student,
        teacher,
        terms={"ce": CrossEntropy(0.5), "kd": KD(0.5), "hint": Features("blocks", "blocks")},
        example_inputs=x,
    )
    full = distiller(x, y)
    with torch.autocast("cpu", dtype=dtype):
        mixed = distiller(x, y)
    assert mixed.output.dtype == dtype
    for name in full.losses:
        assert torch.isfinite(mixed.losses[name])
        assert_rel_close(mixed.losses[name], full.losses[name], 5e-2)
    scaler = torch.amp.GradScaler("cpu")
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    scaler.scale(mixed.loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_compiled_student_gives_the_eager_loss_and_gradients():
    student, teacher = make_pair()
    x, y = batch()
    adapter = nn.Linear(12, 20)
    terms = {"ce": CrossEntropy(0.1), "kd": KD(0.9), "hint": Features("blocks", "blocks", adapter=adapter)}
    eager = Distiller(student, teacher, terms=terms)(x, y)
    eager.loss.backward()
    want = grads(student)
    student.zero_grad()
    compiled = Distiller(torch.compile(student), teacher, terms=terms)(x, y)
    compiled.loss.backward()
    assert_rel_close(compiled.loss, eager.loss, 1e-5)
    for got, expected in zip(grads(student), want):
        assert_rel_close(got, expected, 1e-5)


def test_custom_terms_and_plain_callables_are_weighted_terms():
    student, teacher = make_pair()
    x, y = batch()
    l2 = Custom(lambda b: b.student_logits.pow(2).mean(), weight=schedules.Constant(0.25))
    out = Distiller(student, teacher, terms={"l2": l2, "zero": lambda b: b.student_logits.sum() * 0})(x, y)
    assert_rel_close(out.losses["l2"], 0.25 * student(x).pow(2).mean(), 1e-6)
    assert out.losses["zero"].item() == 0.0


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda s, t: Distiller(s, teacher=None), TypeError, "teacher must be an nn.Module"),
        (lambda s, t: Distiller(s, t, terms={}), ValueError, "at least one"),
        (lambda s, t: Distiller(s, t, terms={"a.b": KD()}), ValueError, "without '.'"),
        (lambda s, t: Distiller(s, t, terms={"x": 3}), TypeError, "term 'x'"),
        (lambda s, t: Distiller(s, t, capture="grads"), ValueError, "capture"),
        (
            lambda s, t: Distiller(s, t, terms={"h": Features("blocks.9", "blocks")}),
            ValueError,
            "student has no module 'blocks.9'",
        ),
        (lambda s, t: Distiller(s, t, terms={"h": Features("blocks", "blocks")}), ValueError, "needs example_inputs"),
        (lambda s, t: Features("a", "b", adapter="conv"), ValueError, "adapter"),
        (lambda s, t: KD(temperature=0.0), ValueError, "temperature"),
        (lambda s, t: KD(weight="high"), TypeError, "weight"),
        (lambda s, t: Distiller(s, t, ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (lambda s, t: Distiller(s, t, ignore_index=True), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_configuration_names_the_problem(make, error, message):
    student, teacher = make_pair()
    with pytest.raises(error, match=message):
        make(student, teacher)


def test_label_terms_without_labels_and_shape_mismatches_are_errors():
    student, teacher = make_pair()
    x, y = batch()
    with pytest.raises(ValueError, match="CrossEntropy needs labels"):
        Distiller(student, teacher, terms={"ce": CrossEntropy()})(x)
    with pytest.raises(ValueError, match="DKD needs labels"):
        Distiller(student, teacher, terms={"dkd": DKD()})(x)
    with pytest.raises(ValueError, match="labels must have the shape"):
        Distiller(student, teacher, terms={"ce": CrossEntropy()})(x, y[:3])
    distiller = Distiller(student, teacher, terms={"h": Features("blocks", "blocks", adapter=None)})
    with pytest.raises(ValueError, match="after the adapter"):
        distiller(x)


# the ignored rows of each DDP scenario; rank 0 takes rows 0..5 of the 10, rank 1 rows 6..9
DDP_SCENARIOS = {
    "unequal_counts": (2, 7),  # rank 0 counts 5 rows, rank 1 counts 3: each rank's own count is wrong
    "rank1_fully_ignored": (2, 6, 7, 8, 9),  # rank 1 counts no row, and contributes 0
}
DDP_TERMS = {"ce": CrossEntropy(0.3), "kd": KD(0.7, temperature=2.0)}


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, ignored in DDP_SCENARIOS.items():
            student, teacher = make_pair()
            model = nn.parallel.DistributedDataParallel(
                Distiller(student, teacher, terms=DDP_TERMS, normalize_across_ranks=True)
            )
            x, y = batch(rows=10, ignored=ignored)
            mine = slice(0, 6) if rank == 0 else slice(6, 10)
            out = model(x[mine], y[mine])
            out.loss.backward()
            torch.save(
                {"loss": out.loss.detach(), "grads": grads(student)}, os.path.join(out_dir, f"{name}-rank{rank}.pt")
            )
        student, teacher = make_pair()  # a student wrapped in DDP: hooks find the paths of the module inside
        hint = Distiller(
            nn.parallel.DistributedDataParallel(student),
            teacher,
            terms={"hint": Features("blocks", "blocks", adapter=hint_adapter())},
        )
        torch.save(hint(batch(rows=10)[0][rank::2]).loss.detach(), os.path.join(out_dir, f"hint-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def hint_adapter():
    torch.manual_seed(3)
    return nn.Linear(12, 20)


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    """Each DDP scenario's per-rank loss and student gradients, and the hint loss of a DDP-wrapped student, from
    one spawn of two gloo processes."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    ranks = {name: [torch.load(out / f"{name}-rank{r}.pt") for r in range(2)] for name in DDP_SCENARIOS}
    ranks["hint"] = [torch.load(out / f"hint-rank{r}.pt") for r in range(2)]
    return ranks


def check_ddp_matches_the_concatenated_batch(ranks, ignored):
    student, teacher = make_pair()
    x, y = batch(rows=10, ignored=ignored)
    whole = Distiller(student, teacher, terms=DDP_TERMS)(x, y)
    whole.loss.backward()
    # each rank divides by (Σ counted rows over the ranks) / world size: the ranks' mean loss is the batch's loss
    assert_rel_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole.loss, 1e-5, what="mean of the rank losses")
    for rank in ranks:
        for got, want in zip(rank["grads"], grads(student)):
            assert_rel_close(got, want, 1e-5)


def test_ddp_with_unequal_counted_rows_per_rank_matches_one_process_on_the_concatenated_batch(ddp_ranks):
    ranks = ddp_ranks["unequal_counts"]
    y = batch(rows=10, ignored=DDP_SCENARIOS["unequal_counts"])[1]
    assert (y[:6] != -100).sum() == 5 and (y[6:] != -100).sum() == 3
    check_ddp_matches_the_concatenated_batch(ranks, DDP_SCENARIOS["unequal_counts"])


def test_ddp_with_a_fully_ignored_rank_matches_one_process_on_the_concatenated_batch(ddp_ranks):
    ranks = ddp_ranks["rank1_fully_ignored"]
    assert ranks[1]["loss"].item() == 0.0
    check_ddp_matches_the_concatenated_batch(ranks, DDP_SCENARIOS["rank1_fully_ignored"])


def test_features_of_a_ddp_wrapped_student_are_captured_by_their_module_paths(ddp_ranks):
    student, teacher = make_pair()
    adapter = hint_adapter()
    x = batch(rows=10)[0]
    for rank, loss in enumerate(ddp_ranks["hint"]):
        mine = x[rank::2]
        h_s = student.blocks(torch.relu(student.stem(mine)))
        h_t = teacher.blocks(torch.relu(teacher.stem(mine)))
        assert_rel_close(loss, F.mse_loss(adapter(h_s), h_t), 1e-5)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Train with a Distiller") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]

    class Model(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.layer3 = nn.Linear(10, width)
            self.head = nn.Linear(width, CLASSES)

        def forward(self, x):
            return self.head(torch.relu(self.layer3(x)))

    x, y = batch()
    student, teacher = Model(8), Model(16)
    before = student.layer3.weight.clone()
    scope = {"torch": torch, "student": student, "teacher": teacher, "x": x, "loader": [(x, y)], "epochs": 2}
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["distiller"].schedule_step == 2 and (tmp_path / "student.pt").exists()
    assert not torch.equal(student.layer3.weight, before)


def test_a_teacher_returning_k_logits_is_an_ensemble():
    class Ensemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.members = nn.ModuleList(make_pair(seed=s)[1] for s in range(3))

        def forward(self, x):
            return torch.stack([m(x) for m in self.members])

    student, _ = make_pair()
    teacher = Ensemble()
    x, y = batch()
    weights = [0.5, 0.3, 0.2]
    out = Distiller(student, teacher, terms={"kd": KD(teacher_weights=weights, ensemble="logit")})(x, y)
    expected, stats = fastkd.kd_loss(
        student(x),
        teacher(x).detach(),
        temperature=4.0,
        labels=y,
        teacher_weights=weights,
        ensemble="logit",
        return_stats=True,
    )
    assert_rel_close(out.loss, expected, 1e-5)
    assert out.metrics.keys() == stats.keys()  # against the ensemble's distribution at T = 1
    for key in stats:
        assert_rel_close(out.metrics[key], stats[key], 1e-5, what=key)


def test_london_term_reads_the_stage_features_and_matches_london_loss():
    def convnet(width):
        torch.manual_seed(width)
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(2 * width, 4, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    student, teacher = convnet(4), convnet(6)
    x = torch.randn(3, 3, 8, 8)
    term = London(["1", "3", "4"], ["1", "3", "4"], weight=0.5, n_iter=4, init="ones")
    out = Distiller(student, teacher, terms={"london": term})(x)
    s_feats = [student[:2](x), student[:4](x), student[:5](x)]
    t_feats = [f.detach() for f in (teacher[:2](x), teacher[:4](x), teacher[:5](x))]
    assert_rel_close(out.losses["london"], 0.5 * fastkd.london_loss(s_feats, t_feats, n_iter=4, init="ones"), 1e-5)
    out.loss.backward()
    assert student[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same number"):
        London(["1", "3"], ["1"])


def test_hooks_record_nothing_outside_the_distiller_forward():
    student, teacher = make_pair()
    x = batch()[0]
    distiller = Distiller(student, teacher, terms={"hint": Features("blocks", "blocks")}, example_inputs=x)
    for _ in range(3):
        student(x)
    assert all(not outputs for store in distiller._capture.outputs.values() for outputs in store.values())
    buffer = io.BytesIO()
    torch.save(distiller.student, buffer)  # the saved student carries an inactive hook and no tensors
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    restored(x)
    hook = next(iter(restored.blocks._forward_hooks.values()))
    assert not hook.capture.active and not hook.capture.outputs["student"]["blocks"]


def test_a_feature_changed_in_place_after_its_module_is_an_error():
    class PreActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(10, 8)
            self.bn = nn.BatchNorm1d(8)
            self.relu = nn.ReLU(inplace=True)
            self.head = nn.Linear(8, CLASSES)

        def forward(self, x):
            return self.head(self.relu(self.bn(self.linear(x))))

    torch.manual_seed(0)
    student, teacher = PreActivation(), PreActivation()
    distiller = Distiller(student, teacher, terms={"hint": Features("bn", "bn", adapter=None)})
    with pytest.raises(RuntimeError, match="'bn' was changed in place"):
        distiller(batch()[0])
    fine = Distiller(student, teacher, terms={"hint": Features("linear", "linear", adapter=None)})
    assert torch.isfinite(fine(batch()[0]).loss)


def test_a_step_without_counted_rows_gives_zero_losses_not_nan():
    student, teacher = make_pair()
    x, y = batch(rows=3, ignored=range(3))
    distiller = Distiller(student, teacher, terms={"ce": CrossEntropy(), "kd": KD(), "dkd": DKD()})
    for normalizer in (distiller.counted_rows(y), 0):
        out = distiller(x, y, normalizer=normalizer)
        assert all(value.item() == 0.0 for value in out.losses.values())


@pytest.mark.parametrize(
    "normalizer, error, message",
    [
        (torch.tensor(-3.0), ValueError, "normalizer must be finite and ≥ 0"),
        (torch.tensor(float("nan")), ValueError, "normalizer must be finite and ≥ 0"),
        (torch.ones(2), ValueError, "normalizer must be a number or a 0-d"),
        (-3, ValueError, "normalizer must be a finite positive"),
        ("8", TypeError, "normalizer must be a real number"),
    ],
)
def test_a_bad_normalizer_is_refused_as_kd_loss_refuses_it(normalizer, error, message):
    student, teacher = make_pair()
    x, y = batch()
    with pytest.raises(error, match=message):
        Distiller(student, teacher)(x, y, normalizer=normalizer)
