"""fastkd.integrations.trl.generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss (every β regime,
temperatures, labels, reductions, num_items_in_batch; loss and gradients), and GKDTrainer run a few steps with it
against TRL's own loss on tiny GPT-2 models built from configs."""

import os

import pytest
import torch

gkd = pytest.importorskip("trl.experimental.gkd")
transformers = pytest.importorskip("transformers")

from fastkd.integrations.trl import generalized_jsd_loss  # noqa: E402

from conftest import assert_rel_close  # noqa: E402

TRL_LOSS = gkd.GKDTrainer.generalized_jsd_loss


def logits(seed, shape=(3, 5, 17), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def labels_with_padding():
    labels = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(9))
    labels[0, 3:] = -100
    labels[2, 0] = -100
    return labels


def loss_and_grad(fn, s, t, **options):
    s = s.clone().requires_grad_()
    loss = fn(s, t, **options)
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_equals_trls_own_loss_and_gradient(beta, temperature, with_labels, reduction):
    s, t = logits(0), logits(1)
    options = dict(
        labels=labels_with_padding() if with_labels else None, beta=beta, temperature=temperature, reduction=reduction
    )
    got = loss_and_grad(generalized_jsd_loss, s, t, **options)
    want = loss_and_grad(TRL_LOSS, s, t, **options)
    for name, a, b in zip(("loss", "grad"), got, want):
        assert_rel_close(a, b, 1e-5, what=name)


@pytest.mark.parametrize("num_items", [7, torch.tensor(7.0)])
def test_num_items_in_batch_divides_the_sum_as_trl_does(num_items):
    s, t, labels = logits(2), logits(3), labels_with_padding()
    got = loss_and_grad(generalized_jsd_loss, s, t, labels=labels, beta=0.3, num_items_in_batch=num_items)
    want = loss_and_grad(TRL_LOSS, s, t, labels=labels, beta=0.3, num_items_in_batch=num_items)
    for a, b in zip(got, want):
        assert_rel_close(a, b, 1e-5)


def test_bf16_logits_stay_within_1e2_of_trls_float32_loss():
    s, t, labels = logits(4), logits(5), labels_with_padding()
    got = generalized_jsd_loss(s.bfloat16(), t.bfloat16(), labels=labels, beta=0.5)
    want = TRL_LOSS(s.bfloat16().float(), t.bfloat16().float(), labels=labels, beta=0.5)
    assert_rel_close(got, want, 1e-2)


@pytest.mark.parametrize(
    "options, message",
    [(dict(reduction="none"), "TRL's per-element 'none'"), (dict(beta=1.5), r"beta must be a number in \[0, 1\]")],
)
def test_what_has_no_counterpart_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        generalized_jsd_loss(logits(0), logits(1), **options)


# GKDTrainer itself, a few steps without generation (lmbda=0), with TRL's loss and with fastkd's


def tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t2", unk_token="t1")


def gkd_run(tmp_path, beta=0.4):
    from datasets import Dataset
    from test_integrations_transformers import VOCAB, Sequences, collate, gpt2, training_options

    args = gkd.GKDConfig(**training_options(tmp_path, max_steps=3), lmbda=0.0, seq_kd=False, beta=beta)
    teacher = gpt2(24, 1)
    with torch.no_grad():  # a sharper teacher than a random student: a loss far from 0
        teacher.transformer.wte.weight.mul_(30)
    trainer = gkd.GKDTrainer(
        model=gpt2(16, 0),
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list([{"input_ids": item["input_ids"].tolist()} for item in Sequences()]),
        data_collator=lambda batch: collate([{"input_ids": torch.tensor(item["input_ids"])} for item in batch]),
        processing_class=tokenizer(VOCAB),
    )
    trainer.train()
    return trainer


def test_gkd_trainer_on_fastkd_takes_the_steps_of_trls_own_loss(tmp_path, monkeypatch):
    # the staticmethod itself, restored after the test
    monkeypatch.setattr(gkd.GKDTrainer, "generalized_jsd_loss", gkd.GKDTrainer.__dict__["generalized_jsd_loss"])
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### With TRL's GKDTrainer") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]
    want = gkd_run(tmp_path / "trl")
    exec(example, {})  # the README's one line: GKDTrainer on fastkd's kernels
    assert gkd.GKDTrainer.generalized_jsd_loss is not TRL_LOSS
    got = gkd_run(tmp_path / "fastkd")
    losses = [[entry["loss"] for entry in run.state.log_history if "loss" in entry] for run in (got, want)]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5) and min(losses[1]) > 0.1
    for (name, a), b in zip(got.model.named_parameters(), want.model.parameters()):
        assert_rel_close(a, b, 1e-5, what=name)
