"""Full fine-tuning vs LoRA vs QLoRA: per-rank training state and tokens/s, at 2 ranks, in one run.

The layer stack is real width (gemma-2-2b's: hidden 2304, MLP 9216, 8 heads of 256, 4 KV heads;
2 layers, 32k vocabulary so the embedding does not drown the stack; fp32 on CPU), sharded by
FSDP2 over 2 gloo ranks. Per rank, after a backward and an optimizer step: parameter, gradient
and optimizer-state bytes (trainer.parallel.local_state_bytes: NF4 weights at their packed
size). Then training tokens/s over a few steps of 2 x 128-token rows per rank. Adapters: rank
16, every decoder linear, AdamW with fp32 moments (the cpu_demo optimizer).

    python -m bench.bench_adapters [--quick | --smoke]      (--smoke: hidden 256, seconds)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench._dist import setup_rank, spawn

MiB = 2**20
REAL = dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
            query_pre_attn_scalar=256)
SMOKE = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
             query_pre_attn_scalar=128)


def _cfg(adapter: str, smoke: bool) -> dict:
    from omegaconf import OmegaConf

    from trainer.config import compose

    shape = SMOKE if smoke else REAL
    overrides = ["+experiment=cpu_demo", "model.head_dropout=0.0", "model.vocab_size=32000",
                 "model.num_hidden_layers=2", *(f"model.{k}={v}" for k, v in shape.items()), f"model/adapter={adapter}",
                 "model.adapter.rank=16", "model.adapter.dropout=0.0"]
    if smoke:
        overrides.append("model.adapter.nf4_scaler_block_size=64")
    return OmegaConf.to_container(compose(overrides), resolve=True)


def _worker(rank: int, world: int, port: int, cfgs: dict, steps: int, rows: int, seq: int, out: str) -> None:
    """One world of ``world`` ranks measures every config in turn (one model at a time)."""
    import gc

    from trainer.distributed import all_reduce_max, destroy_distributed
    from trainer.model.testing import pack
    from trainer.parallel import local_state_bytes

    def step(model, opt, vocab: int, g: torch.Generator, measure: bool = False) -> dict | None:
        batch = pack([torch.randint(0, vocab, (seq,), generator=g) for _ in range(rows)])
        logits = model(**batch)
        (-torch.log_softmax(logits.float(), -1)[:, 0].sum() / (rows * world)).backward()
        before = local_state_bytes(model, opt) if measure else None
        opt.step()
        after = local_state_bytes(model, opt) if measure else None
        opt.zero_grad(set_to_none=True)
        if measure:  # gradients exist before the step, moments after it
            return {"params": after["params"], "grads": before["grads"], "optimizer": after["optimizer"]}
        return None

    results = {}
    for name, cfg_dict in cfgs.items():
        info, cfg, model, opt = setup_rank(rank, world, port, cfg_dict)
        g = torch.Generator().manual_seed(1000 + rank)
        sizes = step(model, opt, cfg.model.vocab_size, g, measure=True)
        sizes["total"] = sizes["params"] + sizes["grads"] + sizes["optimizer"]
        t0 = time.perf_counter()
        for _ in range(steps):
            step(model, opt, cfg.model.vocab_size, g)
        elapsed = all_reduce_max(time.perf_counter() - t0, info.device)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, sizes)
        results[name] = {"per_rank": gathered, "tokens_per_s": steps * rows * seq * world / elapsed,
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        del model, opt
        gc.collect()
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    destroy_distributed()


def measure_all(smoke: bool, steps: int, world: int = 2, rows: int = 2, seq: int = 128) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "out.json")
        cfgs = {a: _cfg(a, smoke) for a in ("none", "lora", "qlora")}
        spawn(_worker, world, cfgs, steps, rows, seq, out)
        return json.loads(Path(out).read_text())


def run(quick: bool = True, smoke: bool = False) -> list[dict]:
    steps = 1 if smoke else (2 if quick else 5)
    results = measure_all(smoke, steps)
    full = results["none"]
    width = "hidden 256 (smoke)" if smoke else "hidden 2304 / MLP 9216 / head_dim 256"
    rows = []
    for a, r in results.items():
        worst = max(r["per_rank"], key=lambda s: s["total"])
        label = {"none": "full", "lora": "LoRA r16", "qlora": "QLoRA r16 (NF4)"}[a]
        print(f"{label:16s} per-rank MiB: params {worst['params'] / MiB:8.1f}  grads {worst['grads'] / MiB:7.1f}  "
              f"optimizer {worst['optimizer'] / MiB:8.1f}  total {worst['total'] / MiB:8.1f}   "
              f"trainable {r['trainable']:,}   tokens/s {r['tokens_per_s']:.0f}")
        full_total = max(s["total"] for s in full["per_rank"])
        rows.append({"name": f"adapters: per-rank state, {label}, 2 ranks, {width}",
                     "ours": round(worst["total"] / MiB, 1), "alternative": round(full_total / MiB, 1),
                     "ratio": round(worst["total"] / full_total, 4), "limit": None,
                     "unit": "MiB params+grads+optimizer per rank (alternative = full fine-tuning)"})
        rows.append({"name": f"adapters: training tokens/s, {label}, 2 ranks, CPU fp32",
                     "ours": round(r["tokens_per_s"], 1), "alternative": round(full["tokens_per_s"], 1),
                     "ratio": round(r["tokens_per_s"] / full["tokens_per_s"], 3), "limit": None,
                     "unit": "tokens/s, both ranks (alternative = full fine-tuning)"})
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    for row in run(quick=a.quick or a.smoke, smoke=a.smoke):
        print(json.dumps(row))
