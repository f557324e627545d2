"""Rotary position embedding (Gemma 2 / transformers "rotate_half" convention)."""

from __future__ import annotations

import functools

import torch


def inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    # Computed on the fly in fp32 (no buffer): survives meta init, .to(bf16) and FSDP untouched.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] in fp32 for per-token positions [T]."""
    freqs = position_ids.float()[:, None] * inv_freq(head_dim, theta, position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, D]. Cast cos/sin to x's dtype like transformers does."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


@functools.cache
def _te_apply_rotary_pos_emb():
    try:  # TE >= 2.x moved rope into its own module
        from transformer_engine.pytorch.attention.rope import apply_rotary_pos_emb
    except ImportError:
        from transformer_engine.pytorch.attention import apply_rotary_pos_emb
    return apply_rotary_pos_emb


def te_available() -> bool:
    try:
        _te_apply_rotary_pos_emb()
        return True
    except Exception:  # ImportError, or a CUDA/driver error raised at import
        return False


def resolve_rope_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "te" if device.type == "cuda" and te_available() else "torch"
    if impl == "te":
        if device.type != "cuda":
            raise RuntimeError("rope_impl='te' needs CUDA tensors; use rope_impl='torch' on CPU")
        if not te_available():
            raise RuntimeError("rope_impl='te' requested but transformer_engine.pytorch is not importable")
    return impl


def apply_rope_te(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seq_len: int, head_dim: int, theta: float):
    """TE's fused RoPE in thd layout. Positions restart at 0 at every cu_seqlens boundary, which equals
    position_ids only when the collator restarts them per sequence (it does)."""
    freqs = torch.arange(max_seq_len, device=x.device, dtype=torch.float32)[:, None] * inv_freq(
        head_dim, theta, x.device
    )
    freqs = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [S, 1, 1, D]
    return _te_apply_rotary_pos_emb()(x, freqs, tensor_format="thd", fused=True, cu_seqlens=cu_seqlens)
