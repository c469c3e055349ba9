r"""``fastkd.Distiller``: a student, a frozen teacher and weighted loss terms, as one ``nn.Module``; and its terms
:class:`KD`, :class:`LinearKD`, :class:`DKD`, :class:`CrossEntropy`, :class:`Features`, :class:`London` and
:class:`Custom`.

The guide (an example loop, the one divisor of the per-row terms, gradient accumulation and DDP, how the teacher is
held, feature capture, schedules, recipes) is the README's section "Train with a Distiller"; the classes' docstrings
give their arguments.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .adapters import adapter_for
from .dkd import dkd_loss
from .features import feature_loss
from .kd import _check_options, check_ignore_index, check_normalizer, kd_loss, tensor_divisor
from .linear_kd import head_parameters, linear_kd_loss
from .lipschitz import london_loss
from .outputs import Where, check_where, logits_of, next_token_rows
from .schedules import Schedule, as_schedule

CAPTURE_MODES = ("hooks", "outputs")


class DistillBatch(NamedTuple):
    """What a loss term sees for one call of the distiller."""

    student_logits: torch.Tensor  # the rows the terms read: with causal_lm, the next-token predictions [..., :-1, :]
    teacher_logits: torch.Tensor
    student_features: Mapping[Any, list]  # module path (or output key) → its outputs in call order
    teacher_features: Mapping[Any, list]
    labels: Optional[torch.Tensor]  # with causal_lm, the next tokens: labels[..., 1:]
    ignore_index: int
    normalizer: Union[int, torch.Tensor]  # the divisor of the per-row terms
    step: int  # the schedule step
    inputs: Any


class DistillOutput(NamedTuple):
    """``output``: the student's logits (as its model returned them, read by the ``logits`` rule; not shifted with
    ``causal_lm``); ``losses``: each term's weighted value; ``loss``: their sum;
    ``metrics``: detached fidelity metrics (see :func:`fastkd.kd_loss`'s ``return_stats``)."""

    output: torch.Tensor
    losses: dict
    loss: torch.Tensor
    metrics: dict


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
    that returns ``(K, *, V)`` logits is an ensemble (``teacher_weights``, ``ensemble`` as in kd_loss). Also
    reports the fidelity metrics (for an ensemble, against its distribution at T = 1)."""

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
    """

    def __init__(
        self,
        student: Any,
        teacher: Any,
        weight: Union[float, Schedule] = 1.0,
        *,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = feature_loss,
        adapter: Union[str, nn.Module, None] = "auto",
        call: int = -1,
    ):
        super().__init__(weight)
        if not (adapter is None or adapter == "auto" or isinstance(adapter, nn.Module)):
            raise ValueError(f"adapter must be 'auto', None or an nn.Module, got {adapter!r}")
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        self.student, self.teacher, self.loss, self.adapter, self.call = student, teacher, loss, adapter, call

    def captures(self) -> tuple[list, list]:
        return [self.student], [self.teacher]

    def __call__(self, batch: DistillBatch) -> torch.Tensor:
        student = _feature(batch.student_features, self.student, "student", self.call)
        teacher = _feature(batch.teacher_features, self.teacher, "teacher", self.call)
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
        return self.loss(student, teacher)


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
            [_feature(batch.student_features, key, "student", -1) for key in self.student],
            [_feature(batch.teacher_features, key, "teacher", -1) for key in self.teacher],
            n_iter=self.n_iter,
            init=self.init,
        )


class Custom(Term):
    """Any ``fn(batch) -> Tensor`` (or ``(Tensor, metrics)``) as a weighted term."""

    def __init__(self, fn: Callable[[DistillBatch], Any], weight: Union[float, Schedule] = 1.0):
        super().__init__(weight)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, batch: DistillBatch):
        return self.fn(batch)


def _feature(features: Mapping[Any, list], key: Any, side: str, call: int) -> torch.Tensor:
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


class _Capture:
    """What the forward hooks record, only while the distiller runs its two models: per side, module path →
    outputs in call order, with their tensors' versions to notice a later in-place change (versions are not
    recorded inside torch.compile, whose functionalised graphs bump them). A plain object, so it pickles."""

    def __init__(self):
        self.active = False
        self.outputs = {"student": {}, "teacher": {}}
        self.versions = {"student": {}, "teacher": {}}

    def add(self, side: str, key: str) -> None:
        self.outputs[side].setdefault(key, [])
        self.versions[side].setdefault(key, [])

    def clear(self) -> None:
        self.active = False
        for store in (*self.outputs.values(), *self.versions.values()):
            for values in store.values():
                values.clear()

    def check_unchanged(self) -> None:
        for side, store in self.outputs.items():
            for key, outputs in store.items():
                for output, version in zip(outputs, self.versions[side][key]):
                    if version is not None and output._version != version:
                        raise RuntimeError(
                            f"the output of the {side}'s module {key!r} was changed in place after the module ran "
                            f"(an in-place op follows it, e.g. ReLU(inplace=True) or `out += identity`), so the "
                            f"captured feature is not that module's output; capture another module, or make that "
                            f"op out of place"
                        )


class _RecordOutput:
    """Forward hook that records the module's output in a :class:`_Capture` while it is active."""

    def __init__(self, capture: _Capture, side: str, key: str):
        self.capture, self.side, self.key = capture, side, key

    def __call__(self, module: nn.Module, args, output) -> None:
        if not self.capture.active:
            return
        self.capture.outputs[self.side][self.key].append(output)
        eager_tensor = isinstance(output, torch.Tensor) and not torch.compiler.is_compiling()
        self.capture.versions[self.side][self.key].append(output._version if eager_tensor else None)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module whose paths users name: under DistributedDataParallel (.module) and torch.compile (._orig_mod)."""
    while True:
        inner = (
            getattr(model, "module", None)
            if isinstance(model, nn.parallel.DistributedDataParallel)
            else getattr(model, "_orig_mod", None)
        )
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _call(model: nn.Module, inputs: Any):
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


class Distiller(nn.Module):
    """A student, a frozen teacher and named, weighted loss terms (see the :mod:`fastkd.distiller` docstring).

    ``terms``: a dict name → :class:`Term` (or a callable ``fn(batch)``, weight 1); default ``{"kd": KD()}``.
    ``example_inputs``: one batch (as ``forward`` takes it) to size the adapters of :class:`Features` terms;
    both models run it once in eval mode without gradient. ``ignore_index``: the label of rows to skip.
    ``logits``: where the logits are in what the models return (:mod:`fastkd.outputs`: by default the output itself
    if it is a tensor, else its ``"logits"`` entry or attribute, else a tuple's first element); a key, attribute
    name, index or callable overrides it. ``causal_lm``: the rows are next-token predictions, as in Hugging Face's
    causal-LM loss: logits ``[..., :-1, :]`` against labels ``[..., 1:]`` (pass the labels unshifted).
    ``forward(inputs, labels=None, *, normalizer=None)`` returns a :class:`DistillOutput`; ``inputs`` is a
    tensor, or a tuple/list (positional) or dict (keyword) of the models' arguments.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        terms: Optional[Mapping[str, Any]] = None,
        example_inputs: Any = None,
        capture: str = "hooks",
        ignore_index: int = -100,
        normalize_across_ranks: bool = False,
        logits: Where = None,
        causal_lm: bool = False,
    ):
        super().__init__()
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        terms = {"kd": KD()} if terms is None else dict(terms)
        if not terms:
            raise ValueError("terms must name at least one loss term")
        for name, term in terms.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"term names must be non-empty strings without '.', got {name!r}")
            if not isinstance(term, Term):
                if not callable(term):
                    raise TypeError(f"term {name!r} must be a fastkd Term or a callable, got {type(term).__name__}")
                terms[name] = Custom(term)
        reads = {term.reads for term in terms.values() if term.reads is not None}
        if len(reads) > 1:
            raise ValueError(
                "terms that read the models' outputs as logits (KD, DKD, CrossEntropy) and as hidden states "
                "(LinearKD) cannot share a Distiller: give LinearKD a ce_weight instead of a CrossEntropy term"
            )
        self.student = student
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)  # held, not registered (see above)
        self.terms = terms
        self.capture = capture
        self.ignore_index = check_ignore_index(ignore_index)
        self.normalize_across_ranks = normalize_across_ranks
        self.logits = check_where(logits)
        if not isinstance(causal_lm, bool):
            raise TypeError(f"causal_lm must be a bool, got {type(causal_lm).__name__}")
        self.causal_lm = causal_lm
        self.schedule_step = 0
        self.adapters = nn.ModuleDict()
        self._capture = _Capture()
        self._hooks = []
        if capture == "hooks":
            for term in terms.values():
                student_keys, teacher_keys = term.captures()
                for key in student_keys:
                    self._hook("student", student, key)
                for key in teacher_keys:
                    self._hook("teacher", teacher, key)
        features = {name: term for name, term in terms.items() if isinstance(term, Features)}
        if any(term.adapter == "auto" for term in features.values()):
            self._build_adapters(features, example_inputs)
        for name, term in features.items():
            if isinstance(term.adapter, nn.Module):
                self.adapters[name] = term.adapter

    def _hook(self, side: str, model: nn.Module, path: str) -> None:
        if path in self._capture.outputs[side]:
            return
        try:
            module = _unwrapped(model).get_submodule(path)
        except AttributeError:
            raise ValueError(f"the {side} has no module {path!r}") from None
        self._hooks.append(module.register_forward_hook(_RecordOutput(self._capture, side, path)))
        self._capture.add(side, path)

    def _run_models(self, inputs: Any):
        """Both models' outputs, the hooks recording meanwhile (and checked for later in-place changes)."""
        self._capture.clear()
        self._capture.active = True
        try:
            student_out = _call(self.student, inputs)
            with torch.no_grad():
                teacher_out = _call(self.teacher, inputs)
        finally:
            self._capture.active = False
        self._capture.check_unchanged()
        return student_out, teacher_out

    def _build_adapters(self, features: dict, example_inputs: Any) -> None:
        if example_inputs is None:
            auto = [name for name, term in features.items() if term.adapter == "auto"]
            raise ValueError(
                f"Features terms {auto} have adapter='auto', which needs example_inputs (one batch) to "
                f"size the adapters; or pass adapter=None or a module"
            )
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                student_out, teacher_out = self._run_models(example_inputs)
                student_features, teacher_features = self._features(student_out, teacher_out)
                for term in features.values():
                    if term.adapter != "auto":
                        continue
                    student = _feature(student_features, term.student, "student", term.call)
                    teacher = _feature(teacher_features, term.teacher, "teacher", term.call)
                    term.adapter = adapter_for(student.shape, teacher.shape).to(student.device, student.dtype)
        finally:
            self.student.train(was_training)
            self._capture.clear()

    def _features(self, student_out, teacher_out):
        if self.capture == "hooks":
            return self._capture.outputs["student"], self._capture.outputs["teacher"]
        features = []
        for side, out in (("student", student_out), ("teacher", teacher_out)):
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError(
                    f"with capture='outputs' the {side} must return (logits, features), got {type(out).__name__}"
                )
            found = out[1]
            keys = found.keys() if isinstance(found, Mapping) else range(len(found))
            features.append({key: [found[key]] for key in keys})
        return features

    def remove_hooks(self) -> None:
        """Remove the forward hooks from the student and teacher (Features terms then fail with a clear error)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def counted_rows(self, labels: Optional[torch.Tensor], logits_shape: Optional[torch.Size] = None):
        """The rows the per-row terms count: labels ≠ ignore_index (a 0-d tensor), else all rows of
        ``logits_shape[:-1]``; with ``causal_lm``, of the next-token rows (labels ``[..., 1:]``, one position
        fewer per sequence), labels given unshifted as to ``forward``. Sum it over the micro-batches of an optimizer
        step to get its ``normalizer``."""
        if labels is not None:
            return self._counted_rows(labels[..., 1:] if self.causal_lm else labels, None)
        if logits_shape is None:
            raise ValueError("counted_rows needs labels or the logits' shape")
        rows = torch.Size(logits_shape)[:-1]
        if self.causal_lm and rows:
            rows = torch.Size((*rows[:-1], max(rows[-1] - 1, 0)))
        return self._counted_rows(None, rows)

    def _counted_rows(self, labels: Optional[torch.Tensor], rows: Optional[torch.Size]):
        """The counted rows of labels or of a shape of rows, as they reach the terms (already shifted)."""
        return (labels != self.ignore_index).sum() if labels is not None else rows.numel()

    def _normalizer(self, logits: torch.Tensor, labels: Optional[torch.Tensor], normalizer):
        if normalizer is not None:  # 0: no counted row in the whole step; the losses are 0
            normalizer = check_normalizer(normalizer, zero_allowed=True)
            if isinstance(normalizer, torch.Tensor):
                return tensor_divisor(normalizer)
            return normalizer if normalizer != 0 else 1
        count = self._counted_rows(labels, logits.shape[:-1])
        if not (self.normalize_across_ranks and dist.is_available() and dist.is_initialized()):
            return count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1)
        count = torch.as_tensor(count, dtype=torch.float32, device=logits.device)
        dist.all_reduce(count)
        return count.clamp_min(1) / dist.get_world_size()

    def forward(
        self, inputs: Any, labels: Optional[torch.Tensor] = None, *, normalizer: Union[float, torch.Tensor, None] = None
    ) -> DistillOutput:
        try:
            student_out, teacher_out = self._run_models(inputs)
            student_features, teacher_features = self._features(student_out, teacher_out)
            if self.capture == "outputs":
                student_out, teacher_out = student_out[0], teacher_out[0]
            output = logits_of(student_out, self.logits, "student")
            student_rows, teacher_rows = output, logits_of(teacher_out, self.logits, "teacher")
            if self.causal_lm:
                student_rows, labels = next_token_rows(student_rows, labels, "student")
                teacher_rows, _ = next_token_rows(teacher_rows, None, "teacher")
            batch = DistillBatch(
                student_rows,
                teacher_rows,
                student_features,
                teacher_features,
                labels,
                self.ignore_index,
                self._normalizer(student_rows, labels, normalizer),
                self.schedule_step,
                inputs,
            )
            losses, metrics = {}, {}
            for name, term in self.terms.items():
                value = term(batch)
                if isinstance(value, tuple):
                    value, term_metrics = value
                    for key, metric in term_metrics.items():
                        metrics.setdefault(key, metric.detach())
                weight = term.weight(self.schedule_step)
                losses[name] = value if weight == 1 else weight * value  # ×1 is exact: no graph node for it
            if not metrics and student_rows.shape == teacher_rows.shape and "hidden" not in self._reads():
                with torch.no_grad():
                    _, metrics = kd_loss(
                        student_rows, teacher_rows, labels=labels, ignore_index=self.ignore_index, return_stats=True
                    )
        finally:
            self._capture.clear()
        return DistillOutput(output, losses, functools.reduce(operator.add, losses.values()), metrics)

    def _reads(self) -> set:
        return {term.reads for term in self.terms.values()}

    def advance_schedules(self, steps: int = 1) -> int:
        """Move every schedule on by ``steps`` (call once per epoch or once per optimizer step); the new step."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer ≥ 0, got {steps!r}")
        self.schedule_step += steps
        return self.schedule_step

    def get_extra_state(self) -> dict:
        return {"schedule_step": self.schedule_step}

    def set_extra_state(self, state: dict) -> None:
        self.schedule_step = int(state["schedule_step"])

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def extra_repr(self) -> str:
        terms = ", ".join(f"{name}={term!r}" for name, term in self.terms.items())
        return f"teacher={type(self.teacher).__name__} (frozen, not registered), terms={{{terms}}}"
