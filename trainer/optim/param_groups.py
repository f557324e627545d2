"""Split parameters into weight-decay and no-decay groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["build_param_groups", "is_no_decay"]


def is_no_decay(
    name: str, param: torch.Tensor, embedding_names: set[str], no_decay_embeddings: bool = True
) -> bool:
    """True for norm weights, biases (any 1-D tensor) and, if asked, embeddings.

    Decaying gains/biases has no regularising value, and for Gemma's ``(1 + w)`` RMSNorm it
    would just drag the scale towards 1. ``param.ndim`` of a DTensor is the global rank, so the
    1-D rule holds for FSDP2-sharded parameters too.
    """
    lname = name.lower()
    if param.ndim <= 1 or "norm" in lname or lname.endswith("bias"):
        return True
    # Embeddings: nn.Embedding parameters, or raw parameters named like one.
    return no_decay_embeddings and (name in embedding_names or "embed" in lname)


def build_param_groups(
    model: nn.Module, weight_decay: float, no_decay_embeddings: bool = True
) -> list[dict[str, Any]]:
    """Return ``[decay_group, no_decay_group]`` over ``model.named_parameters()``.

    Works on FSDP2 (``fully_shard``) models: it keeps module classes (subclassed) and parameter
    names. Frozen parameters are skipped; an empty group is kept (torch optimizers accept it)
    so the group order -- and hence the optimizer state_dict layout -- is fixed.
    """
    embedding_names = {
        f"{mname}.{pname}" if mname else pname
        for mname, module in model.named_modules()
        if isinstance(module, nn.Embedding)
        for pname, _ in module.named_parameters(recurse=False)
    }
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_no_decay(name, param, embedding_names, no_decay_embeddings):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
