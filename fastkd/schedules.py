r"""Schedules: a loss weight or a temperature as a function of a step counter.

A schedule is called with a non-negative integer ``step`` and returns a float. What a step is (an optimizer step
or an epoch) is the caller's choice: :class:`fastkd.Distiller` evaluates every schedule at its own counter, which
the training loop advances (``distiller.advance_schedules()``) once per step or once per epoch.

- :class:`Constant`: v.
- :class:`Linear`: start + (end − start)·min(step/steps, 1), e.g. the soft-loss weight decaying over training
  (Shin, Boo & Sung, "Knowledge distillation for optimization of quantized deep neural networks").
- :class:`Cosine`: start + (end − start)·(1 − cos(π·min(step/steps, 1)))/2.
- :class:`Step`: value·gamma^(number of milestones ≤ step).
- :class:`Warmup`: min(step/steps, 1)·after(step), DKD's warm-up of its loss when the step is the epoch.

Schedules are plain picklable objects; a float is accepted wherever a schedule is (:func:`as_schedule`).
"""

from __future__ import annotations

import math
from typing import Sequence, Union


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return value


class Schedule:
    """Base class: ``schedule(step)`` is the value at ``step`` (an integer ≥ 0)."""

    def __call__(self, step: int) -> float:
        return self.value(_count("step", step, 0))

    def value(self, step: int) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Constant(Schedule):
    """The same value at every step."""

    def __init__(self, value: float):
        self.constant = _number("value", value)

    def value(self, step: int) -> float:
        return self.constant

    def __repr__(self) -> str:
        return f"Constant({self.constant!r})"


class _Ramp(Schedule):
    """From ``start`` at step 0 to ``end`` at ``steps`` and after, along ``shape(fraction)``."""

    def __init__(self, start: float, end: float, steps: int):
        self.start, self.end = _number("start", start), _number("end", end)
        self.steps = _count("steps", steps, 1)

    def value(self, step: int) -> float:
        return self.start + (self.end - self.start) * self.shape(min(step / self.steps, 1.0))

    @staticmethod
    def shape(fraction: float) -> float:
        raise NotImplementedError


class Linear(_Ramp):
    """start + (end − start)·min(step/steps, 1)."""

    @staticmethod
    def shape(fraction: float) -> float:
        return fraction


class Cosine(_Ramp):
    """start + (end − start)·(1 − cos(π·min(step/steps, 1)))/2: flat at both ends."""

    @staticmethod
    def shape(fraction: float) -> float:
        return (1.0 - math.cos(math.pi * fraction)) / 2.0


class Step(Schedule):
    """value·gamma^k, where k is the number of ``milestones`` (increasing steps) that ``step`` has reached."""

    def __init__(self, value: float, milestones: Sequence[int], gamma: float = 0.1):
        self.initial = _number("value", value)
        self.milestones = [_count("milestones", m, 0) for m in milestones]
        if any(a >= b for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}")
        self.gamma = _number("gamma", gamma)

    def value(self, step: int) -> float:
        return self.initial * self.gamma ** sum(step >= m for m in self.milestones)


class Warmup(Schedule):
    """min(step/steps, 1)·after(step): a linear ramp from 0 that then follows ``after`` (a number or a schedule).

    With the epoch as the step, ``Warmup(20)`` is DKD's factor min(epoch/20, 1) (mdistiller counts epochs from 1).
    """

    def __init__(self, steps: int, after: Union[float, Schedule] = 1.0):
        self.steps = _count("steps", steps, 1)
        self.after = as_schedule(after, "after")

    def value(self, step: int) -> float:
        return min(step / self.steps, 1.0) * self.after(step)


def as_schedule(value: Union[float, Schedule], name: str = "value") -> Schedule:
    """A schedule unchanged; a number as :class:`Constant` (``name`` goes into the error for anything else)."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a fastkd.schedules.Schedule, got {type(value).__name__}")
    return Constant(_number(name, value))
