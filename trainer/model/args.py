"""Model hyper-parameters and the round trip to/from a transformers Gemma2 config."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

ATTN_IMPLS = ("auto", "reference", "sdpa", "flex", "flash_attn")
ROPE_IMPLS = ("auto", "torch", "te")
HEADS = ("mlp", "linear")
# Implementation choices: how the model runs, not what it computes; never read from a checkpoint.
RUNTIME_FIELDS = ("attn_impl", "rope_impl", "last_layer_pooled_only")


@dataclass
class ModelArgs:
    # Defaults are transformers' Gemma2Config defaults (gemma-2-2b figures).
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0  # LM-head only: unused here, kept for the round trip
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    # classifier
    num_labels: int = 3
    head: str = "mlp"
    head_dropout: float = 0.1
    # implementation choices (RUNTIME_FIELDS: not part of the architecture)
    attn_impl: str = "auto"
    rope_impl: str = "auto"
    last_layer_pooled_only: bool = True

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.rope_impl not in ROPE_IMPLS:
            raise ValueError(f"rope_impl must be one of {ROPE_IMPLS}, got {self.rope_impl!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (RoPE rotates halves)")

    def layer_window(self, layer_idx: int) -> int | None:
        """Sliding window of a layer (None = global). Gemma 2: even layers are local."""
        return self.sliding_window if layer_idx % 2 == 0 else None

    @classmethod
    def from_hf_config(cls, config: dict | str | Path | Any, **overrides) -> "ModelArgs":
        """Build from a transformers Gemma2 config: a dict, a config object, a directory or a config.json path."""
        if isinstance(config, (str, Path)):
            p = Path(config)
            p = p / "config.json" if p.is_dir() else p
            config = json.loads(p.read_text())
        elif not isinstance(config, dict):
            config = config.to_dict()
        model_type = config.get("model_type")
        if model_type != "gemma2":
            raise ValueError(f"expected a Gemma 2 config (model_type 'gemma2'), got model_type {model_type!r}")
        cfg = dict(config)
        # transformers >= 5 nests rope_theta under rope_parameters; 4.x keeps it top level.
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only default RoPE is supported, got rope_type {rope['rope_type']!r}")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"only gelu_pytorch_tanh is supported, got {act!r}")
        if cfg.get("attention_bias"):
            raise ValueError("attention_bias=True is not supported (Gemma 2 has none)")
        if "id2label" in cfg and "num_labels" not in overrides:
            cfg["num_labels"] = len(cfg["id2label"])
        if "arena_head" in cfg:  # written by our save_pretrained
            cfg["head"] = cfg["arena_head"]
            cfg["head_dropout"] = cfg.get("arena_head_dropout", cls.head_dropout)
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in names}
        for k in RUNTIME_FIELDS:
            kwargs.pop(k, None)  # runtime choices never come from a checkpoint
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown ModelArgs fields: {sorted(unknown)}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self, dtype: str = "float32", labels: Sequence[str] | None = None) -> dict:
        """A config.json dict that transformers' Gemma2ForSequenceClassification loads.
        ``labels``: the task's output column per class (id2label); LABEL_i when not given."""
        labels = list(labels) if labels is not None else [f"LABEL_{i}" for i in range(self.num_labels)]
        if len(labels) != self.num_labels:
            raise ValueError(f"{len(labels)} labels {labels} for a model with {self.num_labels} outputs")
        return {
            "architectures": ["Gemma2ForSequenceClassification"],
            "model_type": "gemma2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window,
            "layer_types": [
                "sliding_attention" if self.layer_window(i) is not None else "full_attention"
                for i in range(self.num_hidden_layers)
            ],
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            # both spellings: transformers 4.x reads rope_theta, 5.x rope_parameters
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "use_cache": False,
            "id2label": {str(i): l for i, l in enumerate(labels)},
            "label2id": {l: i for i, l in enumerate(labels)},
            "dtype": dtype,
            "torch_dtype": dtype,
            # ours: which classifier head the checkpoint holds (transformers ignores these)
            "arena_head": self.head,
            "arena_head_dropout": self.head_dropout,
        }

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def architecture(self) -> dict[str, Any]:
        """Every field that decides what the model computes (all but RUNTIME_FIELDS)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUNTIME_FIELDS}
