"""Varlen (packed) causal attention with Gemma 2 logit softcap and sliding window.

All backends take the packed "thd" layout: q [Tq, H, D], k/v [T, Hkv, D], sequences delimited by
cu_seqlens (int32 [B+1]). With `q_rows` given (last-layer pooling), q holds one query per sequence:
the sequence's last token, whose global row index is q_rows[b] = cu_seqlens[b+1] - 1.

Window semantics (transformers' Gemma 2 `sliding_window_overlay`): query i sees key j iff
j <= i and i - j < window, i.e. the window counts the query itself (window keys at most).
flash-attn's window_size=(left, right) allows i - left <= j <= i + right, so left = window - 1.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

ATTN_BACKENDS = ("reference", "flex", "flash_attn")


@functools.cache
def _flash_attn_varlen_func():
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def flash_attn_available() -> bool:
    try:
        _flash_attn_varlen_func()
        return True
    except Exception:  # ImportError, or a CUDA/ABI error raised at import
        return False


def resolve_attn_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map a requested backend to a runnable one; raise a clear error if it cannot run here."""
    cuda = device.type == "cuda"
    if impl == "auto":
        if cuda and dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
            return "flash_attn"
        return "flex" if cuda else "reference"
    if impl == "sdpa":
        # torch SDPA has no logit softcap, so "sdpa" is the math reference path under another name.
        return "reference"
    if impl == "flash_attn":
        if not cuda:
            raise RuntimeError("attn_impl='flash_attn' needs CUDA tensors; use 'reference' (or 'flex' for inference) on CPU")
        if not flash_attn_available():
            raise RuntimeError("attn_impl='flash_attn' requested but flash_attn is not importable (pip install 'flash-attn>=2.6')")
        if dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"attn_impl='flash_attn' needs fp16/bf16 activations, got {dtype}")
    if impl not in ATTN_BACKENDS:
        raise ValueError(f"unknown attn_impl {impl!r}")
    return impl


@dataclass(frozen=True)
class SequenceMasks:
    """The reference backend's mask for one window kind: host sequence bounds and, per sequence,
    a bool [Lq, n] (True = masked) or None where nothing is masked."""

    bounds: tuple[int, ...]
    masked: tuple[torch.Tensor | None, ...]
    pooled: bool  # one query per sequence (its last token) instead of every token


def build_attention_mask(impl: str, cu_seqlens: torch.Tensor, num_tokens: int, window: int | None,
                         q_rows: torch.Tensor | None = None, bounds: tuple[int, ...] | None = None,
                         cache: dict | None = None):
    """The mask one backend needs for one (window, pooled) kind of layer, built once per forward
    ahead of the layers, outside any compiled region (compiled layers take it as an input, and a
    checkpointed layer's recompute sees exactly what its forward saw).

    reference -> SequenceMasks (needs the host ``bounds``: cu_seqlens as a tuple of ints);
    flex -> a flex ``BlockMask``; flash_attn -> None (cu_seqlens is its whole layout)."""
    if impl == "reference":
        if bounds is None:
            bounds = tuple(cu_seqlens.tolist())
        lq = 1 if q_rows is not None else None
        masked = tuple(_masked_positions(e - s, lq or e - s, window, cu_seqlens.device, cache)
                       for s, e in zip(bounds[:-1], bounds[1:]))
        return SequenceMasks(bounds, masked, q_rows is not None)
    if impl == "flex":
        q_len = q_rows.shape[0] if q_rows is not None else num_tokens
        return _flex_block_mask(cu_seqlens, q_len, num_tokens, window, q_rows, cu_seqlens.device)
    if impl == "flash_attn":
        return None
    raise ValueError(f"unknown attention backend {impl!r}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    softcap: float | None,
    window: int | None,
    impl: str,
    q_rows: torch.Tensor | None = None,
    mask=None,
) -> torch.Tensor:
    """Dispatch to a backend (impl already resolved). Returns [Tq, H, D].

    ``mask`` is ``build_attention_mask``'s result for this layer's kind; built here when omitted
    (a convenience for direct calls: the model always passes it)."""
    if mask is None and impl != "flash_attn":
        mask = build_attention_mask(impl, cu_seqlens, k.shape[0], window, q_rows)
    if impl == "reference":
        return reference_attention(q, k, v, mask, scale, softcap)
    if impl == "flex":
        return flex_varlen_attention(q, k, v, mask, scale, softcap)
    if impl == "flash_attn":
        return flash_varlen_attention(q, k, v, cu_seqlens, max_seq_len, scale, softcap, window, q_rows)
    raise ValueError(f"unknown attention backend {impl!r}")


# A Python loop over sequences with host bounds: under torch.compile it would unroll and
# specialise on every packing, so it stays eager (one graph break per layer; the projections,
# norms and MLP around it still compile). The reference path is the CPU/parity path.
@torch.compiler.disable
def reference_attention(q, k, v, mask: SequenceMasks, scale, softcap):
    """Math attention, one sequence at a time: never materialises cross-sequence scores.
    Scores/softmax in fp32. GQA by grouping query heads per kv head (no repeat_kv copy).
    q holds every token, or (pooled) one query per sequence: its last token."""
    hkv, d = k.shape[1], k.shape[2]
    g = q.shape[1] // hkv
    # fold the score scale (and 1/softcap) into q: two fewer passes over the [L, L] scores
    q = q * (scale / softcap if softcap else scale)
    bounds = mask.bounds
    outs = []
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        n = e - s
        qs = q[b : b + 1] if mask.pooled else q[s:e]  # [Lq, H, D]
        lq = qs.shape[0]
        qs = qs.transpose(0, 1).reshape(hkv, g * lq, d)
        ks, vs = k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)  # [Hkv, n, D]
        scores = (qs @ ks.transpose(1, 2)).float()  # [Hkv, g*Lq, n]
        if softcap:
            scores = torch.tanh(scores) * softcap
        masked = mask.masked[b]
        if masked is not None:
            scores = scores.view(hkv, g, lq, n).masked_fill(masked, float("-inf")).view(hkv, g * lq, n)
        probs = torch.softmax(scores, dim=-1).to(vs.dtype)
        outs.append((probs @ vs).view(hkv * g, lq, d).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _masked_positions(n, lq, window, device, cache=None):
    """Bool [Lq, n], True where query (the last Lq positions of the sequence) must not see the key.
    Shared across sequences and window kinds of one forward through ``cache``."""
    if lq == 1 and (window is None or window >= n):
        return None  # the last token sees the whole sequence
    key = (n, lq, window)
    if cache is not None and key in cache:
        return cache[key]
    qpos = torch.arange(n - lq, n, device=device)[:, None]
    kpos = torch.arange(n, device=device)[None, :]
    masked = kpos > qpos
    if window is not None:
        masked |= qpos - kpos >= window
    if cache is not None:
        cache[key] = masked
    return masked


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex_block_mask(cu_seqlens, q_len, kv_len, window, q_rows, device):
    from torch.nn.attention.flex_attention import create_block_mask

    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # output_size: the total is known on the host, so no device sync to size the result
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=kv_len)
    q_pos = q_rows if q_rows is not None else torch.arange(kv_len, device=device)

    def mask_mod(b, h, qi, kvi):
        qp = q_pos[qi]
        m = (doc[qp] == doc[kvi]) & (kvi <= qp)
        if window is not None:
            m = m & (qp - kvi < window)
        return m

    return create_block_mask(mask_mod, None, None, q_len, kv_len, device=device, _compile=device.type == "cuda")


# CPU flex is the inference path: eager (compiling costs ~14 s and recompiles per shape), also
# inside a compiled layer, where inductor's CPU flex lowering fails on dynamic shapes (torch 2.13).
@torch.compiler.disable
def _eager_cpu_flex(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def flex_varlen_attention(q, k, v, block_mask, scale, softcap):
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "attn_impl='flex' has no backward on CPU (FlexAttention CPU is forward-only); "
            "use attn_impl='reference' for CPU training, or run under torch.no_grad()"
        )

    def score_mod(score, b, h, qi, kvi):  # softcap: a constant (see parallel.apply_compile)
        return softcap * torch.tanh(score / softcap)

    if q.is_cuda:
        # uncompiled flex materialises the scores (a slow reference on GPU); inside a compiled
        # layer dynamo traces flex_attention itself
        fn = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    else:
        fn = _eager_cpu_flex
    out = fn(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        score_mod=score_mod if softcap else None,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


def flash_varlen_attention(q, k, v, cu_seqlens, max_seq_len, scale, softcap, window, q_rows=None):
    fn = _flash_attn_varlen_func()
    cu_seqlens = cu_seqlens.to(torch.int32)
    if q_rows is not None:
        # One query per sequence; flash aligns causal/window masks bottom-right when Lq < Lk,
        # so that query is treated as the sequence's last position.
        cu_q = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
        max_q = 1
    else:
        cu_q, max_q = cu_seqlens, max_seq_len
    return fn(
        q, k, v, cu_q, cu_seqlens, max_q, max_seq_len,
        softmax_scale=scale,
        causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
        softcap=softcap or 0.0,
    )
