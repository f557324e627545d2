"""NF4 storage for frozen base weights (QLoRA), from torchao's ``NF4Tensor``.

torchao's tensor is the one torchtune's QLoRA shards with FSDP2: it implements FSDP2's
all-gather extension (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``: the 4-bit codes and
the double-quantised scales travel, not bf16) and the split/view ops ``fully_shard`` uses to
cut a weight into row shards. On a 2-D (HSDP) mesh the shard dimension's group is the one it
all-gathers over, so HSDP works too (tested on 4 processes). See docs/adapters.md.

torchao is imported only when a QLoRA model is built: full fine-tuning and LoRA never need it.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError

BLOCK_SIZE = 64  # weights per absmax scale (QLoRA's block)
SCALER_BLOCK_SIZE = 256  # scales per double-quantisation block


def _torchao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels' load notices
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as mod  # torchao >= 0.16
        except ImportError:
            from torchao.dtypes import nf4tensor as mod  # older torchao
    except ImportError as e:
        raise ConfigError("model.adapter=qlora needs torchao (its NF4 tensor): pip install torchao "
                          f"(import failed: {e})") from None
    return mod


def to_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE,
           scaler_block_size: int = SCALER_BLOCK_SIZE) -> torch.Tensor:
    """``weight`` (2-D, contiguous) as an NF4Tensor on its device: 4-bit codes, one absmax scale
    per ``block_size`` weights, the scales themselves int8 in blocks of ``scaler_block_size``
    around their mean. Its dtype is the dtype it dequantises to."""
    if weight.numel() % (block_size * scaler_block_size):
        raise ConfigError(f"model.adapter=qlora: a weight of shape {tuple(weight.shape)} is not a multiple of "
                          f"{block_size} x {scaler_block_size} values (NF4 block x scale block)")
    return _torchao().to_nf4(weight.detach().contiguous(), block_size, scaler_block_size)


def is_nf4(t: torch.Tensor) -> bool:
    local = t.to_local() if hasattr(t, "to_local") else t
    return type(local).__name__ == "NF4Tensor"


def linear_nf4(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ dequant(weight).T in x's dtype; no gradient for the weight (it is frozen)."""
    return _torchao().linear_nf4(x, weight)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The values an NF4 weight computes with (its full tensor, in its dtype)."""
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
    return weight.get_original_weight()


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes this rank really holds for ``t`` (an NF4Tensor reports its dequantised dtype's
    element size; its storage is the codes, the int8 scales and a few scalars)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    if type(local).__name__ == "NF4Tensor":
        return sum(x.numel() * x.element_size() for x in
                   (local.quantized_data, local.quantized_scalers, local.quantization_factor, local.scaler_mean))
    return local.numel() * local.element_size()
