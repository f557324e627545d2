"""Packed-sequence Gemma 2 classifier: `from trainer.model import Gemma2Classifier, ModelArgs`."""

from .args import ModelArgs
from .attention import resolve_attn_impl, varlen_attention
from .gemma2 import DecoderLayer, Gemma2Classifier, count_params
from .hf_io import match_checkpoint_keys, parameter_name_map

__all__ = [
    "DecoderLayer",
    "Gemma2Classifier",
    "ModelArgs",
    "count_params",
    "match_checkpoint_keys",
    "parameter_name_map",
    "resolve_attn_impl",
    "varlen_attention",
]
