"""The training loss per row (``loss.*``): cross entropy on the labels, optionally mixed with
distillation from teacher probabilities.

``ce``: ``-sum_c y_c log p_c`` with ``p = softmax(logits)`` and ``y`` the row's label
distribution (hard or soft: pseudo-labels are soft).

``distill`` (the 1st place Arena solution distilled 70B teachers into Gemma-2-9B this way)::

    (1 - w) * ce  +  w * T^2 * KL(q_T || p_T)

with ``w = loss.teacher_weight``, ``T = loss.temperature``, ``q`` the row's teacher
probabilities (``teacher_<class>`` columns), ``q_T = softmax(log q / T)`` (for probabilities
from logits z that is ``softmax(z / T)``) and ``p_T = softmax(logits / T)``. The ``T^2`` keeps
the KL's gradient on the scale of the CE's as T grows (Hinton et al. 2015). ``w = 0`` is the
plain CE, bitwise.

Everything is computed in fp32 whatever the logits' dtype. Rows' weights (padding rows 0) and
the normaliser are applied by the caller, as for any per-row loss.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .errors import ConfigError

KINDS = ("ce", "distill")


def soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross entropy against (possibly soft) label distributions, in fp32."""
    return -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def distillation_kl(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(q_T || p_T) (see the module docstring); classes the teacher gives 0 add 0."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    q = F.softmax(torch.log(teacher.float()) / temperature, dim=-1)
    return (torch.special.xlogy(q, q) - q * log_p).sum(-1)


class RowLoss:
    """``loss(logits, labels, teacher) -> [B]`` per-row losses, as configured."""

    def __init__(self, kind: str = "ce", teacher_weight: float = 0.0, temperature: float = 1.0):
        if kind not in KINDS:
            raise ConfigError(f"config key 'loss.kind' = {kind!r}: expected one of {list(KINDS)}")
        self.kind, self.teacher_weight, self.temperature = kind, float(teacher_weight), float(temperature)

    @property
    def needs_teacher(self) -> bool:
        return self.kind == "distill" and self.teacher_weight > 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        ce = soft_cross_entropy(logits, labels)
        if not self.needs_teacher:
            return ce
        if teacher is None:
            raise ValueError("loss.kind=distill: this micro-batch has no teacher probabilities")
        w, t = self.teacher_weight, self.temperature
        return (1.0 - w) * ce + (w * t * t) * distillation_kl(logits, teacher, t)

    def describe(self) -> str:
        if not self.needs_teacher:
            return "cross entropy on the labels"
        return (f"distillation: {1 - self.teacher_weight:g} x CE(labels) + {self.teacher_weight:g} x "
                f"T^2 KL(teacher || student), T={self.temperature:g}")


def build_loss(lcfg: Mapping[str, Any]) -> RowLoss:
    return RowLoss(lcfg["kind"], lcfg["teacher_weight"], lcfg["temperature"])
