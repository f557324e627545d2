"""Model FLOPs accounting for MFU (model FLOPs utilisation).

Counted (one multiply-add = 2 FLOPs; training = forward + backward = 3x forward,
the usual "backward costs two forwards" convention, applied to every matmul):

* Decoder linears, per token per layer: q_proj ``h -> nh*hd``, k_proj and
  v_proj ``h -> nkv*hd`` (GQA), o_proj ``nh*hd -> h``, MLP gate/up
  ``h -> i`` and down ``i -> h``. FLOPs = 2 * tokens * in * out each.
* Attention, per layer: QK^T scores and P@V, each 2 * pairs * hd FLOPs per
  query head, where ``pairs`` is the exact number of (query, key) pairs the
  mask lets through on the *real* (unpadded, per-sequence) lengths:
  causal full attention ``L(L+1)/2``; sliding window ``w``:
  ``sum_i min(i+1, w)``. Window semantics are transformers' Gemma 2
  (``masking_utils.sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``
  and'ed with ``causal_mask_function``: ``kv_idx <= q_idx``), i.e. key ``j`` is
  attended by query ``i`` iff ``0 <= i - j < w`` (the query sees itself and the
  ``w - 1`` keys before it). Gemma 2 layer types: even layers
  (0, 2, ...) are ``sliding_attention``, odd layers ``full_attention``.
* Classification head on the pooled (last) token of every sequence:
  "linear" ``h -> num_labels``; "mlp" ``h -> h/2 -> num_labels``.
* ``last_layer_pooled_only``: in the last decoder layer only the pooled
  query rows are computed, so q_proj / o_proj / MLP run on one row per
  sequence and attention has one query per sequence (``min(L, w)`` pairs),
  while k_proj / v_proj still run on all tokens.

Not counted: embedding lookup, RMSNorms, RoPE, softmax, softcap, activations,
residual adds, biases (all O(tokens * h), negligible next to the matmuls) and
the optimizer step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

__all__ = [
    "PEAK_FLOPS",
    "attention_pairs",
    "layer_windows",
    "flops_per_step",
    "flops_breakdown",
    "flops_6n",
    "num_params_nonembedding",
    "peak_flops",
    "detect_peak_key",
    "mfu",
]

# Dense (no 2:4 sparsity) bf16 tensor-core peaks per device, FLOP/s.
PEAK_FLOPS: dict[str, float | None] = {
    "h100_sxm_bf16": 989e12,
    "h100_pcie_bf16": 756e12,
    "h200_bf16": 989e12,
    "a100_bf16": 312e12,
    # No meaningful vendor number: set ARENA_CPU_PEAK_FLOPS (FLOP/s per process)
    # or pass peak_flops("cpu", override=...). None -> MFU is not reported.
    "cpu": None,
}
CPU_PEAK_ENV = "ARENA_CPU_PEAK_FLOPS"
PEAK_ENV = "ARENA_PEAK_FLOPS"  # overrides any device kind


def attention_pairs(seq_len: int, window: int | None = None) -> int:
    """Number of (query, key) pairs a causal mask (optionally with a sliding
    window of ``window``: ``0 <= i - j < window``) allows for one sequence."""
    L = int(seq_len)
    if L <= 0:
        return 0
    if window is None or window >= L:
        return L * (L + 1) // 2
    w = int(window)
    if w <= 0:
        raise ValueError(f"sliding window must be positive, got {window}")
    # queries 0..w-1 see i+1 keys (1..w); queries w..L-1 see w keys each
    return w * (w + 1) // 2 + (L - w) * w


def layer_windows(model_args: Any) -> list[int | None]:
    """Per-layer sliding window (None = full attention), Gemma 2 layout.

    Uses ``model_args.layer_types`` if present (transformers config), else
    even layers sliding / odd layers full."""
    n = int(model_args.num_hidden_layers)
    w = getattr(model_args, "sliding_window", None)
    types = getattr(model_args, "layer_types", None)
    if types is not None and len(types) == n:
        return [w if t == "sliding_attention" else None for t in types]
    return [w if i % 2 == 0 else None for i in range(n)]


def _head_kind(model_args: Any) -> str:
    head = getattr(model_args, "head", None) or "linear"
    if head not in ("mlp", "linear"):
        raise ValueError(f"head must be 'mlp' or 'linear', got {head!r}")
    return head


def _head_macs_per_row(model_args: Any) -> int:
    h, c = int(model_args.hidden_size), int(model_args.num_labels)
    if _head_kind(model_args) == "mlp":
        return h * (h // 2) + (h // 2) * c
    return h * c


def flops_breakdown(
    model_args: Any,
    seq_lens: Iterable[int],
    *,
    training: bool = True,
    last_layer_pooled_only: bool = False,
) -> dict[str, int]:
    """FLOPs of one forward (+ backward when ``training``) over the sequences
    ``seq_lens``, split into "linear", "attention", "head" and "total"."""
    lens = [int(x) for x in seq_lens]
    if any(x < 0 for x in lens):
        raise ValueError(f"negative sequence length in {lens}")
    lens = [x for x in lens if x > 0]
    T, B = sum(lens), len(lens)
    h = int(model_args.hidden_size)
    i_mlp = int(model_args.intermediate_size)
    nh = int(model_args.num_attention_heads)
    nkv = int(model_args.num_key_value_heads)
    hd = int(model_args.head_dim)
    windows = layer_windows(model_args)
    n = len(windows)

    q_o_macs = 2 * h * nh * hd  # q_proj + o_proj, per query row
    kv_macs = 2 * h * nkv * hd  # k_proj + v_proj, per token
    mlp_macs = 3 * h * i_mlp  # gate, up, down, per row

    linear = attention = 0
    for layer, w in enumerate(windows):
        pooled = last_layer_pooled_only and layer == n - 1
        q_rows = B if pooled else T
        linear += 2 * (T * kv_macs + q_rows * (q_o_macs + mlp_macs))
        if pooled:
            pairs = sum(min(L, w) if w is not None else L for L in lens)
        else:
            pairs = sum(attention_pairs(L, w) for L in lens)
        attention += 2 * 2 * pairs * hd * nh  # QK^T and PV
    head = 2 * B * _head_macs_per_row(model_args)

    mult = 3 if training else 1
    out = {"linear": mult * linear, "attention": mult * attention, "head": mult * head}
    out["total"] = out["linear"] + out["attention"] + out["head"]
    return out


def flops_per_step(
    model_args: Any,
    seq_lens: Iterable[int],
    *,
    training: bool = True,
    last_layer_pooled_only: bool = False,
) -> int:
    """Model FLOPs for one step over ``seq_lens`` (all sequences of the step on
    this device, or globally: the count is linear in the sequence list)."""
    return flops_breakdown(
        model_args, seq_lens, training=training, last_layer_pooled_only=last_layer_pooled_only
    )["total"]


def num_params_nonembedding(model_args: Any) -> int:
    """Matmul weight count of the decoder + head (no embeddings, norms, biases)."""
    h = int(model_args.hidden_size)
    nh, nkv, hd = int(model_args.num_attention_heads), int(model_args.num_key_value_heads), int(model_args.head_dim)
    per_layer = 2 * h * nh * hd + 2 * h * nkv * hd + 3 * h * int(model_args.intermediate_size)
    return int(model_args.num_hidden_layers) * per_layer + _head_macs_per_row(model_args)


def flops_6n(model_args: Any, num_tokens: int, *, training: bool = True) -> int:
    """The "6N" estimate: 6 * N * tokens for training (2 * N * tokens forward),
    N = non-embedding matmul parameters. Ignores attention scores and treats
    the head as if it ran on every token; compare with :func:`flops_per_step`."""
    return (6 if training else 2) * num_params_nonembedding(model_args) * int(num_tokens)


def detect_peak_key(device: Any = None) -> str:
    """Best-effort PEAK_FLOPS key for the current (or given) torch device."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "cpu"
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev).lower()
        if "h200" in name:
            return "h200_bf16"
        if "h100" in name:
            return "h100_pcie_bf16" if "pcie" in name else "h100_sxm_bf16"
        if "a100" in name:
            return "a100_bf16"
        return "unknown"
    return "cpu"


def peak_flops(kind: str, override: float | None = None) -> float | None:
    """Peak FLOP/s per device for ``kind`` (a PEAK_FLOPS key).

    Precedence: ``override`` > env ``ARENA_PEAK_FLOPS`` > (cpu only) env
    ``ARENA_CPU_PEAK_FLOPS`` > table. Returns None when unknown (MFU then
    shouldn't be reported)."""
    if override is not None:
        return float(override)
    env = os.environ.get(PEAK_ENV)
    if env:
        return float(env)
    if kind == "cpu":
        env = os.environ.get(CPU_PEAK_ENV)
        if env:
            return float(env)
    return PEAK_FLOPS.get(kind)


def mfu(flops_per_second_per_device: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation = achieved model FLOP/s per device / peak FLOP/s.

    Achieved = flops_per_step(all sequences of the step) / step_time / world_size.
    Returns None if the peak is unknown or not positive."""
    if not peak_flops or peak_flops <= 0:
        return None
    return float(flops_per_second_per_device) / float(peak_flops)
