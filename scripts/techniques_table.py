"""Write docs/finetuning-techniques.md's planner table: gemma-2-2b / 9b / 27b x fine-tuning
technique, planned with trainer.planner at the recipe's batch (80 rows, 16,384-token budget,
max_length 4,096, activation checkpointing on) on the shared arena lengths.

    .venv/bin/python scripts/techniques_table.py > /tmp/table.md     (~5 minutes on 2 cores)
"""

from __future__ import annotations

import logging
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from trainer.config import compose  # noqa: E402
from trainer.planner import GB, plan  # noqa: E402

MODELS = ["gemma2_2b", "gemma2_9b", "gemma2_27b"]
TECHNIQUES = {
    "full, AnyPrecisionAdamW bf16 + Kahan": ["model.dtype=bfloat16", "parallel.param_dtype=bfloat16"],
    "full, AdamW, fp32 master weights": ["model.dtype=float32", "optim=adamw", "parallel.param_dtype=bfloat16"],
    "LoRA r16": ["model.dtype=bfloat16", "parallel.param_dtype=bfloat16", "model/adapter=lora",
                 "model.adapter.rank=16"],
    "LoRA r64": ["model.dtype=bfloat16", "parallel.param_dtype=bfloat16", "model/adapter=lora",
                 "model.adapter.rank=64"],
    "QLoRA r64 (NF4)": ["model.dtype=bfloat16", "parallel.param_dtype=bfloat16", "model/adapter=qlora",
                        "model.adapter.rank=64"],
}
WORLDS = [1, 2, 4, 8, 16, 32]


def main() -> None:
    logging.disable(logging.WARNING)
    print("| model | technique | trainable params | peak/GPU at 1 / 8 / 32 GPUs (GB) | fewest 24 GB GPUs | "
          "fewest 80 GB GPUs | FLOPs/token | step time at 8 GPUs |")
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for name, overrides in TECHNIQUES.items():
            plans = {w: plan(compose([f"model={model}", "model.activation_checkpointing=true", *overrides,
                                      f"plan.world_size={w}", "launcher.gpus_per_node=8"])) for w in WORLDS}
            peak = {w: p.per_device["peak_bytes"] / GB for w, p in plans.items()}
            fewest = {cap: next((w for w in WORLDS if peak[w] <= cap), None) for cap in (24, 80)}
            p8 = plans[8]
            flops_token = p8.flops_per_gpu_per_step / p8.tokens_per_gpu_per_step
            print(f"| {model.replace('gemma2_', 'gemma-2-')} | {name} | {p8.trainable_params / 1e6:,.1f}M | "
                  f"{peak[1]:.1f} / {peak[8]:.1f} / {peak[32]:.1f} | "
                  + " | ".join(str(fewest[c]) if fewest[c] else f"> {WORLDS[-1]}" for c in (24, 80))
                  + f" | {flops_token:.3g} | {p8.step_time_s:.2f} s ({p8.bound}) |", flush=True)


if __name__ == "__main__":
    main()
