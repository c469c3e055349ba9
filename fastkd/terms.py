r"""The loss terms of :class:`fastkd.Distiller` (:class:`KD`, :class:`LinearKD`, :class:`DKD`,
:class:`CrossEntropy`, :class:`Features`, :class:`London`, :class:`Custom`) and :class:`DistillBatch`, what a term
sees for one call of the distiller. Importable from :mod:`fastkd.distiller` as well.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .dkd import dkd_loss
from .features import feature_loss
from .kd import _check_options, kd_loss
from .linear_kd import head_parameters, linear_kd_loss
from .lipschitz import london_loss
from .relational import CRDLoss, graph_kd_loss, rkd_loss
from .schedules import Schedule, as_schedule


class StepNormalizer(NamedTuple):
    """The counts of one optimizer step's micro-batches (:meth:`fastkd.Distiller.step_normalizer`), summed over the
    ranks and divided by the world size with ``normalize_across_ranks``: ``rows`` divides the per-row terms (KD,
    DKD, CE, LinearKD); a :class:`Features` term's per-call mean is weighted by this call's share of ``samples``, or
    of ``masks[key]`` (Σ of the mask ``key`` of the inputs) when its mask is that key, so that the micro-batches'
    losses add up to the loss of the whole step."""

    rows: torch.Tensor
    samples: torch.Tensor
    masks: Mapping[str, torch.Tensor]


class DistillBatch(NamedTuple):
    """What a loss term sees for one call of the distiller. A custom term reads the captured features with
    :meth:`student_feature` and :meth:`teacher_feature` (declare them: ``Custom(fn, student_features=[...],
    teacher_features=[...])``) and the Features terms' adapters in ``adapters`` (term name → module)."""

    student_logits: torch.Tensor  # the rows the terms read: with causal_lm, the next-token predictions [..., :-1, :]
    teacher_logits: torch.Tensor
    student_features: Mapping[Any, list]  # module path (or output key) → its outputs in call order
    teacher_features: Mapping[Any, list]
    labels: Optional[torch.Tensor]  # with causal_lm, the next tokens: labels[..., 1:]
    ignore_index: int
    normalizer: Union[int, torch.Tensor]  # the divisor of the per-row terms
    step: int  # the schedule step
    inputs: Any  # the batch as the distiller got it
    adapters: Mapping[str, nn.Module] = MappingProxyType({})  # the terms' modules by term name (adapters, CRD)
    step_normalizer: Optional[StepNormalizer] = None  # given to the distiller's forward as its normalizer
    sample_ids: Optional[torch.Tensor] = None  # the samples' dataset indices, given to the distiller's forward

    def student_feature(self, key: Any, call: int = -1) -> torch.Tensor:
        """The student's captured feature ``key`` (module path or output key) of call ``call`` in this forward."""
        return captured_feature(self.student_features, key, "student", call)

    def teacher_feature(self, key: Any, call: int = -1) -> torch.Tensor:
        """The teacher's captured feature ``key`` of call ``call`` in this forward."""
        return captured_feature(self.teacher_features, key, "teacher", call)


class Term:
    """A loss term: ``term(batch)`` is its unweighted value (or ``(value, metrics)``); ``weight`` a schedule.
    ``reads``: what it takes the models' outputs to be, ``"logits"`` or ``"hidden"`` (the states entering the output
    heads, :class:`LinearKD`), or None if it does not read them; one Distiller's terms must agree."""

    reads: Optional[str] = None

    def __init__(self, weight: Union[float, Schedule] = 1.0):
        self.weight = as_schedule(weight, "weight")

    def __call__(self, batch: DistillBatch):
        raise NotImplementedError

    def captures(self) -> tuple[list, list]:
        """The student and teacher features (module paths or output keys) this term reads."""
        return [], []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class KD(Term):
    """:func:`fastkd.kd_loss` (KD part only: CE is its own term) of the student and teacher logits, reduced with
    the distiller's divisor. Rows whose label is ``ignore_index`` are skipped when labels are given. A teacher
    that returns ``(K, *, V)`` logits is an ensemble (``teacher_weights``, ``ensemble`` as in kd_loss); a cached
    teacher (:class:`fastkd.TeacherCache`) is sparse (``tail`` as in kd_loss). Also reports the fidelity metrics
    (for an ensemble, against its distribution at T = 1)."""

    reads = "logits"

    def __init__(
        self,
        weight: Union[float, Schedule] = 1.0,
        *,
        temperature: Union[float, Schedule] = 4.0,
        divergence: str = "kl",
        beta: float = 0.5,
        scale_by_t2: bool = True,
        teacher_weights=None,
        ensemble: str = "prob",
        tail: Optional[str] = None,
        backend: str = "auto",
    ):
        super().__init__(weight)
        self.temperature = as_schedule(temperature, "temperature")
        self.options = dict(
            divergence=divergence,
            beta=beta,
            scale_by_t2=scale_by_t2,
            teacher_weights=teacher_weights,
            ensemble=ensemble,
            tail=tail,
            backend=backend,
        )
        _check_options(
            temperature=self.temperature(0),
            divergence=divergence,
            beta=beta,
            reduction="batchmean",
            ignore_index=-100,
            ce_weight=0.0,
            kd_weight=1.0,
            scale_by_t2=scale_by_t2,
            normalizer=None,
        )

    def __call__(self, batch: DistillBatch):
        return kd_loss(
            batch.student_logits,
            batch.teacher_logits,
            temperature=self.temperature(batch.step),
            labels=batch.labels,
            ignore_index=batch.ignore_index,
            normalizer=batch.normalizer,
            return_stats=True,
            **self.options,
        )


class LinearKD(Term):
    """:func:`fastkd.linear_kd_loss` from the hidden states the models return (``(*, H)``, the input of their output
    heads) through the heads given here, chunk by chunk: the N×V logits are never built. The student and teacher
    given to the Distiller are then the models without their heads (e.g. a Hugging Face causal LM's ``.model``),
    and ``student_head``/``teacher_head`` the heads (``nn.Linear`` or a tied ``nn.Embedding``; the student's gets a
    gradient, so its parameters must be in the optimizer; the teacher's gets none). ``ce_weight`` adds the hard-label
    CE (needs labels); other options as in linear_kd_loss. Reduced with the distiller's divisor; reports the
    fidelity metrics. Cannot share a Distiller with terms that read logits (:class:`KD`, :class:`DKD`,
    :class:`CrossEntropy`), and ``DistillOutput.output`` is then the student's hidden states."""

    reads = "hidden"

    def __init__(
        self,
        student_head: nn.Module,
        teacher_head: nn.Module,
        weight: Union[float, Schedule] = 1.0,
        *,
        temperature: Union[float, Schedule] = 4.0,
        divergence: str = "kl",
        beta: float = 0.5,
        ce_weight: float = 0.0,
        scale_by_t2: bool = True,
        vocab_size: Optional[int] = None,
        logit_softcap: Optional[float] = None,
        chunk_rows: Optional[int] = None,
        backend: str = "auto",
    ):
        super().__init__(weight)
        head_parameters(student_head, "student_head")
        head_parameters(teacher_head, "teacher_head")
        self.heads = (student_head, teacher_head)
        self.temperature = as_schedule(temperature, "temperature")
        self.options = dict(
            divergence=divergence,
            beta=beta,
            ce_weight=ce_weight,
            scale_by_t2=scale_by_t2,
            vocab_size=vocab_size,
            logit_softcap=logit_softcap,
            chunk_rows=chunk_rows,
            backend=backend,
        )
        _check_options(
            temperature=self.temperature(0),
            divergence=divergence,
            beta=beta,
            reduction="batchmean",
            ignore_index=-100,
            ce_weight=ce_weight,
            kd_weight=1.0,
            scale_by_t2=scale_by_t2,
            normalizer=None,
        )

    def __call__(self, batch: DistillBatch):
        (student_weight, student_bias), (teacher_weight, teacher_bias) = (
            head_parameters(head, name) for head, name in zip(self.heads, ("student_head", "teacher_head"))
        )
        return linear_kd_loss(
            batch.student_logits,
            student_weight,
            batch.teacher_logits,
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            labels=batch.labels,
            ignore_index=batch.ignore_index,
            normalizer=batch.normalizer,
            temperature=self.temperature(batch.step),
            return_stats=True,
            **self.options,
        )


class DKD(Term):
    """:func:`fastkd.dkd_loss` (α·TCKD + β·NCKD; needs labels), reduced with the distiller's divisor. Its warm-up
    is a schedule on ``weight``: ``DKD(weight=schedules.Warmup(20))``."""

    reads = "logits"

    def __init__(
        self,
        weight: Union[float, Schedule] = 1.0,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: Union[float, Schedule] = 4.0,
        backend: str = "auto",
    ):
        super().__init__(weight)
        self.temperature = as_schedule(temperature, "temperature")
        self.options = dict(alpha=alpha, beta=beta, backend=backend)

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        return dkd_loss(
            batch.student_logits,
            batch.teacher_logits,
            _labels(batch, self),
            temperature=self.temperature(batch.step),
            ignore_index=batch.ignore_index,
            normalizer=batch.normalizer,
            **self.options,
        )


class CrossEntropy(Term):
    """Hard-label cross-entropy of the student logits: Σ over counted rows of −log softmax(s)[label] ÷ the
    distiller's divisor (0, not NaN, when no row counts)."""

    reads = "logits"

    def __init__(self, weight: Union[float, Schedule] = 1.0, *, label_smoothing: float = 0.0):
        super().__init__(weight)
        self.label_smoothing = label_smoothing

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        logits, labels = batch.student_logits, _labels(batch, self)
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels must have the shape of the student logits without the class dim, "
                f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
            )
        if logits.dim() != 2:  # (N, V) logits as they are: a reshape would add a graph node
            logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        total = F.cross_entropy(
            logits.float(),
            labels,
            ignore_index=batch.ignore_index,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )
        return total / batch.normalizer


class Features(Term):
    """Feature matching (FitNets): ``loss(adapter(student feature), teacher feature)``.

    ``student``/``teacher``: module paths (``capture="hooks"``) or keys of the features the models return
    (``capture="outputs"``). ``call``: which call's output when the module runs more than once per forward
    (default the last). ``adapter``: ``"auto"`` (built from the example batch by
    :func:`fastkd.adapters.adapter_for`, identity when the shapes agree), ``None`` (none; shapes must agree), or
    a module. ``loss``: any ``loss(student, teacher) -> Tensor``; by default :func:`fastkd.feature_loss` (mean
    squared error over elements; e.g. ``functools.partial(feature_loss, normalize="channel")`` for others).

    ``mask``: the elements that count, e.g. the attention mask of token features: the key of a mask in the inputs
    mapping (``"attention_mask"``) or ``mask(batch) -> Tensor``; it goes to ``loss(student, teacher, mask=m)``. An
    integer mask counts where it is non-zero. A mask with the features' shape but their channels (or anything that
    broadcasts to the features) is used as it is; one with a dim fewer is the features without their channel dim,
    ``(N, L)`` for ``(N, L, C)`` tokens or ``(N, H, W)`` for ``(N, C, H, W)`` maps, and gets a size-1 channel dim.

    The value is the loss of this call (a mean for ``feature_loss``). With a :class:`StepNormalizer` as the
    distiller's normalizer it is weighted by this call's share of the step: of its samples (the features' dim 0),
    or of the mask's Σ with a mask key, so that the micro-batch losses of a step add up to the step's loss. That is
    exact when the loss is a mean over samples of equal size, or over the elements a mask keeps.
    """

    def __init__(
        self,
        student: Any,
        teacher: Any,
        weight: Union[float, Schedule] = 1.0,
        *,
        loss: Callable[..., torch.Tensor] = feature_loss,
        adapter: Union[str, nn.Module, None] = "auto",
        call: int = -1,
        mask: Union[str, Callable[[DistillBatch], torch.Tensor], None] = None,
    ):
        super().__init__(weight)
        if not (adapter is None or adapter == "auto" or isinstance(adapter, nn.Module)):
            raise ValueError(f"adapter must be 'auto', None or an nn.Module, got {adapter!r}")
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        if not (mask is None or isinstance(mask, str) or callable(mask)):
            raise TypeError(f"mask must be None, a key of the inputs or a callable batch -> Tensor, got {mask!r}")
        self.student, self.teacher, self.loss, self.adapter, self.call = student, teacher, loss, adapter, call
        self.mask = mask

    def captures(self) -> tuple[list, list]:
        return [self.student], [self.teacher]

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        student = batch.student_feature(self.student, self.call)
        teacher = batch.teacher_feature(self.teacher, self.call)
        if self.adapter == "auto":
            raise RuntimeError("this Features term's adapter has not been built: give the Distiller example_inputs")
        if self.adapter is not None:
            student = self.adapter(student)
        if student.shape != teacher.shape:
            raise ValueError(
                f"student feature {self.student!r} has shape {tuple(student.shape)} (after the "
                f"adapter) but teacher feature {self.teacher!r} has {tuple(teacher.shape)}; use "
                f"adapter='auto' or a module that maps one to the other"
            )
        step = batch.step_normalizer
        if self.mask is None:
            value = self.loss(student, teacher)
            return value if step is None else value * _share(student.shape[0], step.samples).to(value.dtype)
        mask = _feature_mask(self._batch_mask(batch), student.shape)
        value = self.loss(student, teacher, mask=mask)
        if step is None:
            return value
        if callable(self.mask):
            raise ValueError("a Features term with a callable mask cannot be step-normalized: give the mask's key")
        return value * _share(mask.sum(), step.masks[self.mask]).to(value.dtype)

    def _batch_mask(self, batch: DistillBatch) -> torch.Tensor:
        if callable(self.mask):
            mask = self.mask(batch)
        elif not isinstance(batch.inputs, Mapping) or self.mask not in batch.inputs:
            keys = list(batch.inputs.keys()) if isinstance(batch.inputs, Mapping) else type(batch.inputs).__name__
            raise ValueError(f"Features(mask={self.mask!r}) reads the inputs mapping, which has {keys}")
        else:
            mask = batch.inputs[self.mask]
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"the mask of Features({self.student!r}, ...) must be a tensor, got {type(mask).__name__}")
        return mask


def _share(count, step_count: torch.Tensor) -> torch.Tensor:
    """count ÷ step_count in float32 (0 where the step counts nothing)."""
    step_count = step_count.to(torch.float32)
    return torch.where(step_count > 0, count / step_count.clamp_min(1e-30), 0.0)


def _feature_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``mask`` (bool, float, or integer: non-zero counts) aligned with features of ``shape`` (Features' rule)."""
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        mask = mask != 0
    if mask.dim() != len(shape) - 1:
        return mask
    channels_last = mask.shape == shape[:-1]
    channels_first = mask.shape == shape[:1] + shape[2:]
    if channels_last and channels_first and len(shape) > 2:
        raise ValueError(
            f"a mask of shape {tuple(mask.shape)} fits features {tuple(shape)} with the channels first or last; "
            f"give it a size-1 channel dim"
        )
    if channels_last or channels_first:
        return mask.unsqueeze(-1 if channels_last and len(shape) > 2 else 1)
    raise ValueError(
        f"a mask of shape {tuple(mask.shape)} does not match features {tuple(shape)} without their channel dim "
        f"({tuple(shape[:-1])} or {tuple(shape[:1] + shape[2:])})"
    )


class London(Term):
    """:func:`fastkd.london_loss` (LONDON's Lipschitz-continuity loss) over the stage features named by
    ``student`` and ``teacher`` (lists of L ≥ 2 module paths or output keys, (B, C, H, W) maps, last call of
    each); ``n_iter``, ``init`` as there. The authors' CIFAR weight is α/200."""

    def __init__(
        self,
        student: list,
        teacher: list,
        weight: Union[float, Schedule] = 1.0,
        *,
        n_iter: int = 10,
        init: str = "uniform",
    ):
        super().__init__(weight)
        if len(student) != len(teacher) or len(student) < 2:
            raise ValueError(
                f"student and teacher must name the same number (≥ 2) of stages, got {len(student)} and {len(teacher)}"
            )
        self.student, self.teacher, self.n_iter, self.init = list(student), list(teacher), n_iter, init

    def captures(self) -> tuple[list, list]:
        return self.student, self.teacher

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        return london_loss(
            [batch.student_feature(key) for key in self.student],
            [batch.teacher_feature(key) for key in self.teacher],
            n_iter=self.n_iter,
            init=self.init,
        )


class RKD(Term):
    """:func:`fastkd.rkd_loss` (relational KD: distance- and angle-wise) of the embeddings named by ``student`` and
    ``teacher`` (module paths or output keys; each flattened to (B, D), widths may differ; last call unless
    ``call``). The teacher gets no gradient. With a :class:`StepNormalizer` the value is weighted by this call's
    share of the step's samples, but the relations stay those of each micro-batch."""

    def __init__(
        self,
        student: Any,
        teacher: Any,
        weight: Union[float, Schedule] = 1.0,
        *,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        call: int = -1,
    ):
        super().__init__(weight)
        self.student, self.teacher, self.call = student, teacher, call
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def captures(self) -> tuple[list, list]:
        return [self.student], [self.teacher]

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        student = batch.student_feature(self.student, self.call).flatten(1)
        teacher = batch.teacher_feature(self.teacher, self.call).flatten(1)
        value = rkd_loss(student, teacher, distance_weight=self.distance_weight, angle_weight=self.angle_weight)
        step = batch.step_normalizer
        return value if step is None else value * _share(student.shape[0], step.samples).to(value.dtype)


class GraphKD(Term):
    """:func:`fastkd.graph_kd_loss` (graph-based relational KD) over the layers named by ``student`` and ``teacher``
    (lists of module paths or output keys, one graph per pair; last call of each); ``knn`` as there."""

    def __init__(self, student: list, teacher: list, weight: Union[float, Schedule] = 1.0, *, knn=None):
        super().__init__(weight)
        if isinstance(student, str) or isinstance(teacher, str) or len(student) != len(teacher) or not student:
            raise ValueError(
                f"student and teacher must be lists naming as many layers (≥ 1), got {student!r}, {teacher!r}"
            )
        self.student, self.teacher, self.knn = list(student), list(teacher), knn

    def captures(self) -> tuple[list, list]:
        return self.student, self.teacher

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        return graph_kd_loss(
            [batch.student_feature(key) for key in self.student],
            [batch.teacher_feature(key) for key in self.teacher],
            knn=self.knn,
        )


class CRD(Term):
    """:class:`fastkd.relational.CRDLoss` (contrastive representation distillation) of the features named by
    ``student`` and ``teacher`` (flattened to (B, student_dim) and (B, teacher_dim)). It needs each sample's index
    in the dataset: pass ``sample_ids=`` to the distiller's forward (a dataset that returns its indices, e.g.
    ``(x, y, i)``). The CRDLoss (its two heads, its memory banks, the state of its negatives' generator) is the
    term's ``crd`` and the distiller's ``adapters[name]``: in ``distiller.parameters()`` and its ``state_dict()``.
    The authors' CIFAR weight is 0.8 (with CE 1). With a :class:`StepNormalizer` the value is weighted by this
    call's share of the step's samples."""

    def __init__(
        self,
        student: Any,
        teacher: Any,
        num_samples: int,
        student_dim: int,
        teacher_dim: int,
        weight: Union[float, Schedule] = 1.0,
        *,
        call: int = -1,
        **crd_options,
    ):
        super().__init__(weight)
        self.student, self.teacher, self.call = student, teacher, call
        self.crd = CRDLoss(num_samples, student_dim, teacher_dim, **crd_options)

    def captures(self) -> tuple[list, list]:
        return [self.student], [self.teacher]

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        if batch.sample_ids is None:
            raise ValueError("a CRD term needs the samples' dataset indices: distiller(..., sample_ids=indices)")
        student = batch.student_feature(self.student, self.call)
        teacher = batch.teacher_feature(self.teacher, self.call)
        value = self.crd(student, teacher, batch.sample_ids)
        step = batch.step_normalizer
        return value if step is None else value * _share(student.shape[0], step.samples).to(value.dtype)


class Custom(Term):
    """Any ``fn(batch) -> Tensor`` (or ``(Tensor, metrics)``) as a weighted term. ``student_features`` and
    ``teacher_features``: the module paths (or output keys) it reads with ``batch.student_feature(key)`` and
    ``batch.teacher_feature(key)``, captured for it; ``batch.adapters`` holds the Features terms' adapters."""

    def __init__(
        self,
        fn: Callable[[DistillBatch], Any],
        weight: Union[float, Schedule] = 1.0,
        *,
        student_features: Sequence[Any] = (),
        teacher_features: Sequence[Any] = (),
    ):
        super().__init__(weight)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        for name, keys in (("student_features", student_features), ("teacher_features", teacher_features)):
            if isinstance(keys, str) or not isinstance(keys, Sequence):
                raise TypeError(f"{name} must be a list of module paths or output keys, got {keys!r}")
        self.fn, self.student_features, self.teacher_features = fn, list(student_features), list(teacher_features)

    def captures(self) -> tuple[list, list]:
        return self.student_features, self.teacher_features

    def __call__(self, batch: DistillBatch):
        return self.fn(batch)


def captured_feature(features: Mapping[Any, list], key: Any, side: str, call: int) -> torch.Tensor:
    """The output of call ``call`` of the module (or output key) ``key`` in this forward."""
    outputs = features.get(key, [])
    if not outputs:
        raise RuntimeError(
            f"the {side}'s feature {key!r} was not produced by its forward (module not run, or hooks removed)"
        )
    try:
        return outputs[call]
    except IndexError:
        raise IndexError(
            f"call={call}, but the {side}'s module {key!r} ran {len(outputs)} time(s) in this forward"
        ) from None


def _labels(batch: DistillBatch, term: Term) -> torch.Tensor:
    if batch.labels is None:
        raise ValueError(f"{type(term).__name__} needs labels: call distiller(inputs, labels)")
    return batch.labels
