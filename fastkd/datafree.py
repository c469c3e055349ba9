r"""Data-free distillation: DAFL (Chen et al., "Data-Free Learning of Student Networks", ICCV 2019; the losses,
weights and generator of the authors' code). A generator G(z) learns to produce inputs on which the frozen teacher
behaves as on real data, and the student is distilled from the teacher on G(z) alone: no training image is used.

On a batch x = G(z), z ~ N(0, I), with y the teacher's logits and f its features (the input of its last layer)::

    one-hot:              L_oh = CE(y, argmax y)                 (the teacher is confident)
    activation:           L_a  = −mean |f|                       (its features fire as on real data)
    information entropy:  L_ie = Σ_c p̄_c·log10 p̄_c,  p̄ = mean over the batch of softmax(y)   (classes balanced)
    generator loss        L_G  = L_oh + α·L_a + β·L_ie           (α = 0.1, β = 5: the authors' MNIST setting)
    student loss          L_S  = KL(softmax(y)‖softmax(student(x))), batch mean, T = 1, on x detached

(the code's log10 in L_ie is kept: it only rescales β). :func:`dafl_losses` computes the three from the teacher's
logits and features in one pass; :class:`Generator` is a small generator for image-shaped inputs (the authors'
design: a linear map to a quarter-size map, two ×2 upsamplings with convolutions, tanh, a final affine-free batch
norm); :func:`train_data_free` alternates the generator's and the student's steps.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kd import kd_loss


def dafl_losses(teacher_logits: torch.Tensor, teacher_features: torch.Tensor) -> tuple:
    """(L_oh, L_a, L_ie) of the module docstring from the teacher's (B, C) logits and (B, ...) features, float32
    (float64 for float64 inputs); differentiable in both (the argmax target is a constant)."""
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must have shape (B, C), got {tuple(teacher_logits.shape)}")
    if teacher_features.shape[0] != teacher_logits.shape[0]:
        raise ValueError("teacher_features and teacher_logits must hold the same batch")
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    y = teacher_logits.to(dtype)
    one_hot = F.cross_entropy(y, y.detach().argmax(1))
    activation = -teacher_features.to(dtype).abs().mean()
    mean_p = torch.softmax(y, dim=1).mean(0)
    information_entropy = (mean_p * torch.log10(mean_p)).sum()
    return one_hot, activation, information_entropy


class Generator(nn.Module):
    """z (B, latent_dim) → images (B, C, H, W) with H and W divisible by 4 (module docstring)."""

    def __init__(self, latent_dim: int, image_shape: Sequence[int], width: int = 128):
        super().__init__()
        channels, height, width_px = image_shape
        if height % 4 or width_px % 4:
            raise ValueError(f"the image height and width must be divisible by 4, got {tuple(image_shape)}")
        self.start = (width, height // 4, width_px // 4)
        self.project = nn.Linear(latent_dim, width * (height // 4) * (width_px // 4))
        self.norm = nn.BatchNorm2d(width)
        self.up1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, 0.8), nn.LeakyReLU(0.2))
        self.up2 = nn.Sequential(
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2, 0.8),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.project(z).view(z.shape[0], *self.start))
        x = self.up1(F.interpolate(x, scale_factor=2))
        return self.up2(F.interpolate(x, scale_factor=2))


def _features_hook(module: nn.Module, store: list):
    """A forward pre-hook keeping the input of ``module`` (the teacher's features before its last layer)."""

    def hook(_module, args):
        store.append(args[0])

    return module.register_forward_pre_hook(hook)


def train_data_free(
    teacher: nn.Module,
    student: nn.Module,
    generator: nn.Module,
    *,
    last_layer: str,
    steps: int,
    batch_size: int = 256,
    latent_dim: Optional[int] = None,
    generator_lr: float = 1e-3,
    student_lr: float = 2e-3,
    activation_weight: float = 0.1,
    entropy_weight: float = 5.0,
    to_teacher_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    seed: int = 0,
) -> list:
    """DAFL: ``steps`` alternating steps of the generator (Adam, L_G) and the student (Adam, L_S) on fresh
    G(z); the teacher is frozen (eval mode, no gradient to its parameters) and ``last_layer`` names its last layer
    (module path), whose input is f. ``to_teacher_input`` maps G(z) to what the models take (e.g. flatten).
    Returns the per-step (L_oh, L_a, L_ie, L_S) as floats. Never reads a training image. The learning rates are
    those that worked on the digits (tests/test_datafree.py), not the authors' MNIST ones."""
    if latent_dim is None:
        latent_dim = generator.project.in_features if isinstance(generator, Generator) else None
    if latent_dim is None:
        raise ValueError("latent_dim is needed for a generator that is not a fastkd.datafree.Generator")
    teacher.eval().requires_grad_(False)
    device = next(teacher.parameters()).device
    features: list = []
    hook = _features_hook(teacher.get_submodule(last_layer), features)
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=generator_lr)
    student_optimizer = torch.optim.Adam(student.parameters(), lr=student_lr)
    noise = torch.Generator(device=device).manual_seed(seed)
    history = []
    try:
        for _ in range(steps):
            z = torch.randn(batch_size, latent_dim, generator=noise, device=device)
            x = to_teacher_input(generator(z))
            features.clear()
            logits = teacher(x)
            one_hot, activation, entropy = dafl_losses(logits, features[-1])
            generator_loss = one_hot + activation_weight * activation + entropy_weight * entropy
            student_loss = kd_loss(student(x.detach()), logits.detach())
            generator_optimizer.zero_grad()
            student_optimizer.zero_grad()
            generator_loss.backward()
            student_loss.backward()
            generator_optimizer.step()
            student_optimizer.step()
            history.append(tuple(float(v.detach()) for v in (one_hot, activation, entropy, student_loss)))
            if not all(math.isfinite(v) for v in history[-1]):
                raise FloatingPointError(f"a DAFL loss is not finite at step {len(history)}: {history[-1]}")
    finally:
        hook.remove()
    return history
