r"""A Lightning module that distils: :class:`DistillationModule` (``pip install fastkd[lightning]``).

``DistillationModule(distiller, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))`` hands a
:class:`fastkd.Distiller` to ``lightning.Trainer.fit``:

- ``training_step`` and ``validation_step`` run the Distiller on ``(inputs, labels)`` batches (``unpack`` maps
  another batch layout to that pair) and log each term (``train/kd``, ...) and the fidelity metrics
  (``train/top1_agreement``, ...; ``val/...`` in validation);
- the optimizer gets the Distiller's parameters: the student's and the Features adapters';
- the checkpoint holds what ``distiller.state_dict()`` holds (the student, the adapters, the schedule step) and
  not the teacher, which the caller owns and must construct again to resume; the checkpoint says so under
  ``"fastkd"``;
- the teacher stays in eval mode (dropout off) whatever Lightning does to the module's mode;
- ``advance="epoch"`` (or ``"step"``) moves the Distiller's schedules on after each training epoch (or optimizer
  step); ``None`` leaves it to the caller.

With ``accumulate_grad_batches=k`` Lightning averages the k micro-batch losses, which equals the whole batch's
loss when the micro-batches count equal rows; for exact accumulation use the Distiller's ``step_normalizer`` in a
loop of your own.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

try:
    import lightning
except ImportError as exc:  # the optional dependency: say how to get it
    raise ImportError("fastkd.integrations.lightning needs lightning: pip install fastkd[lightning]") from exc

from ..distiller import Distiller

ADVANCES = ("epoch", "step", None)


def _pair(batch: Any) -> tuple:
    """The default ``unpack``: an ``(inputs, labels)`` pair as it is, anything else as inputs without labels."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


class DistillationModule(lightning.LightningModule):
    """A ``LightningModule`` around a :class:`fastkd.Distiller` (see the module docstring).

    Args:
        distiller: the Distiller (student, teacher, terms).
        optimizer: ``optimizer(parameters) -> torch.optim.Optimizer``, given the Distiller's parameters.
        unpack: ``unpack(batch) -> (inputs, labels)``; default: a 2-tuple is that pair, anything else is the inputs.
        advance: ``"epoch"``, ``"step"`` or None: when the Distiller's schedules move on.
    """

    def __init__(
        self,
        distiller: Distiller,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        *,
        unpack: Callable[[Any], tuple] = _pair,
        advance: Optional[str] = "epoch",
    ):
        super().__init__()
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a fastkd.Distiller, got {type(distiller).__name__}")
        if not callable(optimizer) or not callable(unpack):
            raise TypeError("optimizer and unpack must be callable")
        if advance not in ADVANCES:
            raise ValueError(f"advance must be one of {ADVANCES}, got {advance!r}")
        self.distiller, self.make_optimizer, self.unpack, self.advance = distiller, optimizer, unpack, advance

    def _step(self, batch: Any, prefix: str) -> torch.Tensor:
        self.distiller.teacher.eval()  # whatever train() Lightning called on this module
        inputs, labels = self.unpack(batch)
        out = self.distiller(inputs, labels)
        size = labels.shape[0] if isinstance(labels, torch.Tensor) and labels.dim() else None
        logged = {f"{prefix}/{name}": value.detach() for name, value in out.losses.items()}
        logged.update({f"{prefix}/{name}": value.float() for name, value in out.metrics.items()})
        logged[f"{prefix}/loss"] = out.loss.detach()
        self.log_dict(logged, batch_size=size)
        return out.loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.distiller.parameters())

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.advance == "step":  # once per optimizer step; the step's micro-batches used the schedules' values
            self.distiller.advance_schedules()

    def on_train_epoch_end(self) -> None:
        if self.advance == "epoch":
            self.distiller.advance_schedules()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fastkd"] = {
            "teacher": f"not saved ({type(self.distiller.teacher).__name__}): construct it again to resume",
            "schedule_step": self.distiller.schedule_step,
        }
