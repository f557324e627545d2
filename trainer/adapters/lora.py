"""LoRA on the decoder's linear layers, over a plain or an NF4 (QLoRA) frozen base.

``LoRALinear`` replaces an ``nn.Linear`` in place and keeps its ``weight`` under the same name,
so the base loads, shards and exports exactly as before; the adapter adds ``lora_A.weight``
[r, in] and ``lora_B.weight`` [out, r] (PEFT's names, minus PEFT's adapter-name level):

    y = x W^T + scaling * B(A(dropout(x))),   scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

A is drawn like PEFT's default (kaiming-uniform, a = sqrt(5)) from a generator seeded by the run
seed and the module's name, so every rank, world size and device draws the same A; B starts at
zero, so the adapted model computes exactly the base model at step 0.

What trains: every lora_A / lora_B and the classification head (in full). Embeddings, norms and
the base linear weights are frozen (``requires_grad=False``): no gradient, no optimizer state,
not in checkpoints.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nf4

# PEFT's names for Gemma 2's decoder linears (they are also ours).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = ("none", "lora", "qlora")


@dataclass(frozen=True)
class LoRASpec:
    """What an adapter is: enough to rebuild it (checkpoints, PEFT's adapter_config.json)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    use_rslora: bool = False
    quantize_base: bool = False  # QLoRA: the targeted base weights are NF4
    nf4_block_size: int = nf4.BLOCK_SIZE
    nf4_scaler_block_size: int = nf4.SCALER_BLOCK_SIZE

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_config(cls, acfg) -> "LoRASpec | None":
        """None for ``model.adapter.name=none`` (full fine-tuning)."""
        if acfg.name == "none":
            return None
        rank = int(acfg.rank)
        return cls(rank=rank, alpha=float(acfg.alpha if acfg.alpha is not None else 2 * rank),
                   dropout=float(acfg.dropout), target_modules=tuple(acfg.target_modules),
                   use_rslora=bool(acfg.use_rslora), quantize_base=acfg.name == "qlora",
                   nf4_block_size=int(acfg.nf4_block_size), nf4_scaler_block_size=int(acfg.nf4_scaler_block_size))


class LoRALinear(nn.Module):
    """A frozen linear (plain or NF4 weight, no bias: Gemma 2's linears have none) plus a
    trainable low-rank update."""

    def __init__(self, base: nn.Linear, spec: LoRASpec):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linears (Gemma 2's decoder has no biases)")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = spec.scaling
        self.weight = base.weight
        self.weight.requires_grad_(False)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, spec.rank, bias=False, **factory)
        self.lora_B = nn.Linear(spec.rank, self.out_features, bias=False, **factory)

    @torch.no_grad()
    def reset_lora(self, seed: int, name: str) -> None:
        """A: kaiming-uniform(a=sqrt(5)) from a generator keyed by (seed, name); B: zeros."""
        key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(key))
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if nf4.is_nf4(self.weight):
            return nf4.linear_nf4(x, self.weight)
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A, in fp32 then cast to the base dtype (an NF4 base: its dequantised
        values, which are what the adapter trained against)."""
        w = nf4.dequantize(self.weight) if nf4.is_nf4(self.weight) else self.weight
        return (w.float() + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())).to(w.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.lora_A.out_features}, "
                f"scaling={self.scaling:g}, nf4={nf4.is_nf4(self.weight)}")


def _targets(model: nn.Module, spec: LoRASpec) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent module, attribute, linear) of every targeted decoder linear."""
    found = []
    for name, module in model.layers.named_modules(prefix="layers"):
        for attr, child in module.named_children():
            if attr in spec.target_modules and isinstance(child, nn.Linear):
                found.append((f"{name}.{attr}", module, attr, child))
    return found


def apply_lora(model: nn.Module, spec: LoRASpec, *, seed: int, device: torch.device | str | None = None
               ) -> nn.Module:
    """Freeze everything but the head, wrap the targeted linears, quantise their base weights
    for QLoRA (on ``device``: quantising is a device pass over each weight; the full-precision
    copy is freed as it goes). A model on the meta device gets meta adapters (filled later)."""
    unknown = sorted(set(spec.target_modules) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}: Gemma 2's decoder linears are {list(TARGETS)}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))
    meta = any(p.is_meta for p in model.parameters())
    for name, parent, attr, linear in _targets(model, spec):
        if spec.quantize_base and not meta:
            w = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
            linear.weight = nn.Parameter(nf4.to_nf4(w, spec.nf4_block_size, spec.nf4_scaler_block_size),
                                         requires_grad=False)
        lora = LoRALinear(linear, spec)
        if not meta:
            lora.reset_lora(seed, name)
        setattr(parent, attr, lora)
    if device is not None and not meta:
        _move(model, torch.device(device))
    return model


def _move(model: nn.Module, device: torch.device) -> None:
    """Every parameter and buffer to ``device``, one at a time (NF4 weights are already there:
    ``Module.to`` would try to swap their storage in place)."""
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and p.device != device and not nf4.is_nf4(p):
                module._parameters[key] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for key, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[key] = b.to(device)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place: the plain architecture again (the
    layout transformers and ``save_pretrained`` know). Trainability flags are reset."""
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                w = child.merged_weight()
                linear = nn.Linear(child.in_features, child.out_features, bias=False, device=w.device, dtype=w.dtype)
                linear.weight.copy_(w)
                setattr(module, attr, linear)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (an NF4 weight counts its logical elements)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}
