"""fastkd.integrations.lightning.DistillationModule: fit + resume from a checkpoint equal to an uninterrupted fit
(student, adapters, optimizer momentum and schedule step restored; the teacher absent from the checkpoint and
said so), the teacher kept in eval mode, the logged terms and metrics, and the README example."""

import os

import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning")

from fastkd import Distiller, schedules  # noqa: E402
from fastkd.distiller import KD, CrossEntropy, Features  # noqa: E402
from fastkd.integrations.lightning import DistillationModule  # noqa: E402

from conftest import assert_rel_close  # noqa: E402


def net(width, seed, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, 4))


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 4, (24,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)


def module():
    distiller = Distiller(
        net(5, 0),
        net(9, 1, dropout=0.5),  # dropout: a teacher switched to train mode would be noisy
        terms={
            "ce": CrossEntropy(0.5),
            "kd": KD(schedules.Linear(1.0, 0.2, steps=3), temperature=2.0),
            "hint": Features("1", "1"),  # Tanh outputs, 5 → 9 channels: a Linear adapter
        },
        example_inputs=torch.randn(2, 6),
    )
    return DistillationModule(distiller, lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9))


def trainer(tmp_path, epochs):
    return lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


def test_fit_and_resume_give_the_weights_of_an_uninterrupted_fit(tmp_path):
    whole = module()
    trainer(tmp_path, 3).fit(whole, loader())
    first = module()
    first_trainer = trainer(tmp_path, 1)
    first_trainer.fit(first, loader())
    path = tmp_path / "epoch1.ckpt"
    first_trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert not any(key.startswith("distiller.teacher") for key in checkpoint["state_dict"])
    assert "not saved" in checkpoint["fastkd"]["teacher"] and checkpoint["fastkd"]["schedule_step"] == 1
    resumed = module()
    trainer(tmp_path, 3).fit(resumed, loader(), ckpt_path=str(path))
    assert resumed.distiller.schedule_step == whole.distiller.schedule_step == 3
    for (name, a), b in zip(whole.distiller.named_parameters(), resumed.distiller.parameters()):
        assert_rel_close(b, a, 1e-6, what=name)
    assert any("adapters" in name for name, _ in whole.distiller.named_parameters())


def test_the_teacher_stays_in_eval_mode_and_the_terms_are_logged(tmp_path):
    distillation = module()
    modes = []
    distillation.distiller.teacher.register_forward_hook(lambda m, args, out: modes.append(m.training))
    run = trainer(tmp_path, 1)
    run.fit(distillation, loader(), loader())
    assert modes and not any(modes)
    logged = run.callback_metrics
    for key in ("train/ce", "train/kd", "train/hint", "train/loss", "train/top1_agreement", "val/kd", "val/loss"):
        assert key in logged, key


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="must be a fastkd.Distiller"):
        DistillationModule(net(3, 0), torch.optim.SGD)
    with pytest.raises(ValueError, match="advance must be one of"):
        DistillationModule(module().distiller, torch.optim.SGD, advance="batch")


def test_the_readme_example_runs(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### With Lightning") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", section.index("```python"))]
    monkeypatch.chdir(tmp_path)
    namespace = {"student": net(5, 0), "teacher": net(9, 1), "train_loader": loader()}
    exec(example.replace("max_epochs=30", "max_epochs=1, logger=False, enable_progress_bar=False"), namespace)
    assert namespace["module"].distiller.schedule_step == 1
