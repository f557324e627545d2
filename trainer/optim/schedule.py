"""Warmup + decay learning-rate multipliers (for LambdaLR).

Convention: ``lr_lambda(step)`` is the multiplier for optimizer step ``step`` (0-based: the
value LambdaLR holds before the ``step``-th ``scheduler.step()`` call, i.e. the lr used by the
``step``-th optimizer step). Warmup uses ``(step + 1) / warmup_steps`` so the very first
optimizer step trains with ``lr / warmup_steps`` instead of a wasted lr of 0, and step
``warmup_steps - 1`` reaches the full lr. Decay then runs from 1 at ``warmup_steps`` to
``min_lr_ratio`` at ``total_steps`` (and stays there after).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["lr_lambda", "build_scheduler", "resolve_warmup_steps"]

DECAYS = ("linear", "cosine", "constant")


def lr_lambda(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    decay: str = "linear",
    min_lr_ratio: float = 0.0,
) -> float:
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; expected one of {DECAYS}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def resolve_warmup_steps(
    total_steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None
) -> int:
    """Explicit ``warmup_steps`` wins; else ``ceil(warmup_ratio * total_steps)``; else 0."""
    if warmup_steps is not None:
        return int(warmup_steps)
    if warmup_ratio:
        return int(math.ceil(warmup_ratio * total_steps))
    return 0


class _LrLambda:
    """Picklable callable (a lambda/partial closure would not be) holding the schedule."""

    def __init__(self, warmup_steps: int, total_steps: int, decay: str, min_lr_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay = decay
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_lambda(
            step,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            decay=self.decay,
            min_lr_ratio=self.min_lr_ratio,
        )


def build_scheduler(
    optimizer: Optimizer,
    total_steps: int,
    *,
    warmup_ratio: float | None = None,
    warmup_steps: int | None = None,
    decay: str = "linear",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """LambdaLR over all param groups (each group scales its own base lr).

    ``scheduler.state_dict()`` holds only ``last_epoch``/``base_lrs`` etc.: LambdaLR saves the
    ``__dict__`` of callable objects, which here is four plain numbers/strings.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; expected one of {DECAYS}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    warmup = resolve_warmup_steps(total_steps, warmup_steps, warmup_ratio)
    return LambdaLR(optimizer, _LrLambda(warmup, total_steps, decay, min_lr_ratio))
