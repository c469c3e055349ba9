r"""A Hugging Face ``Trainer`` that distils: :class:`DistillationTrainer` (``pip install fastkd[hf]``).

``DistillationTrainer(model=student, teacher=teacher, terms=..., args=TrainingArguments(...), ...)`` trains the
student with a :class:`fastkd.Distiller`'s terms instead of the model's own loss; everything else is the
``Trainer``'s (data, optimizer, schedules, mixed precision, DDP, checkpoints, ``evaluate``). It takes care of:

- the loss: the Distiller's terms (default ``{"ce": CrossEntropy(), "kd": KD()}``) on the models' ``logits``,
  shifted for causal LMs (``causal_lm=None`` detects a causal-LM head as the ``Trainer`` does), labels popped from
  the inputs so that neither model computes its own loss;
- LLM heads without logits: with a :class:`fastkd.distiller.LinearKD` term (``LinearKD(student.lm_head,
  teacher.lm_head, ce_weight=..., ...)``, which then replaces KD and CE), the Distiller runs the models'
  ``base_model`` and reads its ``last_hidden_state``, so the N×V logits are never built; module paths of
  ``Features`` terms are then relative to the base models (one process only, for now);
- gradient accumulation: the ``Trainer`` gathers the micro-batches of each optimizer step; their
  :meth:`fastkd.Distiller.step_normalizer` (summed over the ranks under DDP) normalizes every term, so
  ``gradient_accumulation_steps=k`` gives the gradient of one batch k times larger, padding included, and the
  ``Trainer`` does not divide the loss again;
- the columns: ``remove_unused_columns`` keeps the masks that ``Features`` terms read by key;
- logging: each term (``loss_kd``, ``loss_ce``, ...) and the fidelity metrics (``top1_agreement``, ...) beside
  ``loss`` at each logging step (means over the optimizer steps since the last log), and with an ``eval_`` prefix
  in ``evaluate()``;
- saving: the ``Trainer``'s model is the student, so ``save_model()`` and checkpoints write it with
  ``save_pretrained`` (tied weights as the model has them); the teacher is not saved (it is the caller's);
  ``Features`` adapters are trained with the student (their gradients zeroed at each step, not clipped with the
  student's) and saved beside it (``fastkd_adapters.pt``), and loaded back on ``resume_from_checkpoint`` (one
  process only, for now: a multi-process run with adapters is refused).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Mapping, Optional

import torch
from torch import nn

try:
    import transformers
except ImportError as exc:  # the optional dependency: say how to get it
    raise ImportError("fastkd.integrations.transformers needs transformers: pip install fastkd[hf]") from exc

from ..distiller import Distiller, StepNormalizer
from ..outputs import Where
from ..terms import KD, CrossEntropy

ADAPTERS_FILE = "fastkd_adapters.pt"


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal-LM head of transformers (the check the Trainer makes for label shifting)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss is a :class:`fastkd.Distiller`'s (see the module docstring).

    Args:
        model: the student (what the ``Trainer`` trains, saves and evaluates).
        teacher: the teacher; held by the Distiller in eval mode without gradients, moved to the training device,
            never saved.
        terms: the Distiller's terms; default ``{"ce": CrossEntropy(), "kd": KD()}``.
        causal_lm: shift logits and labels for next-token prediction; None: when ``model`` is a causal-LM head.
        logits: where the logits are in the models' outputs (:mod:`fastkd.outputs`); default their ``logits``.
        example_inputs: one batch (a dict of the models' inputs) to size ``Features`` adapters built ``"auto"``.
        **kwargs: the ``Trainer``'s arguments (``args``, ``train_dataset``, ``data_collator``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        *,
        terms: Optional[Mapping[str, Any]] = None,
        causal_lm: Optional[bool] = None,
        logits: Where = None,
        example_inputs: Any = None,
        **kwargs,
    ):
        super().__init__(model=model, **kwargs)
        terms = {"ce": CrossEntropy(), "kd": KD()} if terms is None else dict(terms)
        # LinearKD terms read the hidden states entering the heads: run the base models, never the N×V logits
        self._hidden = any(getattr(term, "reads", None) == "hidden" for term in terms.values())
        if self._hidden and self.args.world_size > 1:
            raise NotImplementedError(
                "LinearKD terms run the student's base model outside the Trainer's DDP wrapper, so its gradients "
                "would not be synchronised across processes; use one process, or KD terms on the logits"
            )
        self.distiller = Distiller(
            model.base_model if self._hidden else model,
            teacher.base_model if self._hidden else teacher,
            terms=terms,
            example_inputs=example_inputs,
            normalize_across_ranks=self.args.world_size > 1,
            logits="last_hidden_state" if logits is None and self._hidden else logits,
            causal_lm=_is_causal_lm(model) if causal_lm is None else causal_lm,
        )
        if len(self.distiller.adapters) and self.args.world_size > 1:
            raise NotImplementedError(
                "Features adapters are trained outside the Trainer's DDP wrapper, so their gradients would not be "
                "synchronised across processes; use adapter=None (equal shapes) or a Distiller in your own loop "
                "wrapped as DistributedDataParallel(Distiller(...))"
            )
        self.distiller.teacher.to(self.args.device)
        self.distiller.adapters.to(self.args.device)
        # the loss comes normalized over the whole step: the Trainer must not divide it by the accumulation steps
        self.model_accepts_loss_kwargs = True
        if hasattr(self, "loss_is_scaled_for_ga"):
            self.loss_is_scaled_for_ga = True
        self._logged = {True: defaultdict(list), False: defaultdict(list)}  # training → name → detached values
        self._steps_since_log = 0  # the optimizer steps whose training terms are in self._logged[True]

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in self.distiller.mask_keys():
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def get_batch_samples(self, *args, **kwargs):
        """The ``Trainer``'s micro-batches of one optimizer step, with their :class:`fastkd.StepNormalizer` in place
        of the ``Trainer``'s token count."""
        batch_samples, _ = super().get_batch_samples(*args, **kwargs)
        if not batch_samples:
            return batch_samples, None
        self._steps_since_log += 1
        self.distiller.adapters.zero_grad()  # a new step: the Trainer zeroes the student's gradients only
        micro_batches = []
        for batch in batch_samples:
            batch = self._prepare_inputs(batch)  # on the training device: the cross-rank sum runs there
            labels = batch.get("labels")
            micro_batches.append(({k: v for k, v in batch.items() if k != "labels"}, labels))
        return batch_samples, self.distiller.step_normalizer(micro_batches)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Distiller's loss of one micro-batch (normalized over the step when the ``Trainer`` gathered it)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        normalizer = num_items_in_batch if isinstance(num_items_in_batch, StepNormalizer) else None
        out = self.distiller(inputs, labels, normalizer=normalizer, student=None if self._hidden else model)
        logged = self._logged[model.training]
        for name, value in out.losses.items():
            logged[f"loss_{name}"].append(value.detach())
        for name, value in out.metrics.items():
            logged[name].append(value.detach().float())
        outputs = {"hidden_states" if self._hidden else "logits": out.output}
        return (out.loss, outputs) if return_outputs else out.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the terms and fidelity metrics since the last log: with training's ``loss``, the terms summed over
        each step's micro-batches and averaged over the steps, the metrics averaged over the calls; with
        ``evaluate()``'s ``eval_loss``, their means over the evaluation batches."""
        training = "loss" in logs
        if training or "eval_loss" in logs:
            logged = self._logged[training]
            steps = max(self._steps_since_log, 1)
            for name, values in logged.items():
                total = torch.stack(values).sum().item()
                value = total / steps if training and name.startswith("loss_") else total / len(values)
                logs[name if training else f"eval_{name}"] = round(value, 6)
            logged.clear()
            if training:
                self._steps_since_log = 0
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        """The ``Trainer``'s optimizer over the student, and a group for the ``Features`` adapters."""
        optimizer = super().create_optimizer(*args, **kwargs)
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        adapters = [p for p in self.distiller.adapters.parameters() if p.requires_grad and id(p) not in present]
        if adapters:
            optimizer.add_param_group({"params": adapters, "weight_decay": self.args.weight_decay})
        return optimizer

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if len(self.distiller.adapters):
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            torch.save(self.distiller.adapters.state_dict(), os.path.join(output_dir, ADAPTERS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, *args, **kwargs):
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
        path = os.path.join(resume_from_checkpoint, ADAPTERS_FILE)
        if len(self.distiller.adapters) and os.path.isfile(path):
            self.distiller.adapters.load_state_dict(torch.load(path, map_location=self.args.device))
