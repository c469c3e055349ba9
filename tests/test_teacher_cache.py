"""fastkd.TeacherCache: bit-exact round trips across shards for every index width, resume after an interrupted
write, corrupted and truncated shards named in the error, losses from cached teachers equal to the in-memory TopK,
and reading from DataLoader workers."""

import json
import os

import numpy as np
import pytest
import torch

import fastkd
from fastkd import TeacherCache, TopK, topk_teacher

from conftest import assert_rel_close, tiny_gpt2


def batches(vocab_size, k, seed=0, count=5, batch=3, length=6):
    """(sample ids, full logits (B, L, V), attention mask) batches with padded positions."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(count):
        logits = torch.randn(batch, length, vocab_size, generator=g) * 3
        mask = (torch.arange(length) < torch.randint(1, length + 1, (batch, 1), generator=g)).long()
        out.append((list(range(b * batch, (b + 1) * batch)), logits, mask))
    return out


def expected(batches_, k, dtype):
    """sample id → the TopK the cache should return (its kept tokens' top-k log-probs in ``dtype``)."""
    want = {}
    for ids, logits, mask in batches_:
        top = topk_teacher(logits, k)
        for row, sample_id in enumerate(ids):
            keep = mask[row].bool()
            want[sample_id] = TopK(top.values[row][keep].to(dtype), top.indices[row][keep])
    return want


@pytest.mark.parametrize("vocab_size", [1000, 65536, 65537, 262144])
def test_round_trip_is_bit_exact_across_shards(tmp_path, vocab_size):
    k = 8
    data = batches(vocab_size, k, count=3 if vocab_size > 65536 else 5, length=4)
    with TeacherCache.write(tmp_path, k=k, vocab_size=vocab_size, shard_tokens=7) as writer:
        for ids, logits, mask in data:
            writer.add(ids, logits, mask)
    cache = TeacherCache(tmp_path)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["shards"]) > 1
    assert index["indices_dtype"] == ("uint16" if vocab_size <= 65536 else "int32")
    want = expected(data, k, torch.bfloat16)
    assert cache.sample_ids() == list(want)  # the order of writing
    for sample_id, top in want.items():
        got = cache[sample_id]
        assert got.values.dtype == torch.bfloat16 and got.indices.dtype == torch.int64
        assert torch.equal(got.values.view(torch.int16), top.values.view(torch.int16))
        assert torch.equal(got.indices, top.indices)


def test_bytes_per_token_at_k_64(tmp_path):
    with TeacherCache.write(tmp_path, k=64, vocab_size=32000) as writer:
        writer.add([0], torch.randn(1, 100, 32000))
    shard = json.loads((tmp_path / "index.json").read_text())["shards"][0]
    payload = shard["bytes"]["values"] + shard["bytes"]["indices"] + shard["bytes"]["counts"]
    assert 258 * 100 <= payload <= 258 * 100 + 3 * 256  # bf16 values, uint16 indices and counts, three .npy headers


def test_resume_after_an_interrupted_write_keeps_every_sample_once(tmp_path):
    data = batches(1000, 4)
    whole_path, path = tmp_path / "whole", tmp_path / "part"
    with TeacherCache.write(whole_path, k=4, vocab_size=1000, shard_tokens=10) as writer:
        for batch in data:
            writer.add(*batch)
    writer = TeacherCache.write(path, k=4, vocab_size=1000, shard_tokens=10)
    for batch in data[:3]:
        writer.add(*batch)  # some shards flushed, the rest buffered when the process dies (no close)
    listed = json.loads((path / "index.json").read_text())["shards"]
    assert listed and sum(s["samples"] for s in listed) < 9
    (path / f"shard-{len(listed):05d}.values.npy.tmp").write_bytes(b"half a shard")  # an interrupted flush
    with TeacherCache.write(path, k=4, vocab_size=1000, shard_tokens=10, resume=True) as writer:
        for batch in data:  # the loop starts again from the beginning
            writer.add(*batch)
    resumed, whole = TeacherCache(path), TeacherCache(whole_path)
    assert sorted(resumed.sample_ids()) == sorted(whole.sample_ids()) == list(range(15))
    for sample_id in whole.sample_ids():
        assert torch.equal(resumed[sample_id].values, whole[sample_id].values)
        assert torch.equal(resumed[sample_id].indices, whole[sample_id].indices)
    with pytest.raises(FileExistsError, match="resume=True"):
        TeacherCache.write(path, k=4, vocab_size=1000)
    with pytest.raises(ValueError, match="other settings"):
        TeacherCache.write(path, k=8, vocab_size=1000, resume=True)


def written(tmp_path):
    with TeacherCache.write(tmp_path, k=4, vocab_size=300, shard_tokens=8) as writer:
        for batch in batches(300, 4, count=2):
            writer.add(*batch)
    return json.loads((tmp_path / "index.json").read_text())["shards"]


def test_a_corrupted_shard_is_an_error_naming_its_file(tmp_path):
    shards = written(tmp_path)
    file = tmp_path / shards[0]["files"]["values"]
    raw = bytearray(file.read_bytes())
    raw[-3] ^= 0xFF
    file.write_bytes(bytes(raw))
    cache = TeacherCache(tmp_path)
    first = cache.sample_ids()[0]
    with pytest.raises(ValueError, match=f"{file}.*corrupted"):
        cache[first]
    assert TeacherCache(tmp_path, verify=False)[first].values.shape[-1] == 4  # unchecked on request


def test_a_truncated_shard_is_an_error_naming_its_file(tmp_path):
    shards = written(tmp_path)
    file = tmp_path / shards[-1]["files"]["indices"]
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{file} is missing or truncated"):
        TeacherCache(tmp_path)


def test_bad_writes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="k must be an int in"):
        TeacherCache.write(tmp_path / "a", k=0, vocab_size=10)
    with pytest.raises(ValueError, match="dtype must be one of"):
        TeacherCache.write(tmp_path / "b", k=2, vocab_size=10, dtype=torch.float64)
    writer = TeacherCache.write(tmp_path / "c", k=2, vocab_size=10)
    with pytest.raises(ValueError, match="distinct ids"):
        writer.add([1, 1], torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match="vocab_size=10"):
        writer.add([1], torch.randn(1, 3, 11))
    with pytest.raises(ValueError, match="kind='logprobs'"):
        writer.add([1], topk_teacher(torch.randn(1, 3, 10), 2, kind="logits"))
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TeacherCache(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cached_teacher_gives_the_loss_of_the_in_memory_topk(tmp_path, dtype):
    vocab_size, k = 50, 6
    ((ids, logits, mask),) = batches(vocab_size, k, count=1, batch=4, length=5)
    with TeacherCache.write(tmp_path, k=k, vocab_size=vocab_size, dtype=dtype) as writer:
        writer.add(ids, logits, mask)
    labels = torch.randint(0, vocab_size, (4, 5)).masked_fill(mask == 0, -100)
    student = torch.randn(4, 5, vocab_size, requires_grad=True)
    cached = TeacherCache(tmp_path).collate(ids, pad_to=5)
    top = topk_teacher(logits, k)
    in_memory = TopK(top.values.to(dtype), top.indices)
    options = dict(labels=labels, temperature=2.0)
    got = fastkd.kd_loss(student, cached, **options)
    want = fastkd.kd_loss(student, in_memory, **options)  # padded rows differ but are ignored
    assert torch.equal(got, want)
    reference = fastkd.kd_loss(student, in_memory, backend="reference", **options)
    assert_rel_close(got, reference, 1e-5)


def test_collate_pads_and_a_dataloader_with_workers_reads_the_cache(tmp_path):
    data = batches(200, 3, count=2)
    with TeacherCache.write(tmp_path, k=3, vocab_size=200, shard_tokens=5) as writer:
        for batch in data:
            writer.add(*batch)
    cache = TeacherCache(tmp_path)
    want = expected(data, 3, torch.bfloat16)
    loader = torch.utils.data.DataLoader(list(range(6)), batch_size=3, num_workers=2, collate_fn=cache.collate)
    for ids, batch in zip(([0, 1, 2], [3, 4, 5]), loader):
        longest = max(want[i].values.shape[0] for i in ids)
        assert batch.values.shape == (3, longest, 3)
        for row, sample_id in enumerate(ids):
            n = want[sample_id].values.shape[0]
            assert torch.equal(batch.values[row, :n], want[sample_id].values)
            assert torch.equal(batch.indices[row, n:], torch.full((longest - n, 3), -1))  # padding: no entries
    with pytest.raises(ValueError, match="pad_to=1 is shorter"):
        cache.collate([0], pad_to=1)
    with pytest.raises(KeyError, match="sample 99 is not in the teacher cache"):
        cache[99]
    assert os.path.isdir(tmp_path) and np.load(tmp_path / "shard-00000.samples.npy").shape[1] == 3


def test_the_readme_example_caches_a_teacher_and_trains_a_student(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### Distilling from a cached teacher") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(12):
        length = int(torch.randint(3, 10, (), generator=g))
        rows.append({"id": i, "input_ids": torch.randint(1, 90, (length,), generator=g)})

    def collate(samples):
        length = max(len(s["input_ids"]) for s in samples)
        ids = torch.zeros(len(samples), length, dtype=torch.int64)
        mask = torch.zeros(len(samples), length, dtype=torch.int64)
        for row, sample in enumerate(samples):
            ids[row, : len(sample["input_ids"])], mask[row, : len(sample["input_ids"])] = sample["input_ids"], 1
        labels = ids.masked_fill(mask == 0, -100)
        return {
            "id": torch.tensor([s["id"] for s in samples]),
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
        }

    student = tiny_gpt2(16, 0, vocab_size=90)
    before = [p.detach().clone() for p in student.parameters()]
    monkeypatch.chdir(tmp_path)
    namespace = {
        "teacher": tiny_gpt2(24, 1, vocab_size=90).eval(),
        "student": student,
        "dataset": rows,
        "collate": collate,
    }
    exec(example, namespace)
    cache = TeacherCache(tmp_path / "teacher_cache")
    assert len(cache) == 12 and cache[3].values.shape == (len(rows[3]["input_ids"]), 64)
    assert namespace["loss"].isfinite()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


@pytest.mark.parametrize("vocab_size", [1000, 65537])
def test_ragged_top_p_teachers_round_trip_with_their_counts(tmp_path, vocab_size):
    k = 6
    sharpness = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1)  # flat to peaked tokens: 1 to k entries
    data = [(ids, logits * sharpness, mask) for ids, logits, mask in batches(vocab_size, k, count=2, length=4)]
    with TeacherCache.write(tmp_path, k=k, vocab_size=vocab_size, top_p=0.5, shard_tokens=5) as writer:
        for ids, logits, mask in data:
            writer.add(ids, logits, mask)
    cache = TeacherCache(tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["top_p"] == 0.5
    seen_counts = set()
    for ids, logits, mask in data:
        top = topk_teacher(logits, k, top_p=0.5)
        for row, sample_id in enumerate(ids):
            keep = mask[row].bool()
            got, want_indices = cache[sample_id], top.indices[row][keep]
            assert torch.equal(got.indices, want_indices) and torch.equal(got.counts, (want_indices >= 0).sum(-1))
            present = want_indices >= 0
            assert torch.equal(got.values[present], top.values[row][keep][present].bfloat16())
            seen_counts.update(got.counts.tolist())
    assert len(seen_counts) > 1  # ragged indeed


def test_sampled_teachers_round_trip_and_give_the_in_memory_loss(tmp_path):
    vocab_size, k = 40, 8
    ((ids, logits, mask),) = batches(vocab_size, k, count=1, batch=3, length=5)
    with TeacherCache.write(tmp_path, k=k, vocab_size=vocab_size, kind="sampled", temperature=2.0, seed=7) as writer:
        writer.add(ids, logits, mask)
    drawn = fastkd.sampled_teacher(logits, k, temperature=2.0, generator=torch.Generator().manual_seed(7))
    cache = TeacherCache(tmp_path)
    for row, sample_id in enumerate(ids):
        keep = mask[row].bool()
        got = cache[sample_id]
        assert got.kind == "sampled" and got.draw_temperature == 2.0
        assert torch.equal(got.indices, drawn.indices[row][keep])
        present = got.indices >= 0
        assert torch.equal(got.values[present], drawn.values[row][keep][present])  # log(c/k), bit-exact
    labels = torch.randint(0, vocab_size, (3, 5)).masked_fill(mask == 0, -100)
    student = torch.randn(3, 5, vocab_size)
    got = fastkd.kd_loss(student, cache.collate(ids, pad_to=5), labels=labels, temperature=2.0)
    assert torch.equal(got, fastkd.kd_loss(student, drawn, labels=labels, temperature=2.0))
    with TeacherCache.write(tmp_path / "b", k=k, vocab_size=vocab_size, kind="sampled", temperature=2.0) as writer:
        writer.add(ids, drawn, mask)  # a sampled TopK is stored as its counts
    assert torch.equal(TeacherCache(tmp_path / "b")[ids[0]].values, cache[ids[0]].values)
    with pytest.raises(ValueError, match="taken at temperature 2.0, the cache's is 1.0"):
        TeacherCache.write(tmp_path / "c", k=k, vocab_size=vocab_size, kind="sampled").add(ids, drawn, mask)
    with pytest.raises(ValueError, match="top_p must be None or a float"):
        TeacherCache.write(tmp_path / "d", k=k, vocab_size=vocab_size, kind="sampled", top_p=0.9)


class TinyLM(torch.nn.Module):
    """Embedding → linear: (B, L) token ids → (B, L, V) logits."""

    def __init__(self, vocab_size, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = torch.nn.Embedding(vocab_size, width), torch.nn.Linear(width, vocab_size)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


@pytest.mark.parametrize("causal_lm", [False, True])
def test_a_distiller_trains_from_a_cached_teacher(tmp_path, causal_lm):
    """The Distiller's KD term with a TeacherCache for teacher is kd_loss against the collated sparse teacher
    (bit for bit), shifted with causal_lm like the student; no teacher model runs."""
    vocab_size, k = 30, 5
    teacher, student = TinyLM(vocab_size, 8, seed=1), TinyLM(vocab_size, 4, seed=2)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (4, 6), generator=g)
    mask = (torch.arange(6) < torch.tensor([[6], [3], [5], [1]])).long()  # right padding
    ids = [10, 11, 12, 13]
    with TeacherCache.write(tmp_path, k=k, vocab_size=vocab_size, dtype=torch.float32) as writer:
        with torch.no_grad():
            writer.add(ids, teacher(input_ids), mask)
    cache = TeacherCache(tmp_path)
    labels = input_ids.masked_fill(mask == 0, -100)
    terms = {"kd": fastkd.distiller.KD(temperature=2.0, tail="spread"), "ce": fastkd.distiller.CrossEntropy()}
    distiller = fastkd.Distiller(student, cache, terms=terms, causal_lm=causal_lm)
    out = distiller(input_ids, labels, sample_ids=torch.tensor(ids))
    top, rows, targets = cache.collate(ids, pad_to=6), student(input_ids), labels
    if causal_lm:
        rows, top, targets = rows[:, :-1], TopK(top.values[:, :-1], top.indices[:, :-1]), labels[:, 1:]
    count = (targets != -100).sum()
    want = fastkd.kd_loss(rows, top, labels=targets, temperature=2.0, tail="spread", normalizer=count)
    assert torch.equal(out.losses["kd"], want)
    assert set(out.metrics) >= {"top1_agreement", "predictive_kl"}
    out.loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    with pytest.raises(ValueError, match="needs forward\\(..., sample_ids=...\\)"):
        distiller(input_ids, labels)
    with pytest.raises(ValueError, match="term 'feat' \\(Features\\) needs the teacher model"):
        fastkd.Distiller(student, cache, terms={"feat": fastkd.distiller.Features("embed", "embed")})
    plain = fastkd.Distiller(student, teacher)  # sample_ids are there for the terms that read them; none here
    assert torch.equal(plain(input_ids, labels, sample_ids=ids).loss, plain(input_ids, labels).loss)


def test_a_cached_teacher_of_one_token_per_sample_feeds_classification_logits(tmp_path):
    logits = torch.randn(5, 1, 12)
    with TeacherCache.write(tmp_path, k=3, vocab_size=12, dtype=torch.float32) as writer:
        writer.add(range(5), logits)
    cache = TeacherCache(tmp_path)
    student = torch.randn(5, 12)
    top = cache.teacher_for([4, 0, 2, 1, 3], student)
    want = topk_teacher(logits[[4, 0, 2, 1, 3], 0], 3)
    assert torch.equal(top.values, want.values) and torch.equal(top.indices, want.indices)
    with pytest.raises(ValueError, match="one id per sample"):
        cache.teacher_for([0, 1], student)


def test_the_cache_teacher_command_runs_a_named_teacher_over_named_batches(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_setup.py").write_text(
        "import torch\n"
        "class Teacher(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.embed = torch.nn.Embedding(20, 20)\n"
        "    def forward(self, input_ids, attention_mask):\n"
        "        return {'logits': self.embed(input_ids) * 4}\n"
        "def batches():\n"
        "    g = torch.Generator().manual_seed(1)\n"
        "    for b in range(3):\n"
        "        ids = torch.randint(0, 20, (2, 5), generator=g)\n"
        "        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])\n"
        "        yield {'id': torch.tensor([2 * b, 2 * b + 1]), 'input_ids': ids, 'attention_mask': mask,\n"
        "               'labels': ids}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_setup

    from fastkd.cli import main

    args = ["cache-teacher", "--teacher", "my_setup:Teacher", "--data", "my_setup:batches", "--out", "cache"]
    assert main(args + ["--k", "4", "--top-p", "0.9", "--dtype", "fp32"]) == 0
    assert "cached 3 batches" in capsys.readouterr().out
    cache, teacher = TeacherCache(tmp_path / "cache"), my_setup.Teacher()
    for batch in my_setup.batches():
        logits = teacher(batch["input_ids"], batch["attention_mask"])["logits"]
        want = topk_teacher(logits, 4, top_p=0.9)
        for row, sample_id in enumerate(batch["id"].tolist()):
            keep = batch["attention_mask"][row].bool()
            got = cache[sample_id]
            assert torch.equal(got.indices, want.indices[row][keep])
            assert torch.equal(got.values[got.indices >= 0], want.values[row][keep][want.indices[row][keep] >= 0])
    with pytest.raises(SystemExit):
        main(args)  # the cache exists: an error, not an overwrite
    with pytest.raises(SystemExit):
        main(["cache-teacher", "--teacher", "my_setup", "--data", "my_setup:batches", "--out", "other"])
