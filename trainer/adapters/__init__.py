"""Parameter-efficient fine-tuning: LoRA / QLoRA adapters (``lora``), NF4 storage of the
frozen base (``nf4``, torchao), the base fingerprint adapter checkpoints carry
(``fingerprint``) and PEFT's on-disk format (``peft_format``). See docs/adapters.md."""

from .fingerprint import base_record
from .lora import ADAPTERS, TARGETS, LoRALinear, LoRASpec, apply_lora, merge_lora, trainable_summary

__all__ = ["ADAPTERS", "TARGETS", "LoRALinear", "LoRASpec", "apply_lora", "base_record",
           "merge_lora", "trainable_summary"]
