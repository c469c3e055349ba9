r"""``fastkd.Distiller``: a student, a frozen teacher and weighted loss terms, as one ``nn.Module``. Its terms
(:class:`KD`, :class:`LinearKD`, :class:`DKD`, :class:`CrossEntropy`, :class:`Features`, :class:`London`,
:class:`RKD`, :class:`GraphKD`, :class:`CRD` and
:class:`Custom`) live in :mod:`fastkd.terms` and are importable from here.

The guide (an example loop, the one divisor of the per-row terms, gradient accumulation and DDP, how the teacher is
held, feature capture, schedules, recipes) is the README's section "Train with a Distiller"; the classes' docstrings
give their arguments.
"""

from __future__ import annotations

import functools
import operator
import warnings
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from .adapters import adapter_for
from .kd import check_ignore_index, check_normalizer, kd_loss, tensor_divisor
from .outputs import Where, check_where, logits_of, next_token_rows
from .teacher_cache import TeacherCache
from .teacher_route import TeacherRoute
from .terms import (
    CRD,
    DKD,
    KD,
    RKD,
    CrossEntropy,
    Custom,
    DistillBatch,
    Features,
    GraphKD,
    LinearKD,
    London,
    StepNormalizer,
    Term,
    captured_feature,
)

__all__ = [
    "Distiller",
    "DistillOutput",
    "DistillBatch",
    "Term",
    "KD",
    "LinearKD",
    "DKD",
    "CrossEntropy",
    "Features",
    "London",
    "GraphKD",
    "CRD",
    "RKD",
    "Custom",
    "StepNormalizer",
]

CAPTURE_MODES = ("hooks", "outputs")


class DistillOutput(NamedTuple):
    """``output``: the student's logits (as its model returned them, read by the ``logits`` rule; not shifted with
    ``causal_lm``); ``losses``: each term's weighted value; ``loss``: their sum;
    ``metrics``: detached fidelity metrics (see :func:`fastkd.kd_loss`'s ``return_stats``)."""

    output: torch.Tensor
    losses: dict
    loss: torch.Tensor
    metrics: dict


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


def _data_parallel(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped by DistributedDataParallel or FSDP (FullyShardedDataParallel or fully_shard)."""
    fsdp = getattr(torch.distributed, "fsdp", None)
    wrappers = [nn.parallel.DistributedDataParallel]
    for name in ("FullyShardedDataParallel", "FSDPModule"):
        if fsdp is not None and isinstance(getattr(fsdp, name, None), type):
            wrappers.append(getattr(fsdp, name))
    return isinstance(model, tuple(wrappers))


def _first_tensor(inputs: Any) -> torch.Tensor:
    """The first tensor of a micro-batch's inputs (a tensor, a tuple/list or a mapping of them)."""
    values = (
        inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else [inputs]
    )
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"a micro-batch without labels needs a tensor among its inputs, got {type(inputs).__name__}")


def _sample_ids(sample_ids, device) -> Optional[torch.Tensor]:
    """The batch's dataset indices as an int64 tensor on ``device`` (or None)."""
    if sample_ids is None:
        return None
    return torch.as_tensor(sample_ids, dtype=torch.int64).to(device)


def _check_cached_teacher_terms(terms: Mapping[str, Term], capture: str) -> None:
    """Refuse what a cached teacher cannot feed: its features, its full logits (DKD), its hidden states."""
    if capture != "hooks":
        raise ValueError("a cached teacher has no outputs to capture features from: use capture='hooks'")
    for name, term in terms.items():
        if isinstance(term, (Features, London, LinearKD, DKD)) or term.captures()[1]:
            raise ValueError(
                f"term {name!r} ({type(term).__name__}) needs the teacher model's features, logits or hidden "
                "states; a TeacherCache holds only its sparse distribution (use KD, CrossEntropy or Custom)"
            )


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
    tensor, or a tuple/list (positional) or dict (keyword) of the models' arguments; ``normalizer``: the divisor of
    the per-row terms, or the :class:`StepNormalizer` of a step of accumulated micro-batches
    (:meth:`step_normalizer`); ``student``: the module to run for the student, when a trainer has wrapped
    ``distiller.student`` (DDP, FSDP, ``torch.compile``) and the wrapper must see the forward.

    ``teacher`` may be a :class:`fastkd.TeacherCache` instead of a model (offline distillation: no teacher runs at
    train time): ``forward(..., sample_ids=ids)`` then names the batch's samples as they were cached, and
    :meth:`fastkd.TeacherCache.teacher_for` gives the KD terms their sparse teacher, aligned with the student's
    logits (right-padded sequences; with ``causal_lm`` the cache holds the teacher's predictions at every position,
    shifted here like the student's). Only terms that read the teacher's distribution (:class:`KD`, with its
    ``tail``) or none (:class:`CrossEntropy`, :class:`Custom` without teacher features) apply. A
    :class:`fastkd.TeacherRoute` teacher (RCO) is moved to the anchor of the schedule step before each forward.
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
        cached = isinstance(teacher, TeacherCache)
        for name, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, nn.Module) and not (name == "teacher" and cached):
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
        if cached:
            _check_cached_teacher_terms(terms, capture)
        self.student = student
        # held, not registered (see above)
        self.__dict__["teacher"] = teacher if cached else teacher.eval().requires_grad_(False)
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
        for name, term in terms.items():
            if isinstance(term, CRD):
                self.adapters[name] = term.crd
        if len(self.adapters) and _data_parallel(student):
            warnings.warn(
                "the student is wrapped for data parallelism (DDP or FSDP) inside the Distiller, so the adapters' "
                "gradients are not synchronised across ranks; wrap the Distiller instead: "
                "DistributedDataParallel(Distiller(student, teacher, ...))",
                stacklevel=2,
            )

    def _hook(self, side: str, model: nn.Module, path: str) -> None:
        if path in self._capture.outputs[side]:
            return
        try:
            module = _unwrapped(model).get_submodule(path)
        except AttributeError:
            raise ValueError(f"the {side} has no module {path!r}") from None
        self._hooks.append(module.register_forward_hook(_RecordOutput(self._capture, side, path)))
        self._capture.add(side, path)

    def _run_models(self, inputs: Any, student: Optional[nn.Module] = None):
        """Both models' outputs, the hooks recording meanwhile (and checked for later in-place changes)."""
        self._capture.clear()
        self._capture.active = True
        try:
            student_out = _call(self.student if student is None else student, inputs)
            teacher_out = None
            if not self._cached_teacher():
                if isinstance(self.teacher, TeacherRoute):  # RCO: the anchor of this schedule step
                    self.teacher.at_step(self.schedule_step)
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
                    student = captured_feature(student_features, term.student, "student", term.call)
                    teacher = captured_feature(teacher_features, term.teacher, "teacher", term.call)
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

    def mask_keys(self) -> list:
        """The keys of the inputs that :class:`Features` terms read their masks from (``mask="key"``), sorted."""
        return sorted({t.mask for t in self.terms.values() if isinstance(t, Features) and isinstance(t.mask, str)})

    def step_normalizer(self, micro_batches: Sequence[tuple[Any, Optional[torch.Tensor]]]) -> StepNormalizer:
        """The counts of one optimizer step, to pass as ``normalizer=`` to each of its micro-batch calls: then the
        micro-batch losses add up to the loss of the whole step, for every term but London (a per-call value).

        ``micro_batches``: this rank's ``(inputs, labels)`` of the step, as they go to ``forward``. Counted: the
        rows of the per-row terms (:meth:`counted_rows` of the labels; without labels, the micro-batch's samples,
        right for ``(N, V)`` logits), the samples (the labels' dim 0, else that of the first input tensor), and Σ of
        each mask key a :class:`Features` term reads from the inputs. With ``normalize_across_ranks`` the counts
        are summed over the ranks (one all-reduce of a few numbers) and divided by the world size, so that DDP's
        average gradient equals that of the concatenated batch. A normalizer given as a number or tensor is used as
        it is, on every rank."""
        if any(isinstance(term, Features) and callable(term.mask) for term in self.terms.values()):
            raise ValueError("step_normalizer counts masks given by their key; a Features term has a callable mask")
        keys = self.mask_keys()
        counts, device = [], None
        for item in micro_batches:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"micro_batches must hold (inputs, labels) pairs, got {type(item).__name__}")
            inputs, labels = item
            first = labels if labels is not None else _first_tensor(inputs)
            device = device or first.device
            samples = first.shape[0] if first.dim() else 1
            masks = []
            for key in keys:
                if not isinstance(inputs, Mapping) or key not in inputs:
                    raise ValueError(
                        f"a Features term reads the mask {key!r} of the inputs, which this micro-batch lacks"
                    )
                mask = inputs[key]
                masks.append(mask.sum() if mask.is_floating_point() else (mask != 0).sum())
            rows = self.counted_rows(labels) if labels is not None else samples
            counts.append([torch.as_tensor(c, dtype=torch.float64, device=device) for c in (rows, samples, *masks)])
        if not counts:
            raise ValueError("micro_batches is empty")
        total = torch.stack([torch.stack(c) for c in counts]).sum(0)
        if self.normalize_across_ranks and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            total = total / dist.get_world_size()
        return StepNormalizer(total[0], total[1], dict(zip(keys, total[2:])))

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
        self,
        inputs: Any,
        labels: Optional[torch.Tensor] = None,
        *,
        normalizer: Union[float, torch.Tensor, StepNormalizer, None] = None,
        student: Optional[nn.Module] = None,
        sample_ids: Union[torch.Tensor, Sequence[int], None] = None,
    ) -> DistillOutput:
        if student is not None and _unwrapped(student) is not _unwrapped(self.student):
            raise ValueError("student must be distiller.student or a wrapper of it (DDP, FSDP, torch.compile)")
        if sample_ids is None and self._cached_teacher():
            raise ValueError(
                "a Distiller whose teacher is a TeacherCache needs forward(..., sample_ids=...) (the batch's cached "
                "samples)"
            )
        step = normalizer if isinstance(normalizer, StepNormalizer) else None
        try:
            student_out, teacher_out = self._run_models(inputs, student)
            student_features, teacher_features = self._features(student_out, teacher_out)
            if self.capture == "outputs":
                student_out, teacher_out = student_out[0], teacher_out[0]
            output = logits_of(student_out, self.logits, "student")
            if self._cached_teacher():
                teacher_rows = self.teacher.teacher_for(sample_ids, output)
            else:
                teacher_rows = logits_of(teacher_out, self.logits, "teacher")
            student_rows = output
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
                self._normalizer(student_rows, labels, step.rows if step is not None else normalizer),
                self.schedule_step,
                inputs,
                self.adapters,
                step,
                _sample_ids(sample_ids, output.device),
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
            full_teacher = isinstance(teacher_rows, torch.Tensor) and student_rows.shape == teacher_rows.shape
            if not metrics and full_teacher and "hidden" not in self._reads():
                with torch.no_grad():
                    _, metrics = kd_loss(
                        student_rows, teacher_rows, labels=labels, ignore_index=self.ignore_index, return_stats=True
                    )
        finally:
            self._capture.clear()
        return DistillOutput(output, losses, functools.reduce(operator.add, losses.values()), metrics)

    def _cached_teacher(self) -> bool:
        return isinstance(self.teacher, TeacherCache)

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
        if not self._cached_teacher():
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def extra_repr(self) -> str:
        terms = ", ".join(f"{name}={term!r}" for name, term in self.terms.items())
        return f"teacher={type(self.teacher).__name__} (frozen, not registered), terms={{{terms}}}"
