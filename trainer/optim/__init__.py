"""Optimizer, parameter groups and LR schedule for the trainer.

``build_optimizer(model, cfg)`` reads ``cfg`` by attribute (a dataclass, SimpleNamespace or an
OmegaConf DictConfig all work); missing optional fields fall back to the defaults below.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ..dtypes import to_dtype
from .anyprecision_adamw import AnyPrecisionAdamW
from .param_groups import build_param_groups
from .schedule import build_scheduler, lr_lambda, resolve_warmup_steps

__all__ = [
    "AnyPrecisionAdamW",
    "build_optimizer",
    "build_param_groups",
    "build_scheduler",
    "build_scheduler_from_cfg",
    "lr_lambda",
    "resolve_warmup_steps",
]

def _get(cfg: Any, name: str, default: Any) -> Any:
    # getattr with a default also covers OmegaConf struct configs (ConfigAttributeError is an
    # AttributeError) and a field explicitly set to None.
    value = getattr(cfg, name, default)
    return default if value is None else value


def build_optimizer(model: nn.Module, cfg: Any) -> Optimizer:
    """Build the optimizer named by ``cfg.name`` over decay/no-decay parameter groups.

    Fields: name ("anyprecision_adamw" | "adamw"), lr, betas, eps, weight_decay,
    no_decay_embeddings, and for anyprecision_adamw: use_kahan_summation, momentum_dtype,
    variance_dtype, compensation_dtype (strings such as "float32" / "bfloat16").
    Call it after ``fully_shard`` so the optimizer holds the sharded (DTensor) parameters.
    """
    name = str(_get(cfg, "name", "anyprecision_adamw")).lower()
    lr = float(_get(cfg, "lr", 1e-3))
    betas = tuple(float(b) for b in _get(cfg, "betas", (0.9, 0.999)))
    eps = float(_get(cfg, "eps", 1e-8))
    weight_decay = float(_get(cfg, "weight_decay", 0.0))
    groups = build_param_groups(
        model, weight_decay, no_decay_embeddings=bool(_get(cfg, "no_decay_embeddings", True))
    )
    if name == "anyprecision_adamw":
        return AnyPrecisionAdamW(
            groups,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            use_kahan_summation=bool(_get(cfg, "use_kahan_summation", False)),
            momentum_dtype=to_dtype(_get(cfg, "momentum_dtype", "float32")),
            variance_dtype=to_dtype(_get(cfg, "variance_dtype", "float32")),
            compensation_buffer_dtype=to_dtype(_get(cfg, "compensation_dtype", "bfloat16")),
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected 'anyprecision_adamw' or 'adamw'")


def build_scheduler_from_cfg(optimizer: Optimizer, cfg: Any, total_steps: int) -> LambdaLR:
    """``build_scheduler`` reading warmup_steps / warmup_ratio / decay / min_lr_ratio from cfg."""
    warmup_steps = _get(cfg, "warmup_steps", None)
    return build_scheduler(
        optimizer,
        total_steps,
        warmup_ratio=float(_get(cfg, "warmup_ratio", 0.0)),
        warmup_steps=None if warmup_steps is None else int(warmup_steps),
        decay=str(_get(cfg, "decay", "linear")),
        min_lr_ratio=float(_get(cfg, "min_lr_ratio", 0.0)),
    )
