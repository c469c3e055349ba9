r"""What a :class:`fastkd.Distiller` reads out of its models' outputs: where the logits are, and the next-token rows
of a causal language model.

Where the logits are (``Distiller(logits=...)``); by default:

- a tensor: the output itself;
- a mapping (a dict, a Hugging Face ``ModelOutput``): its ``"logits"`` entry;
- an object with a ``logits`` attribute (a dataclass output): that attribute;
- a tuple or list: its first element (a Hugging Face model called with ``return_dict=False`` and no labels).

``logits="key"`` reads that mapping entry or attribute instead; ``logits=i`` element ``i`` of a tuple or list (of
a mapping: its i-th value, as a ``ModelOutput`` indexes its fields); a callable ``logits(output)`` returns the
tensor. With :class:`fastkd.distiller.LinearKD` the "logits" are the hidden states that enter the output head.

Causal language models (``Distiller(causal_lm=True)``) predict token ``j + 1`` at position ``j``, as Hugging Face's
causal-LM loss counts them: the rows are ``logits[..., :-1, :]`` against ``labels[..., 1:]``, so the last position
and the first label take no part, and a sequence of L labels counts at most L − 1 rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch

from .topk import TopK

Where = Union[None, str, int, Callable[[Any], torch.Tensor]]


def check_where(logits: Where) -> Where:
    """``logits`` validated: None (the default rule), a key or attribute name, an index, or a callable."""
    if logits is None or callable(logits) or isinstance(logits, str):
        return logits
    if isinstance(logits, int) and not isinstance(logits, bool):
        return logits
    raise TypeError(
        f"logits must be None (the default rule), a key or attribute name, a tuple index or a callable "
        f"output -> Tensor, got {type(logits).__name__} {logits!r}"
    )


def _describe(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)} elements"
    return f"a {type(output).__name__}"


def logits_of(output: Any, logits: Where, side: str) -> torch.Tensor:
    """The logits in ``side``'s model ``output`` by the rule ``logits`` (the module docstring). Raises
    ``ValueError`` naming what the output is and what was expected when they are not there."""
    hint = "pass Distiller(logits=...) a key, an attribute name, an index or a callable"
    if callable(logits):
        found = logits(output)
    elif isinstance(output, torch.Tensor) and logits is None:
        found = output
    elif logits is None or isinstance(logits, str):
        name = "logits" if logits is None else logits
        if isinstance(output, Mapping):
            if name not in output:
                raise ValueError(f"the {side}'s output is {_describe(output)}, without {name!r}; {hint}")
            found = output[name]
        elif isinstance(output, (tuple, list)) and logits is None:
            if not output:
                raise ValueError(f"the {side}'s output is an empty {type(output).__name__}; {hint}")
            found = output[0]
        elif hasattr(output, name):
            found = getattr(output, name)
        else:
            raise ValueError(f"the {side}'s output is {_describe(output)}, with no {name!r}; {hint}")
    else:  # an index; a mapping's values in order (a ModelOutput indexes its fields so)
        try:
            found = list(output.values())[logits] if isinstance(output, Mapping) else output[logits]
        except (TypeError, IndexError, KeyError):
            raise ValueError(f"the {side}'s output is {_describe(output)}: no element {logits}; {hint}") from None
    if not isinstance(found, torch.Tensor):
        raise ValueError(
            f"the logits read from the {side}'s output ({_describe(output)}) are a {type(found).__name__}, "
            f"not a tensor; {hint}"
        )
    if found.dim() == 0:
        raise ValueError(
            f"the logits read from the {side}'s output ({_describe(output)}) are a 0-d tensor (a loss?); {hint}"
        )
    return found


def next_token_rows(
    logits: Union[torch.Tensor, TopK], labels: Optional[torch.Tensor], side: str
) -> tuple[Union[torch.Tensor, TopK], Optional[torch.Tensor]]:
    """``(logits[..., :-1, :], labels[..., 1:])``: the next-token predictions of ``(*, L, V)`` logits (or of a
    sparse teacher's ``(*, L, K)`` entries) and their targets (labels ``(*, L)``, or None)."""
    if isinstance(logits, TopK):
        rows, _ = next_token_rows(logits.values, None, side)
        return dataclasses.replace(logits, values=rows, indices=logits.indices[..., :-1, :]), None
    if logits.dim() < 3:
        raise ValueError(
            f"causal_lm=True needs (batch, sequence, vocab) logits, got the {side}'s of shape {tuple(logits.shape)}"
        )
    if labels is not None and labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have the shape of the {side}'s logits without the vocab dim, {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)} (with causal_lm=True pass the labels unshifted, as to a Hugging Face model)"
        )
    return logits[..., :-1, :], None if labels is None else labels[..., 1:]
