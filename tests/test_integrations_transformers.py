"""fastkd.integrations.transformers.DistillationTrainer with tiny GPT-2 models built from configs (no downloads):
gradient accumulation with padding equal to one larger batch, the logged terms and metrics, save_model and
reload, resume from a checkpoint equal to an uninterrupted run (Features adapters included), evaluate()."""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastkd.distiller import KD, CrossEntropy, Features  # noqa: E402
from fastkd.integrations.transformers import ADAPTERS_FILE, DistillationTrainer  # noqa: E402

from conftest import assert_rel_close, tiny_gpt2  # noqa: E402

VOCAB, PAD = 40, 0


def gpt2(width, seed):
    return tiny_gpt2(width, seed, vocab_size=VOCAB)


class Sequences(torch.utils.data.Dataset):
    """Token sequences of varying lengths (so that batches pad differently)."""

    def __init__(self, count=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 12, (count,), generator=g)
        self.items = [torch.randint(1, VOCAB, (int(n),), generator=g) for n in lengths]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i]}


def collate(samples):
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), PAD)
    mask = torch.zeros(len(samples), length, dtype=torch.int64)
    for row, s in enumerate(samples):
        ids[row, : len(s["input_ids"])] = s["input_ids"]
        mask[row, : len(s["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def training_options(tmp_path, **overrides) -> dict:
    """TrainingArguments for one deterministic SGD step on CPU, logging every step, saving nothing."""
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        seed=7,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    options.update(overrides)
    return options


def arguments(tmp_path, **overrides):
    return transformers.TrainingArguments(**training_options(tmp_path, **overrides))


def trainer(tmp_path, terms=None, example_inputs=None, **overrides):
    student, teacher = gpt2(16, 0), gpt2(24, 1)
    return DistillationTrainer(
        model=student,
        teacher=teacher,
        terms=terms,
        example_inputs=example_inputs,
        args=arguments(tmp_path, **overrides),
        train_dataset=Sequences(),
        eval_dataset=Sequences(count=6, seed=1),
        data_collator=collate,
    )


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_gradient_accumulation_with_padding_equals_one_batch_four_times_larger(tmp_path):
    start = weights(gpt2(16, 0))
    one = trainer(tmp_path / "one", per_device_train_batch_size=16, gradient_accumulation_steps=1)
    one.train()
    four = trainer(tmp_path / "four", per_device_train_batch_size=4, gradient_accumulation_steps=4)
    four.train()
    moved = 0.0
    for name, want in weights(one.model).items():
        assert_rel_close(weights(four.model)[name], want, 1e-5, what=name)
        moved += (want - start[name]).norm().item()
    assert moved > 1e-3  # the step did something
    assert_rel_close(
        torch.tensor(four.state.log_history[0]["loss"]), torch.tensor(one.state.log_history[0]["loss"]), 1e-5
    )


def test_the_terms_and_fidelity_metrics_are_logged_in_training_and_evaluation(tmp_path):
    run = trainer(tmp_path, gradient_accumulation_steps=2, max_steps=2)
    run.train()
    first = run.state.log_history[0]
    assert {"loss", "loss_ce", "loss_kd", "top1_agreement"} <= set(first)
    assert first["loss_ce"] + first["loss_kd"] == pytest.approx(first["loss"], rel=1e-4)
    metrics = run.evaluate()
    assert {"eval_loss", "eval_loss_ce", "eval_loss_kd", "eval_top1_agreement"} <= set(metrics)
    assert metrics["eval_loss_ce"] + metrics["eval_loss_kd"] == pytest.approx(metrics["eval_loss"], rel=1e-4)


def test_the_ce_term_is_the_models_own_causal_lm_loss(tmp_path):
    run = trainer(tmp_path, terms={"ce": CrossEntropy()})
    batch = collate([Sequences()[i] for i in range(4)])
    loss = run.compute_loss(run.model, batch)
    assert_rel_close(loss, run.model(**batch).loss, 1e-5)


def test_save_model_writes_the_student_that_reloads_with_from_pretrained(tmp_path):
    run = trainer(tmp_path)
    run.train()
    run.save_model(str(tmp_path / "saved"))
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved"))
    for name, value in weights(run.model).items():
        assert torch.equal(weights(reloaded)[name], value)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # still tied
    assert not os.path.exists(tmp_path / "saved" / ADAPTERS_FILE)


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run_adapters_included(tmp_path):
    example = collate([Sequences()[i] for i in range(2)])
    example.pop("labels")

    def run(directory):  # fresh terms each time: an "auto" adapter belongs to the term that built it
        terms = {"kd": KD(), "ce": CrossEntropy(), "hint": Features("transformer.ln_f", "transformer.ln_f")}
        options = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2)
        return trainer(tmp_path / directory, terms=terms, example_inputs=example, **options)

    whole = run("whole")
    whole.train()
    interrupted = run("part")
    interrupted.train()  # writes checkpoint-2 (and -4)
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert (checkpoint / ADAPTERS_FILE).exists()
    resumed = run("resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in weights(whole.model).items():
        assert_rel_close(weights(resumed.model)[name], value, 1e-6, what=name)
    for a, b in zip(whole.distiller.adapters.parameters(), resumed.distiller.adapters.parameters()):
        assert_rel_close(b, a, 1e-6)
    untrained = run("untrained").distiller.adapters.parameters()
    assert not all(torch.equal(a, b) for a, b in zip(untrained, whole.distiller.adapters.parameters()))  # it trained
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    # the resumed run logs its step 4 as the uninterrupted one does, terms adding up to the loss
    last, resumed_last = whole.state.log_history[1], resumed.state.log_history[-2]
    assert last["step"] == resumed_last["step"] == 4
    for key in ("loss", "loss_kd", "loss_ce", "loss_hint"):
        assert resumed_last[key] == pytest.approx(last[key], rel=1e-4)
    assert last["loss_kd"] + last["loss_ce"] + last["loss_hint"] == pytest.approx(last["loss"], rel=1e-4)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### With the Hugging Face Trainer") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]
    assert "max_steps=1000" in example
    monkeypatch.chdir(tmp_path)
    namespace = {"student": gpt2(16, 0), "teacher": gpt2(24, 1), "train_dataset": Sequences(), "collate": collate}
    exec(example.replace("max_steps=1000", "max_steps=2, report_to=[], use_cpu=True"), namespace)
    assert namespace["trainer"].state.global_step == 2
    transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "distilled" / "student"))


def test_a_linear_kd_term_trains_as_ce_plus_kd_on_logits_without_building_them(tmp_path):
    from fastkd.distiller import LinearKD

    options = dict(gradient_accumulation_steps=2, max_steps=2)
    logits_run = trainer(tmp_path / "logits", terms={"ce": CrossEntropy(), "kd": KD(temperature=2.0)}, **options)
    logits_run.train()
    student, teacher = gpt2(16, 0), gpt2(24, 1)
    head = LinearKD(student.get_output_embeddings(), teacher.get_output_embeddings(), ce_weight=1.0, temperature=2.0)
    linear_run = DistillationTrainer(
        model=student,
        teacher=teacher,
        terms={"kd": head},
        args=arguments(tmp_path / "linear", **options),
        train_dataset=Sequences(),
        data_collator=collate,
    )
    built = []
    handle = student.lm_head.register_forward_hook(lambda m, args, out: built.append(out.shape))
    linear_run.train()
    handle.remove()
    assert not built  # the student's head never ran as a module: no (N, V) logits
    for name, value in weights(logits_run.model).items():
        assert_rel_close(weights(linear_run.model)[name], value, 1e-5, what=name)
    losses = [[entry["loss"] for entry in run.state.log_history if "loss" in entry] for run in (linear_run, logits_run)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
