r"""``fastkd demo --suite seeds``: the methods this project grew from, side by side on the digits, over seeds.

The data, the teacher (MLP 64→512→512→10, dropout), the student (MLP 64→64→10), the 25 training images per class,
the epochs, the optimiser and the KD recipe ((1 − α)·CE + α·T²·KL, T = 2, α = 0.9) are those of ``fastkd demo``
(:mod:`fastkd.demo`). Every student starts from the same initialisation and sees the same batch order; one row per
method:

- ``scratch``: cross-entropy only; ``kd``: Hinton KD.
- ``label_smoothing``: the KD term against label smoothing instead of the teacher, ε = the teacher's mean
  non-target mass at T on the training images: what KD gives as a regulariser alone ("universe knowledge",
  Tang et al. 2020).
- ``class_mean``: the KD term against each class's mean teacher distribution at T (class relationships without
  the per-image part: "domain knowledge" without "instance knowledge").
- ``takd``: through a teacher assistant (MLP 64→128→10 distilled from the teacher, then the student from it).
- ``early_stopped``: the teacher at a quarter of its epochs (Cho & Hariharan 2019).
- ``rco``: the route of the teacher's checkpoints at 1/4, 1/2, 3/4 and all of its epochs, switched at equal
  intervals of the student's steps (:class:`fastkd.TeacherRoute`).
- ``ensemble``: three teachers (three seeds), their probabilities averaged.
- ``dkd``: CE + DKD (α = 1, β = 8, T = 4, as the DKD paper's CIFAR setting).
- ``dafl``: no training image: DAFL's generator and the student distilled on its images (:mod:`fastkd.datafree`).
- ``metadistil``: the teacher (a copy) updated each step from a pilot student's cross-entropy on a quiz batch of
  training images (:mod:`fastkd.meta`), then the KD step from it.
- ``rkd``, ``graph``, ``crd``: CE + RKD (25·distance + 50·angle), CE + 25·graph KD (λ of the authors' runs),
  CE + 0.8·CRD (RepDistiller's CIFAR weight), on the students' and teachers' penultimate features.

The table gives test accuracy, top-1 agreement and predictive KL(p_t‖p_s) with the (original) teacher, mean ± std.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from . import datafree, meta
from .demo import Progress, Settings, evaluate, load_splits, mlp, train
from .distiller import CRD, DKD, KD, RKD, CrossEntropy, Distiller, GraphKD
from .kd import kd_loss
from .teacher_route import TeacherRoute

METHODS = (
    "scratch",
    "kd",
    "label_smoothing",
    "class_mean",
    "takd",
    "early_stopped",
    "rco",
    "ensemble",
    "dkd",
    "dafl",
    "metadistil",
    "rkd",
    "graph",
    "crd",
)


def _kd_terms(settings: Settings):
    return {
        "ce": CrossEntropy(weight=1.0 - settings.alpha),
        "kd": KD(weight=settings.alpha, temperature=settings.temperature),
    }


def _synthetic_teacher_logits(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits whose softmax at T is ``probabilities``."""
    return temperature * probabilities.clamp_min(1e-12).log()


class _Suite:
    """One seed's teachers and students."""

    def __init__(self, seed: int, splits: dict, settings: Settings, epochs: dict, progress: Progress, tag: str):
        self.seed, self.splits, self.settings, self.epochs, self.progress, self.tag = (
            seed,
            splits,
            settings,
            epochs,
            progress,
            tag,
        )
        self.train_split = splits["train"]
        self.device = self.train_split.x.device
        self.checkpoints = {}
        self.teacher = self._teacher(1000 + seed, keep_route=True)
        torch.manual_seed(3000 + seed)
        self.init = mlp(settings.student_hidden).to(self.device).state_dict()

    def _teacher(self, seed: int, keep_route: bool = False):
        torch.manual_seed(seed)
        teacher = mlp(self.settings.teacher_hidden, dropout=0.5, input_dropout=0.2).to(self.device)
        total = self.epochs["teacher"]
        marks = {q: max(1, round(total * q / 4)) for q in (1, 2, 3, 4)}  # quarter q of the epochs → its epoch

        def keep(epoch):
            for quarter, at in marks.items():
                if keep_route and at == epoch:
                    self.checkpoints[quarter] = copy.deepcopy(teacher.state_dict())

        train(
            teacher,
            lambda x, y: F.cross_entropy(teacher(x), y),
            self.train_split,
            total,
            self.settings.teacher_learning_rate,
            self.settings,
            seed + 1000,
            self.progress,
            f"{self.tag} teacher",
            on_epoch=keep,
        )
        return teacher.eval()

    def student(self):
        model = mlp(self.settings.student_hidden).to(self.device)
        model.load_state_dict(self.init)
        return model

    def fit(self, model, loss_fn, label: str, with_rows: bool = False, epochs=None):
        train(
            model,
            loss_fn,
            self.train_split,
            epochs or self.epochs["student"],
            self.settings.student_learning_rate,
            self.settings,
            4000 + self.seed,
            self.progress,
            f"{self.tag} {label}",
            with_rows=with_rows,
        )
        return model

    def distil(self, teacher, label: str, terms=None, sample_ids: bool = False, on_step=None):
        student = self.student()
        distiller = Distiller(student, teacher, terms=terms or _kd_terms(self.settings))

        def loss(x, y, rows):
            out = distiller(x, y, sample_ids=rows if sample_ids else None)
            if on_step is not None:
                on_step(distiller)
            return out.loss

        self.fit(distiller, loss, label, with_rows=True)
        return student

    def distil_from_logits(self, logits, label: str):
        """The KD recipe against fixed per-image teacher logits of the training split (selected by the batch's rows)."""
        student = self.student()
        t, alpha = self.settings.temperature, self.settings.alpha

        def loss(x, y, rows):
            s = student(x)
            return (1 - alpha) * F.cross_entropy(s, y) + alpha * kd_loss(s, logits[rows], temperature=t)

        return self.fit(student, loss, label, with_rows=True)

    # ---- the methods
    def scratch(self):
        model = self.student()
        return self.fit(model, lambda x, y: F.cross_entropy(model(x), y), "scratch")

    def kd(self):
        return self.distil(self.teacher, "kd")

    def label_smoothing(self):
        t = self.settings.temperature
        with torch.no_grad():
            p = torch.softmax(self.teacher(self.train_split.x) / t, -1)
            epsilon = float(1 - p.gather(1, self.train_split.y[:, None]).mean())
        classes = p.shape[1]
        smoothed = torch.full_like(p, epsilon / (classes - 1)).scatter_(1, self.train_split.y[:, None], 1 - epsilon)
        return self.distil_from_logits(_synthetic_teacher_logits(smoothed, t), "label smoothing")

    def class_mean(self):
        t = self.settings.temperature
        with torch.no_grad():
            p = torch.softmax(self.teacher(self.train_split.x) / t, -1)
            y = self.train_split.y
            means = torch.stack([p[y == c].mean(0) for c in range(p.shape[1])])
        return self.distil_from_logits(_synthetic_teacher_logits(means[y], t), "class-mean teacher")

    def takd(self):
        torch.manual_seed(5000 + self.seed)
        assistant = mlp((128,)).to(self.device)
        distiller = Distiller(assistant, self.teacher, terms=_kd_terms(self.settings))
        self.fit(distiller, lambda x, y: distiller(x, y).loss, "assistant")
        return self.distil(assistant.eval(), "takd")

    def early_stopped(self):
        teacher = mlp(self.settings.teacher_hidden, dropout=0.5, input_dropout=0.2).to(self.device)
        teacher.load_state_dict(self.checkpoints[1])
        return self.distil(teacher.eval(), "early-stopped teacher")

    def rco(self):
        architecture = mlp(self.settings.teacher_hidden, dropout=0.5, input_dropout=0.2).to(self.device)
        batches = math.ceil(len(self.train_split.y) / self.settings.batch_size)
        steps = self.epochs["student"] * batches
        route = TeacherRoute(
            architecture, [self.checkpoints[q] for q in (1, 2, 3, 4)], TeacherRoute.equal_intervals(4, steps)
        )
        return self.distil(route, "rco route", on_step=lambda d: d.advance_schedules())

    def ensemble(self):
        teachers = [self.teacher] + [self._teacher(6000 + 10 * self.seed + i) for i in range(2)]

        class Ensemble(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.members = torch.nn.ModuleList(teachers)

            def forward(self, x):
                return torch.stack([m(x) for m in self.members])

        return self.distil(Ensemble().eval(), "ensemble")

    def dkd(self):
        terms = {"ce": CrossEntropy(), "dkd": DKD(alpha=1.0, beta=8.0, temperature=4.0)}
        return self.distil(self.teacher, "dkd", terms=terms)

    def dafl(self):
        student = self.student()
        torch.manual_seed(7000 + self.seed)
        generator = datafree.Generator(32, (1, 8, 8), width=32).to(self.device)
        last = str(len(self.teacher) - 1)
        steps = self.epochs["student"] * 2
        datafree.train_data_free(
            self.teacher,
            student,
            generator,
            last_layer=last,
            steps=steps,
            batch_size=64,
            to_teacher_input=lambda x: x.flatten(1),
            seed=self.seed,
        )
        self.progress.advance(f"{self.tag} dafl")
        return student.eval()

    def metadistil(self):
        teacher = copy.deepcopy(self.teacher).eval().requires_grad_(True)
        teacher_optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-4)
        student = self.student()
        quiz_order = torch.Generator().manual_seed(8000 + self.seed)
        t, alpha = self.settings.temperature, self.settings.alpha
        data = self.train_split

        def loss(x, y):
            quiz = torch.randint(len(data.y), (self.settings.batch_size,), generator=quiz_order).to(self.device)
            pilot = meta.pilot_update(student, x, teacher(x), lr=0.1, temperature=t)
            teacher_optimizer.zero_grad(set_to_none=True)
            meta.quiz_loss(student, pilot, data.x[quiz], data.y[quiz]).backward()
            teacher_optimizer.step()
            with torch.no_grad():
                target = teacher(x)
            s = student(x)
            return (1 - alpha) * F.cross_entropy(s, y) + alpha * kd_loss(s, target, temperature=t)

        return self.fit(student, loss, "metadistil")

    def _feature_terms(self, extra: dict):
        return {"ce": CrossEntropy(), **extra}

    def rkd(self):
        feature = str(len(self.teacher) - 2)
        return self.distil(self.teacher, "rkd", terms=self._feature_terms({"rkd": RKD("1", feature)}))

    def graph(self):
        feature = str(len(self.teacher) - 2)
        term = GraphKD(["1"], [feature], weight=25.0)  # λ = 25: the authors' runs (their checkpoints' names)
        return self.distil(self.teacher, "graph", terms=self._feature_terms({"graph": term}))

    def crd(self):
        feature = str(len(self.teacher) - 2)
        term = CRD(
            "1",
            feature,
            num_samples=len(self.train_split.y),
            student_dim=self.settings.student_hidden[-1],
            teacher_dim=self.settings.teacher_hidden[-1],
            weight=0.8,
            num_negatives=min(4096, len(self.train_split.y) - 1),
            seed=self.seed,
        )
        return self.distil(self.teacher, "crd", terms=self._feature_terms({"crd": term}), sample_ids=True)


def run_suite(
    methods=METHODS,
    *,
    seeds: int = 3,
    epochs=None,
    device: str = "cpu",
    json_path=None,
    settings: Optional[Settings] = None,
    stream=sys.stdout,
    progress_stream=sys.stderr,
) -> dict:
    """Train and evaluate ``methods`` over ``seeds`` (``settings``: the demo's, :class:`fastkd.demo.Settings`); print
    the table; return name → test figures (mean, std)."""
    settings = settings or Settings()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose among {METHODS}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer ≥ 1, got {seeds!r}")
    device = torch.device(device)
    counts = {"teacher": epochs or settings.teacher_epochs, "student": epochs or settings.student_epochs}
    splits = load_splits(device, settings.train_per_class)
    extra_teachers = 2 if "ensemble" in methods else 0
    student_units = sum(1 if m == "dafl" else (2 if m == "takd" else 1) * counts["student"] for m in methods)
    total = seeds * ((1 + extra_teachers) * counts["teacher"] + student_units)
    progress = Progress(total, progress_stream)
    start = time.perf_counter()
    runs = []
    for seed in range(seeds):
        suite = _Suite(seed, splits, settings, counts, progress, f"seed {seed + 1}/{seeds}")
        teacher_logits = {name: suite.teacher(split.x).detach() for name, split in splits.items()}
        results = {"teacher": evaluate(suite.teacher, splits["test"])}
        for method in methods:
            model = getattr(suite, method)().eval()
            results[method] = evaluate(model, splits["test"], teacher_logits["test"])
        runs.append(results)
    wall = time.perf_counter() - start
    summary = {name: {key: _mean_std([run[name][key] for run in runs]) for key in runs[0][name]} for name in runs[0]}
    print(
        f"fastkd demo --suite seeds: digits, {len(splits['train'].y)} train images, {seeds} seed(s), device {device}, "
        f"{wall:.1f} s in all",
        file=stream,
    )
    print(_table(summary), file=stream)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"seeds": seeds, "epochs": counts, "summary": summary, "runs": runs}, f, indent=1)
    return summary


def _mean_std(values) -> tuple:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _table(summary: dict) -> str:
    def cell(pair, digits):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    rows = [f"{'method':<18} {'test accuracy %':>16} {'top-1 agreement %':>18} {'predictive KL':>16}"]
    for name, figures in summary.items():
        agreement = cell(figures["agreement"], 2) if "agreement" in figures else "—"
        kl = cell(figures["predictive_kl"], 4) if "predictive_kl" in figures else "—"
        rows.append(f"{name:<18} {cell(figures['accuracy'], 2):>16} {agreement:>18} {kl:>16}")
    rows.append("(mean ± std over seeds; agreement and KL(p_teacher‖p_student) at T = 1 on the test split)")
    return "\n".join(rows)
