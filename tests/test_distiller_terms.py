"""fastkd.terms through a Distiller: Features masks from the batch (token attention masks, spatial masks, their
alignment with the features and the errors), and custom terms reading captured features and adapters."""

import pytest
import torch
from torch import nn

import fastkd
from fastkd.distiller import KD, CrossEntropy, Custom, Distiller, Features

from conftest import assert_rel_close

VOCAB = 13


class Encoder(nn.Module):
    """Token ids (and an attention mask, unused) → (B, L, V) logits; ``body`` outputs (B, L, width) features."""

    def __init__(self, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.body = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.body(self.embed(input_ids))))


class ConvNet(nn.Module):
    def __init__(self, width, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def token_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 7), generator=g)
    attention_mask = torch.ones(3, 7, dtype=torch.int64)
    attention_mask[0, 5:] = 0
    attention_mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": attention_mask}


def features(model, inputs):
    captured = {}
    handle = model.body.register_forward_hook(lambda m, a, out: captured.setdefault("body", out))
    model(**inputs)
    handle.remove()
    return captured["body"]


def test_token_features_masked_by_the_attention_mask_count_only_real_tokens():
    student, teacher = Encoder(6, 0), Encoder(6, 1)
    inputs = token_batch()
    distiller = Distiller(
        student, teacher, terms={"hint": Features("body", "body", adapter=None, mask="attention_mask")}
    )
    out = distiller(inputs)
    s, t = features(student, inputs), features(teacher, inputs).detach()
    present = inputs["attention_mask"].bool()
    assert_rel_close(out.losses["hint"], ((s - t)[present] ** 2).mean(), 1e-5)
    # padded tokens change nothing: other tokens there give the same loss and gradient
    grad = torch.autograd.grad(out.loss, student.body.weight)[0]
    scrambled = dict(inputs, input_ids=torch.where(present, inputs["input_ids"], (inputs["input_ids"] + 5) % VOCAB))
    again = distiller(scrambled)
    assert not torch.equal(features(teacher, scrambled), features(teacher, inputs))
    assert torch.equal(again.losses["hint"], out.losses["hint"])
    assert torch.equal(torch.autograd.grad(again.loss, student.body.weight)[0], grad)


def test_a_spatial_mask_from_a_callable_aligns_with_the_channel_dim_of_maps():
    student, teacher = ConvNet(4, 0), ConvNet(4, 1)
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    region = torch.zeros(2, 5, 5, dtype=torch.bool)
    region[:, 1:4, :3] = True
    term = Features("conv", "conv", adapter=None, mask=lambda batch: region)
    out = Distiller(student, teacher, terms={"hint": term})(x)
    s, t = student.conv(x), teacher.conv(x).detach()
    want = fastkd.feature_loss(s, t, mask=region.unsqueeze(1))
    assert_rel_close(out.losses["hint"], want, 1e-6)
    assert_rel_close(want, ((s - t) ** 2).permute(0, 2, 3, 1)[region].mean(), 1e-5)


def test_a_custom_loss_gets_the_mask_as_a_keyword():
    seen = {}

    def loss(student, teacher, mask):
        seen["mask"] = mask
        return (student - teacher).abs().sum() * 0 + mask.float().sum()

    student, teacher = Encoder(4, 0), Encoder(4, 1)
    inputs = token_batch()
    out = Distiller(
        student, teacher, terms={"hint": Features("body", "body", adapter=None, loss=loss, mask="attention_mask")}
    )(inputs)
    assert seen["mask"].shape == (3, 7, 1) and seen["mask"].dtype == torch.bool
    assert out.losses["hint"].item() == inputs["attention_mask"].sum().item()


@pytest.mark.parametrize(
    "mask, inputs_kind, error, message",
    [
        ("padding_mask", "dict", ValueError, r"reads the inputs mapping, which has \['input_ids', 'attention_mask'\]"),
        ("attention_mask", "tuple", ValueError, "which has tuple"),
        (lambda batch: [1, 0], "dict", TypeError, "must be a tensor, got list"),
        (lambda batch: torch.ones(3, 6), "dict", ValueError, r"does not match features \(3, 7, 4\)"),
        (lambda batch: torch.ones(3, 7, 4, 2), "dict", ValueError, "does not broadcast"),
    ],
)
def test_a_mask_that_does_not_fit_is_an_error_naming_it(mask, inputs_kind, error, message):
    student, teacher = Encoder(4, 0), Encoder(4, 1)
    inputs = token_batch()
    if inputs_kind == "tuple":
        inputs = (inputs["input_ids"], inputs["attention_mask"])
    distiller = Distiller(student, teacher, terms={"hint": Features("body", "body", adapter=None, mask=mask)})
    with pytest.raises(error, match=message):
        distiller(inputs)


def test_a_mask_fitting_channels_first_and_last_asks_for_its_channel_dim():
    student, teacher = ConvNet(5, 0), ConvNet(5, 1)  # conv maps (2, 5, 5, 5): a (2, 5, 5) mask fits both ways
    x = torch.randn(2, 2, 5, 5)
    term = Features("conv", "conv", adapter=None, mask=lambda batch: torch.ones(2, 5, 5))
    with pytest.raises(ValueError, match="channels first or last; give it a size-1 channel dim"):
        Distiller(student, teacher, terms={"hint": term})(x)
    with pytest.raises(TypeError, match="mask must be None, a key of the inputs or a callable"):
        Features("conv", "conv", mask=3)


def test_a_custom_term_reads_declared_features_and_the_adapters():
    student, teacher = Encoder(4, 0), Encoder(6, 1)
    inputs = token_batch()

    def hint_by_hand(batch):
        return fastkd.feature_loss(batch.adapters["hint"](batch.student_feature("body")), batch.teacher_feature("body"))

    def embed_gap(batch):  # features no other term captures
        return (batch.student_feature("embed").mean() - batch.teacher_feature("embed").mean()) ** 2

    distiller = Distiller(
        student,
        teacher,
        terms={
            "hint": Features("body", "body"),
            "by_hand": Custom(hint_by_hand, student_features=["body"], teacher_features=["body"]),
            "embed": Custom(embed_gap, student_features=["embed"], teacher_features=["embed"]),
        },
        example_inputs=inputs,
    )
    out = distiller(inputs)
    assert torch.equal(out.losses["by_hand"], out.losses["hint"])
    gap = (student.embed(inputs["input_ids"]).mean() - teacher.embed(inputs["input_ids"]).mean()) ** 2
    assert_rel_close(out.losses["embed"], gap, 1e-6)
    with pytest.raises(TypeError, match="student_features must be a list"):
        Custom(embed_gap, student_features="embed")


# gradient accumulation: Distiller.step_normalizer makes the micro-batch losses add up to the step's, every term


def accumulation_distiller(student, teacher, **options):
    terms = {
        "ce": CrossEntropy(0.5),
        "kd": KD(0.7, temperature=2.0),
        "hint": Features("body", "body", adapter=None),  # samples of equal size: weighted by their share
        "masked": Features("embed", "embed", adapter=None, mask="attention_mask"),  # weighted by the mask's share
    }
    return Distiller(student, teacher, terms=terms, **options)


def padded_batch(seed, batch=6, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    attention_mask = (torch.arange(length) < torch.randint(2, length + 1, (batch, 1), generator=g)).long()
    labels = ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": ids, "attention_mask": attention_mask}, labels


def split(inputs, labels, bounds):
    return [({k: v[a:b] for k, v in inputs.items()}, labels[a:b]) for a, b in zip(bounds, bounds[1:])]


def step_grads(distiller, student, micro_batches, normalizer):
    student.zero_grad()
    losses = {}
    for inputs, labels in micro_batches:
        out = distiller(inputs, labels, normalizer=normalizer)
        out.loss.backward()
        for name, value in out.losses.items():
            losses[name] = losses.get(name, 0) + value.detach()
    return losses, [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("causal_lm", [False, True])
def test_micro_batches_with_the_step_normalizer_add_up_to_the_whole_batch_for_every_term(causal_lm):
    student, teacher = Encoder(5, 0), Encoder(5, 1)
    distiller = accumulation_distiller(student, teacher, causal_lm=causal_lm)
    inputs, labels = padded_batch(0)
    whole_losses, whole_grads = step_grads(distiller, student, [(inputs, labels)], None)
    micro = split(inputs, labels, [0, 1, 4, 6])  # unequal sizes and padding
    step = distiller.step_normalizer(micro)
    assert distiller.mask_keys() == ["attention_mask"]  # what step_normalizer sums besides rows and samples
    shifted = labels[:, 1:] if causal_lm else labels
    assert int(step.rows) == int((shifted != -100).sum()) and int(step.samples) == 6
    assert int(step.masks["attention_mask"]) == int(inputs["attention_mask"].sum())
    losses, grads = step_grads(distiller, student, micro, step)
    for name in whole_losses:
        assert_rel_close(losses[name], whole_losses[name], 1e-5, what=name)
    for got, want in zip(grads, whole_grads):
        assert_rel_close(got, want, 1e-5)
    # per-call means, without the step normalizer, do not add up for the features (the reason for it)
    plain, _ = step_grads(distiller, student, micro, None)
    assert abs(plain["hint"] - whole_losses["hint"]) > 1e-3 * whole_losses["hint"]


def test_step_normalizer_refuses_what_it_cannot_count():
    student, teacher = Encoder(4, 0), Encoder(4, 1)
    inputs, labels = padded_batch(1)
    callable_mask = Distiller(
        student,
        teacher,
        terms={"hint": Features("body", "body", adapter=None, mask=lambda b: b.inputs["attention_mask"])},
    )
    with pytest.raises(ValueError, match="callable mask"):
        callable_mask.step_normalizer([(inputs, labels)])
    distiller = accumulation_distiller(student, teacher)
    with pytest.raises(ValueError, match="'attention_mask' of the inputs, which this micro-batch lacks"):
        distiller.step_normalizer([({"input_ids": inputs["input_ids"]}, labels)])
    with pytest.raises(ValueError, match="micro_batches is empty"):
        distiller.step_normalizer([])
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pairs"):
        distiller.step_normalizer([inputs])


def test_without_labels_the_step_counts_samples_as_rows():
    student, teacher = ConvNet(3, 0), ConvNet(3, 1)
    distiller = Distiller(student, teacher, terms={"kd": KD(), "hint": Features("conv", "conv", adapter=None)})
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    whole_losses, whole_grads = step_grads(distiller, student, [(x, None)], None)
    micro = [(x[:2], None), (x[2:], None)]
    step = distiller.step_normalizer(micro)
    assert int(step.rows) == int(step.samples) == 5
    losses, grads = step_grads(distiller, student, micro, step)
    for name in whole_losses:
        assert_rel_close(losses[name], whole_losses[name], 1e-5, what=name)
    for got, want in zip(grads, whole_grads):
        assert_rel_close(got, want, 1e-5)


def _ddp_accumulation_worker(rank, world, init_file, out_dir):
    import os
    import warnings

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = Encoder(5, 0), Encoder(5, 1)
        model = nn.parallel.DistributedDataParallel(
            accumulation_distiller(student, teacher, causal_lm=True, normalize_across_ranks=True)
        )
        inputs, labels = padded_batch(3, batch=8)
        mine = split(inputs, labels, [0, 1, 3] if rank == 0 else [3, 6, 8])  # unequal micro-batches per rank
        losses, grads = step_grads(model, student, mine, model.module.step_normalizer(mine))
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.save(losses, os.path.join(out_dir, f"losses{rank}.pt"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Distiller(
                nn.parallel.DistributedDataParallel(Encoder(4, 0)),
                Encoder(6, 1),
                terms={"hint": Features("body", "body", adapter=nn.Linear(4, 6))},
            )
        torch.save([str(w.message) for w in caught], os.path.join(out_dir, f"warnings{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_with_gradient_accumulation_equals_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_accumulation_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    student, teacher = Encoder(5, 0), Encoder(5, 1)
    distiller = accumulation_distiller(student, teacher, causal_lm=True)
    whole_losses, whole = step_grads(distiller, student, [padded_batch(3, batch=8)], None)
    ranks = [torch.load(tmp_path / f"losses{rank}.pt") for rank in range(2)]
    for name, value in whole_losses.items():  # each term: the mean over the ranks is the whole batch's
        assert_rel_close((ranks[0][name] + ranks[1][name]) / 2, value, 1e-5, what=name)
    for rank in range(2):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), whole):
            assert_rel_close(got, want, 1e-5)
        caught = torch.load(tmp_path / f"warnings{rank}.pt")
        assert any("wrap the Distiller instead" in message for message in caught)
