"""fastkd.Distiller on models whose forward returns a dict, a ModelOutput-like mapping, a dataclass or a tuple
(fastkd.outputs' rule and its overrides), causal LMs' next-token rows (causal_lm=True), and the errors when the
logits are not where they are looked for. Tiny Hugging Face models built from configs when transformers is
installed."""

import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd.distiller import KD, CrossEntropy, Distiller

from conftest import assert_rel_close, tiny_gpt2

VOCAB = 11


class TokenModel(nn.Module):
    """(B, L) token ids → (B, L, VOCAB) logits, wrapped by ``wrap`` (the output's form)."""

    def __init__(self, width, wrap=lambda logits: logits, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.head = nn.Linear(width, VOCAB)
        self.wrap = wrap

    def forward(self, input_ids):
        return self.wrap(self.head(torch.tanh(self.embed(input_ids))))


class Output(collections.OrderedDict):
    """A mapping with attribute access, as Hugging Face's ModelOutput."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclasses.dataclass
class DataclassOutput:
    hidden: torch.Tensor
    logits: torch.Tensor


WRAPS = {
    "tensor": lambda x: x,
    "dict": lambda x: {"hidden": x.mean(-1), "logits": x},
    "model_output": lambda x: Output(loss=x.sum(), logits=x),
    "dataclass": lambda x: DataclassOutput(x.mean(-1), x),
    "tuple": lambda x: (x, x.mean(-1)),
}


def tokens(batch=3, length=6, seed=1, pad_from=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    labels = ids.clone()
    labels[0, pad_from:] = -100  # a padded sequence
    return ids, labels


def run(wrap, causal_lm=False, logits=None, terms=None):
    student, teacher = TokenModel(8, wrap, seed=0), TokenModel(12, wrap, seed=1)
    terms = terms or {"ce": CrossEntropy(), "kd": KD(temperature=2.0)}
    distiller = Distiller(student, teacher, terms=terms, causal_lm=causal_lm, logits=logits)
    ids, labels = tokens()
    out = distiller(ids, labels)
    out.loss.backward()
    return out, [p.grad for p in student.parameters()]


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_every_output_form_gives_the_losses_of_plain_logits(wrap):
    want, want_grads = run(WRAPS["tensor"])
    got, grads = run(WRAPS[wrap])
    assert torch.equal(got.output, want.output)
    for name in want.losses:
        assert torch.equal(got.losses[name], want.losses[name])
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))


@pytest.mark.parametrize(
    "wrap, logits",
    [
        (lambda x: {"scores": x, "other": x.mean(-1)}, "scores"),
        (lambda x: DataclassOutput(x, x.mean(-1)), "hidden"),  # an attribute by name
        (lambda x: (x.sum(), x), 1),  # a loss first, as HF's tuples with labels
        (lambda x: Output(loss=x.sum(), logits=x), 1),  # a mapping's values in order, as a ModelOutput's
        (lambda x: [[x]], lambda out: out[0][0]),
    ],
)
def test_the_logits_option_overrides_the_rule(wrap, logits):
    want, _ = run(WRAPS["tensor"])
    got, _ = run(wrap, logits=logits)
    for name in want.losses:
        assert torch.equal(got.losses[name], want.losses[name])


@pytest.mark.parametrize(
    "wrap, logits, message",
    [
        (lambda x: {"scores": x}, None, r"a dict with keys \['scores'\], without 'logits'"),
        (lambda x: {"logits": x}, "scores", r"without 'scores'"),
        (lambda x: (x.sum(), x), None, r"0-d tensor \(a loss\?\)"),
        (lambda x: (), None, "empty tuple"),
        (lambda x: (x,), 3, "no element 3"),
        (lambda x: {"logits": [x]}, None, "are a list, not a tensor"),
        (lambda x: object(), None, "with no 'logits'"),
    ],
)
def test_logits_not_where_they_are_looked_for_name_the_output(wrap, logits, message):
    with pytest.raises(ValueError, match=message) as error:
        run(wrap, logits=logits)
    assert "student's output" in str(error.value) or "student's" in str(error.value)
    assert "Distiller(logits=...)" in str(error.value)


@pytest.mark.parametrize("bad, error", [(1.5, TypeError), (True, TypeError)])
def test_a_bad_logits_option_is_refused_at_construction(bad, error):
    with pytest.raises(error, match="logits must be"):
        Distiller(TokenModel(4), TokenModel(4), logits=bad)


def test_causal_lm_must_be_a_bool():
    with pytest.raises(TypeError, match="causal_lm must be a bool"):
        Distiller(TokenModel(4), TokenModel(4), causal_lm=1)


def shifted(logits, labels):
    return logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)


def test_causal_lm_rows_are_the_next_token_predictions():
    out, _ = run(WRAPS["model_output"], causal_lm=True)
    student, teacher = TokenModel(8, seed=0), TokenModel(12, seed=1)
    ids, labels = tokens()
    s, y = shifted(student(ids), labels)
    t, _ = shifted(teacher(ids).detach(), labels)
    # Hugging Face's causal-LM loss: CE of the shifted rows, averaged over the labels that count
    assert_rel_close(out.losses["ce"], F.cross_entropy(s, y, ignore_index=-100), 1e-5)
    assert_rel_close(out.losses["kd"], fastkd.kd_loss(s, t, labels=y, temperature=2.0), 1e-5)
    assert out.output.shape == (3, 6, VOCAB)  # the logits as the model returned them


def test_causal_lm_counted_rows_count_the_shifted_labels():
    distiller = Distiller(TokenModel(4), TokenModel(4), causal_lm=True)
    _, labels = tokens()  # 3 × 6 labels, 2 of them -100 (positions 4 and 5 of the first row)
    assert int(distiller.counted_rows(labels)) == 3 * 5 - 2
    assert distiller.counted_rows(None, torch.Size((3, 6, VOCAB))) == 3 * 5
    assert int(Distiller(TokenModel(4), TokenModel(4)).counted_rows(labels)) == 3 * 6 - 2


def test_causal_lm_gradient_accumulation_with_counted_rows_equals_the_whole_batch():
    student, teacher = TokenModel(8, seed=0), TokenModel(12, seed=1)
    distiller = Distiller(student, teacher, terms={"ce": CrossEntropy(), "kd": KD()}, causal_lm=True)
    ids, labels = tokens(batch=4)
    distiller(ids, labels).loss.backward()
    whole = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    micro = [(ids[:1], labels[:1]), (ids[1:], labels[1:])]
    normalizer = sum(distiller.counted_rows(y) for _, y in micro)
    for x, y in micro:
        distiller(x, y, normalizer=normalizer).loss.backward()
    for a, b in zip(whole, (p.grad for p in student.parameters())):
        assert_rel_close(b, a, 1e-5)


def test_causal_lm_needs_sequence_logits_and_matching_labels():
    flat = Distiller(nn.Linear(4, VOCAB), nn.Linear(4, VOCAB), causal_lm=True)
    with pytest.raises(ValueError, match=r"causal_lm=True needs \(batch, sequence, vocab\) logits"):
        flat(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    distiller = Distiller(TokenModel(4), TokenModel(4), causal_lm=True)
    ids, labels = tokens()
    with pytest.raises(ValueError, match="pass the labels unshifted"):
        distiller(ids, labels[:, 1:])


# tiny Hugging Face models from configs (no downloads)


def gpt2(width, seed):
    return tiny_gpt2(width, seed, vocab_size=50)


def test_hugging_face_causal_lm_ce_term_equals_its_own_loss_with_padding():
    student, teacher = gpt2(16, 0), gpt2(24, 1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    distiller = Distiller(student, teacher, terms={"ce": CrossEntropy(), "kd": KD()}, causal_lm=True)
    inputs = {"input_ids": ids, "attention_mask": attention_mask}
    out = distiller(inputs, labels)
    hf_loss = student(**inputs, labels=labels).loss
    assert_rel_close(out.losses["ce"], hf_loss, 1e-5)
    assert int(distiller.counted_rows(labels)) == int((labels[:, 1:] != -100).sum())
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_hugging_face_encoder_classifier_through_the_distiller():
    transformers = pytest.importorskip("transformers")

    def bert(width, seed):
        torch.manual_seed(seed)
        config = transformers.BertConfig(
            vocab_size=40,
            hidden_size=width,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * width,
            max_position_embeddings=16,
            num_labels=5,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return transformers.BertForSequenceClassification(config)

    student, teacher = bert(16, 0), bert(32, 1)
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 40, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=int)}
    labels = torch.tensor([0, 3, -100, 4])
    out = Distiller(student, teacher, terms={"ce": CrossEntropy(), "kd": KD()})(inputs, labels)
    s, t = student(**inputs).logits, teacher.eval()(**inputs).logits.detach()
    counted = labels != -100
    assert_rel_close(out.losses["ce"], F.cross_entropy(s[counted], labels[counted]), 1e-5)
    assert_rel_close(out.losses["kd"], fastkd.kd_loss(s, t, labels=labels, temperature=4.0), 1e-5)
