"""Helpers shared by the model tests and the benchmark (imports transformers lazily)."""

from __future__ import annotations

import torch

from .args import ModelArgs
from .gemma2 import Gemma2Classifier
from .hf_io import parameter_name_map


def tiny_args(**overrides) -> ModelArgs:
    base = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, initializer_range=0.2, head="linear", attn_impl="reference", rope_impl="torch",
    )
    base.update(overrides)
    return ModelArgs(**base)


def randomize_norms(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Norm weights init to 0 (scale 1); perturb them so parity tests exercise the (1 + w) path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def to_transformers(model: Gemma2Classifier):
    """A transformers Gemma2ForSequenceClassification (eager attention) with our weights (linear head)."""
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    cfg = model.args.to_hf_config()
    cfg.pop("architectures")
    config = Gemma2Config(**cfg)
    config._attn_implementation = "eager"
    hf = Gemma2ForSequenceClassification(config).to(model.embed_tokens.weight.dtype)
    names = parameter_name_map(model)
    missing, unexpected = hf.load_state_dict({names[k]: v for k, v in model.state_dict().items()}, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return hf.train(model.training)


def pack(seqs: list[torch.Tensor]) -> dict:
    """Collator-style packed row: input_ids/position_ids [1, T], cu_seqlens int32 [B+1], max_seq_len."""
    lens = [len(s) for s in seqs]
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return {
        "input_ids": torch.cat(seqs)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lens])[None],
        "cu_seqlens": cu,
        "max_seq_len": max(lens),
    }
