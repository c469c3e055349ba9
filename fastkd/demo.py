r"""``fastkd demo``: Hinton-style distillation on scikit-learn's handwritten digits, from scratch vs distilled.

The data is ``sklearn.datasets.load_digits`` (1797 8×8 images, 10 classes; it ships inside scikit-learn, no
download), pixels ÷ 16, split once (stratified, split seed 0) into 1078 train / 359 validation / 360 test images,
of which a fixed 25 training images per class (250) are used: distillation helps where labels are scarce. For
each seed:

1. a teacher, an MLP 64→512→512→10 with dropout (input 0.2, hidden 0.5), Adam 1e-3 for 300 epochs;
2. a student, an MLP 64→64→10 with no regularisation, cross-entropy, Adam 3e-3 for 500 epochs ("scratch");
3. the same student, same initialisation and batch order, trained through :class:`fastkd.Distiller` with
   (1 − α)·CE + α·T²·KL(p_t‖p_s), T = 2, α = 0.9 ("distilled").

Every setting was chosen on the validation split (the README gives the sweep); the test split is reported. The
table gives mean ± std over seeds of test accuracy and errors, the fidelity metrics of Stanton et al. (top-1
agreement with the teacher and predictive KL(p_t‖p_s) at T = 1, on the test split), and the training time.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distiller import KD, CrossEntropy, Distiller
from .kd import kd_loss


@dataclass(frozen=True)
class Settings:
    """The demo's recipe, every choice made on the validation split (the README has the sweep)."""

    temperature: float = 2.0
    alpha: float = 0.9  # weight of the KD term; 1 − α weighs the cross-entropy
    teacher_hidden: tuple = (512, 512)
    student_hidden: tuple = (64,)
    teacher_epochs: int = 300
    student_epochs: int = 500
    teacher_learning_rate: float = 1e-3
    student_learning_rate: float = 3e-3
    batch_size: int = 64
    train_per_class: int = 25  # images per class kept from the training split (0: all of it)

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite positive number, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def load_splits(device: torch.device, per_class: int = 0) -> dict:
    """The digits split 60/20/20 (stratified, split seed 0), optionally ``per_class`` training images per class."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise RuntimeError("fastkd demo needs scikit-learn for its dataset: pip install 'fastkd[demo]'") from exc
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=0)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
    if per_class:  # a fixed subset (seed 0), the same for every run
        rng = np.random.RandomState(0)
        keep = np.concatenate([rng.permutation(np.flatnonzero(y_train == c))[:per_class] for c in range(10)])
        x_train, y_train = x_train[keep], y_train[keep]

    def split(features, labels):
        return Split(
            torch.tensor(features, dtype=torch.float32, device=device),
            torch.tensor(labels, dtype=torch.long, device=device),
        )

    return {"train": split(x_train, y_train), "val": split(x_val, y_val), "test": split(x_test, y_test)}


def mlp(hidden, dropout: float = 0.0, input_dropout: float = 0.0) -> nn.Sequential:
    layers, width = [nn.Dropout(input_dropout)] if input_dropout else [], 64
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 10))


class Progress:
    """One line on stderr redrawn in place: what is training and how far it is."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 30):
        self.total, self.done, self.stream, self.width, self.label = total, 0, stream, width, None
        self.start = time.perf_counter()

    def advance(self, label: str) -> None:
        self.done += 1
        if (
            label == self.label
            and self.done * 100 // self.total == (self.done - 1) * 100 // self.total
            and self.done < self.total
        ):
            return  # redraw at each percent and each new label only
        self.label = label
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        self.stream.write(
            f"\r{label:<28} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.done}/{self.total} epochs, {elapsed:5.1f} s"
        )
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def train(
    model: nn.Module,
    loss_fn,
    data: Split,
    epochs: int,
    learning_rate: float,
    settings: Settings,
    seed: int,
    progress: Progress,
    label: str,
    *,
    with_rows: bool = False,
    on_epoch=None,
) -> float:
    """Adam on shuffled mini-batches; ``loss_fn(x, y)`` (``loss_fn(x, y, rows)`` with ``with_rows``: the batch's
    indices in ``data``) is the batch loss; ``on_epoch(epoch)`` runs after each epoch. Returns the training time
    (s)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for rows in torch.randperm(len(data.y), generator=order).split(settings.batch_size):
            rows = rows.to(data.y.device)
            loss = loss_fn(data.x[rows], data.y[rows], rows) if with_rows else loss_fn(data.x[rows], data.y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        progress.advance(label)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, teacher_logits=None) -> dict:
    """Accuracy (%) and errors; with the teacher's logits also top-1 agreement (%) and predictive KL at T = 1."""
    logits = model(data.x)
    correct = (logits.argmax(-1) == data.y).sum().item()
    result = {"accuracy": 100.0 * correct / len(data.y), "errors": len(data.y) - correct}
    if teacher_logits is not None:
        _, stats = kd_loss(logits, teacher_logits, return_stats=True)
        result.update(agreement=100.0 * stats["top1_agreement"].item(), predictive_kl=stats["predictive_kl"].item())
    return result


def run_seed(seed: int, splits: dict, settings: Settings, epochs: dict, progress: Progress, seeds: int) -> dict:
    """Teacher, student from scratch and distilled student for one seed: their validation and test results."""
    train_split, device = splits["train"], splits["train"].x.device
    tag = f"seed {seed + 1}/{seeds}"
    torch.manual_seed(1000 + seed)
    teacher = mlp(settings.teacher_hidden, dropout=0.5, input_dropout=0.2).to(device)
    times = {
        "teacher": train(
            teacher,
            lambda x, y: F.cross_entropy(teacher(x), y),
            train_split,
            epochs["teacher"],
            settings.teacher_learning_rate,
            settings,
            2000 + seed,
            progress,
            f"{tag} teacher",
        )
    }
    teacher_logits = {name: teacher(split.x).detach() for name, split in splits.items()}

    torch.manual_seed(3000 + seed)
    scratch = mlp(settings.student_hidden).to(device)
    distilled = mlp(settings.student_hidden).to(device)
    distilled.load_state_dict(scratch.state_dict())  # same initialisation
    times["scratch"] = train(
        scratch,
        lambda x, y: F.cross_entropy(scratch(x), y),
        train_split,
        epochs["student"],
        settings.student_learning_rate,
        settings,
        4000 + seed,
        progress,
        f"{tag} student (scratch)",
    )
    distiller = Distiller(
        distilled,
        teacher,
        terms={
            "ce": CrossEntropy(weight=1.0 - settings.alpha),
            "kd": KD(weight=settings.alpha, temperature=settings.temperature),
        },
    )
    times["distilled"] = train(
        distiller,
        lambda x, y: distiller(x, y).loss,
        train_split,
        epochs["student"],
        settings.student_learning_rate,
        settings,
        4000 + seed,
        progress,
        f"{tag} student (distilled)",
    )
    results = {}
    for name, model in (("teacher", teacher), ("scratch", scratch), ("distilled", distilled)):
        results[name] = {
            split: evaluate(model, splits[split], None if name == "teacher" else teacher_logits[split])
            for split in ("val", "test")
        }
        results[name]["seconds"] = times[name]
    return results


def _mean_std(values) -> tuple:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def summarize(runs: list) -> dict:
    """Mean and std over seeds of every figure, per model and split."""
    summary = {}
    for name in runs[0]:
        summary[name] = {"seconds": _mean_std([r[name]["seconds"] for r in runs])}
        for split in ("val", "test"):
            summary[name][split] = {key: _mean_std([r[name][split][key] for r in runs]) for key in runs[0][name][split]}
    return summary


def table(summary: dict, test_size: int) -> str:
    """The printed table (test split), one row per model."""

    def cell(pair, digits):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    rows = [
        f"{'model':<20} {'test accuracy %':>16} {'test errors':>13} {'top-1 agreement %':>18} "
        f"{'predictive KL':>16} {'train time s':>13}"
    ]
    names = {"teacher": "teacher", "scratch": "student, scratch", "distilled": "student, distilled"}
    for name, label in names.items():
        test = summary[name]["test"]
        agreement = cell(test["agreement"], 2) if "agreement" in test else "—"
        kl = cell(test["predictive_kl"], 4) if "predictive_kl" in test else "—"
        rows.append(
            f"{label:<20} {cell(test['accuracy'], 2):>16} {cell(test['errors'], 1):>13} {agreement:>18} "
            f"{kl:>16} {cell(summary[name]['seconds'], 1):>13}"
        )
    rows.append(
        f"(mean ± std over seeds; {test_size} test images; agreement and KL(p_teacher‖p_student) at T = 1 "
        f"on the test split)"
    )
    return "\n".join(rows)


def run(
    *,
    seeds: int = 5,
    epochs=None,
    device: str = "cpu",
    json_path=None,
    settings: Settings = Settings(),
    stream=sys.stdout,
    progress_stream=sys.stderr,
) -> dict:
    """Train and evaluate every seed, print the table, optionally write everything as JSON; return the summary.
    ``epochs`` overrides both the teacher's and the students' epoch counts."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer ≥ 1, got {seeds!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer ≥ 1, got {epochs!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    counts = {"teacher": epochs or settings.teacher_epochs, "student": epochs or settings.student_epochs}
    splits = load_splits(device, settings.train_per_class)
    progress = Progress(seeds * (counts["teacher"] + 2 * counts["student"]), progress_stream)
    start = time.perf_counter()
    runs = [run_seed(seed, splits, settings, counts, progress, seeds) for seed in range(seeds)]
    wall = time.perf_counter() - start
    summary = summarize(runs)
    sizes = {name: len(split.y) for name, split in splits.items()}
    print(
        f"fastkd demo: digits, {sizes['train']} train / {sizes['val']} validation / {sizes['test']} test images, "
        f"{seeds} seed(s), T = {settings.temperature}, α = {settings.alpha}, device {device}, "
        f"{wall:.1f} s in all",
        file=stream,
    )
    print(table(summary, sizes["test"]), file=stream)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(
                {
                    "settings": asdict(settings),
                    "epochs": counts,
                    "seeds": seeds,
                    "device": str(device),
                    "sizes": sizes,
                    "wall_seconds": wall,
                    "summary": summary,
                    "runs": runs,
                },
                f,
                indent=1,
            )
    return summary
