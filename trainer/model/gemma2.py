"""Packed-sequence (varlen) Gemma 2 classifier.

Activations are kept flat as [T, hidden] (T = real tokens of one packed row, no padding).
Every decoder layer is self-contained (FSDP2 shards each with fully_shard; activation
checkpointing and compile wrap each, see trainer/parallel.py) and takes only tensors and plain
values: hidden, rope cos/sin, cu_seqlens, max_seq_len, optional pooled rows.

Attention and RoPE backends are chosen once (``select_kernels``, called by the builder with the
device and compute dtype the model will run with), never per forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .args import ModelArgs
from .attention import build_attention_mask, resolve_attn_impl, varlen_attention
from .rope import apply_rope, apply_rope_te, resolve_rope_impl, rope_cos_sin


class RMSNorm(nn.Module):
    """Gemma RMSNorm: fp32 math, scale by (1 + weight), cast back at the end."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)

    def reset_parameters(self):
        nn.init.zeros_(self.weight)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


@dataclass
class Kernels:
    """The resolved backends, one object shared by every attention module of a model."""

    attn: str | None = None  # reference | flex | flash_attn
    rope: str | None = None  # torch | te


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, kernels: Kernels):
        super().__init__()
        self.args = args
        self.kernels = kernels
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.layer_window(layer_idx)
        self.scale = args.query_pre_attn_scalar**-0.5
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)

    def forward(self, x, cos, sin, cu_seqlens, max_seq_len, attn_mask=None, q_rows=None):
        t = x.shape[0]
        xq = x if q_rows is None else x[q_rows]  # pooled: queries only for the last tokens
        q = self.q_proj(xq).view(xq.shape[0], self.n_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)

        if self.kernels.rope == "te":
            theta = self.args.rope_theta
            k = apply_rope_te(k, cu_seqlens, max_seq_len, self.head_dim, theta)
            if q_rows is None:
                q = apply_rope_te(q, cu_seqlens, max_seq_len, self.head_dim, theta)
            else:  # single-token "sequences" would all get position 0 in TE's thd mode
                q = apply_rope(q, cos[q_rows], sin[q_rows])
        else:
            q = apply_rope(q, cos if q_rows is None else cos[q_rows], sin if q_rows is None else sin[q_rows])
            k = apply_rope(k, cos, sin)

        out = varlen_attention(
            q, k, v,
            cu_seqlens=cu_seqlens, max_seq_len=max_seq_len, scale=self.scale,
            softcap=self.args.attn_logit_softcapping, window=self.window,
            impl=self.kernels.attn, q_rows=q_rows, mask=attn_mask,
        )
        return self.o_proj(out.reshape(xq.shape[0], -1))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, kernels: Kernels | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Attention(args, layer_idx, kernels or Kernels())
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        eps = args.rms_norm_eps
        self.input_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps)

    def forward(self, h, cos, sin, cu_seqlens, max_seq_len: int, attn_mask=None, q_rows=None):
        """h [T, hidden] -> [T, hidden], or [B, hidden] (rows q_rows only) when q_rows is given.
        attn_mask: ``build_attention_mask``'s result for this layer's (window, pooled) kind."""
        attn = self.self_attn(self.input_layernorm(h), cos, sin, cu_seqlens, max_seq_len, attn_mask, q_rows)
        h = (h if q_rows is None else h[q_rows]) + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class MLPHead(nn.Module):
    """Dropout -> Linear(h, h/2) -> Dropout -> GELU -> Linear(h/2, labels)."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(hidden, hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, num_labels)

    def forward(self, x):
        return self.fc2(F.gelu(self.drop(self.fc1(self.drop(x)))))


class Gemma2Classifier(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.kernels = Kernels()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(args, i, self.kernels) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if args.head == "mlp":
            self.head = MLPHead(args.hidden_size, args.num_labels, args.head_dropout)
        else:  # saved as `score.weight`, transformers' Gemma2ForSequenceClassification key
            self.head = nn.Linear(args.hidden_size, args.num_labels, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Fresh init (also after `to_empty` from the meta device)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.args.initializer_range)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()
        if self.embed_tokens.padding_idx is not None:
            self.embed_tokens.weight[self.embed_tokens.padding_idx].zero_()

    @torch.no_grad()
    def init_head(self):
        std = self.args.initializer_range
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def select_kernels(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
                       ) -> tuple[str, str]:
        """Resolve ``args.attn_impl`` / ``args.rope_impl`` for the device and compute dtype the
        model runs with (default: those of its parameters); raises if a requested backend
        cannot run there. The builder calls it once; a bare model resolves at its first forward."""
        weight = self.embed_tokens.weight
        device = torch.device(device) if device is not None else weight.device
        dtype = dtype or weight.dtype
        self.kernels.attn = resolve_attn_impl(self.args.attn_impl, device, dtype)
        self.kernels.rope = resolve_rope_impl(self.args.rope_impl, device)
        return self.kernels.attn, self.kernels.rope

    def forward(
        self,
        *,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seq_len: int | torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Packed row -> fp32 logits [B, num_labels] (and pooled hidden [B, hidden] if return_hidden).

        Takes exactly the collator's ``PackedBatch.inputs``; any other keyword is refused. With
        ``max_seq_len`` given (the collator does) and the flex or flash_attn backend, nothing here
        waits on the device: the masks are built once, ahead of the layers, from device tensors
        (the reference backend reads cu_seqlens to the host once per forward)."""
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(f"expected one packed row [1, T] or [T], got input_ids {tuple(input_ids.shape)}")
        input_ids, position_ids = input_ids.reshape(-1), position_ids.reshape(-1)
        num_tokens = input_ids.numel()
        if cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens must be 1-D [B+1], got shape {tuple(cu_seqlens.shape)}")
        if self.kernels.attn is None:
            self.select_kernels(input_ids.device)
        bounds = None  # host copy of cu_seqlens: free on CPU; on a GPU only the reference path takes it
        if cu_seqlens.device.type == "cpu" or self.kernels.attn == "reference":
            bounds = tuple(cu_seqlens.tolist())
            if bounds[-1] != num_tokens:
                raise ValueError(f"cu_seqlens must be [B+1] ending at T={num_tokens}, got {list(bounds)}")
        if max_seq_len is None:
            max_seq_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        max_seq_len = int(max_seq_len)
        last = (cu_seqlens[1:] - 1).long()

        h = self.embed_tokens(input_ids)
        # normaliser cast to the model dtype first, as in transformers (sqrt(3584) rounds in bf16);
        # a 0-d host tensor rides along as a kernel argument (no host-to-device copy)
        h = h * torch.tensor(math.sqrt(self.args.hidden_size), dtype=h.dtype)
        cos, sin = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta)

        n = len(self.layers)
        pooled_last = self.args.last_layer_pooled_only and n > 0
        masks, cache = {}, {}
        for i, layer in enumerate(self.layers):
            kind = (layer.self_attn.window, pooled_last and i == n - 1)
            if kind not in masks:
                masks[kind] = build_attention_mask(self.kernels.attn, cu_seqlens, num_tokens, kind[0],
                                                   last if kind[1] else None, bounds, cache)
        for i, layer in enumerate(self.layers):
            pooled = pooled_last and i == n - 1
            h = layer(h, cos, sin, cu_seqlens, max_seq_len, masks[(layer.self_attn.window, pooled)],
                      last if pooled else None)
        if not pooled_last:
            h = h[last]
        pooled = self.norm(h)  # RMSNorm is per row: norm(h)[last] == norm(h[last])
        logits = self.head(pooled).float()
        return (logits, pooled) if return_hidden else logits


def count_params(model: nn.Module, exclude_embeddings: bool = True) -> int:
    """Parameter count; without the token embedding by default (the N of 6*N*tokens MFU)."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return n
