"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

What ``peft.PeftModel.from_pretrained(Gemma2ForSequenceClassification.from_pretrained(base), dir)``
loads: LoRA ``task_type`` SEQ_CLS over transformers' Gemma 2 names, the classification head as a
module to save (``score``: transformers' linear head, so the mlp head cannot go this way). Key
names are PEFT's, with its adapter name removed as PEFT does when it saves:

    ours                                    PEFT
    layers.3.self_attn.q_proj.lora_A.weight base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
    head.weight                             base_model.model.score.weight

The JSON is written here, not through peft (peft is not a dependency of training or export);
tests load every export with peft and transformers and compare logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .lora import LoRASpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
HEAD_MODULE = "score"


def peft_key(name: str) -> str:
    if name.startswith("head."):
        return PREFIX + HEAD_MODULE + name.removeprefix("head")
    return PREFIX + "model." + name


def our_key(key: str) -> str:
    name = key.removeprefix(PREFIX)
    if name.startswith(HEAD_MODULE + "."):
        return "head" + name.removeprefix(HEAD_MODULE)
    return name.removeprefix("model.")


def adapter_config(spec: LoRASpec, base: str | None) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
        "target_modules": sorted(spec.target_modules), "modules_to_save": [HEAD_MODULE], "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False,
    }


def save_adapter(model: nn.Module, spec: LoRASpec, out: Path, base: str | None) -> None:
    """The trainable tensors of a LoRA model (adapters and the linear head) in PEFT's layout."""
    if model.args.head != "linear":
        raise CheckpointError(f"a PEFT export needs model.head=linear (transformers' Gemma2ForSequenceClassification "
                              f"has a linear `score`; this run trained an {model.args.head} head): export with "
                              "merge=true instead (the merged layout keeps the mlp head)")
    tensors = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
            tensors[peft_key(name)] = t.cpu().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, base), indent=2) + "\n")


def read_adapter_config(path: Path) -> tuple[LoRASpec, str | None]:
    """The LoRA spec and base of a PEFT adapter directory (ours or peft's)."""
    try:
        cfg = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: cannot read a PEFT adapter config ({e})") from e
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("bias", "none") != "none":
        raise CheckpointError(f"{path / CONFIG_FILE}: only plain LoRA adapters (peft_type LORA, no DoRA, bias none) "
                              f"are supported, got peft_type={cfg.get('peft_type')!r}")
    targets = cfg["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    spec = LoRASpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
                    target_modules=tuple(targets), use_rslora=bool(cfg.get("use_rslora", False)))
    return spec, cfg.get("base_model_name_or_path")


@torch.no_grad()
def load_adapter_weights(model: nn.Module, path: Path) -> None:
    """Fill a LoRA model's adapters and head from a PEFT adapter directory: every trainable
    tensor present with its shape, nothing else in the file."""
    path = Path(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with safe_open(path / WEIGHTS_FILE, framework="pt") as f:
        keys = {our_key(k): k for k in f.keys()}
        missing = sorted(params.keys() - keys.keys())
        unexpected = sorted(keys.keys() - params.keys())
        if missing or unexpected:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: does not fit this base: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        for name, p in params.items():
            t = f.get_tensor(keys[name])
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{path / WEIGHTS_FILE}: {keys[name]} has shape {tuple(t.shape)}, the model "
                                      f"expects {tuple(p.shape)}")
            p.copy_(t)
