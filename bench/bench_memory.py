"""Per-rank training state (parameters + gradients + optimizer state) at 1, 2 and 4 processes.

FSDP2 shards all three, so each rank should hold ~1/N of the 1-process bytes (the
alternative: plain data parallelism keeps a full replica on every rank). Measured with
trainer.parallel.local_state_bytes inside each rank, after a backward (gradients present)
and an optimizer step (moments allocated), on the cpu_demo model (fp32, AnyPrecisionAdamW
with fp32 moments, vocab 256000). Also steps/s on a fixed global batch (8 random rows of 128
tokens per step, cut evenly over the ranks): on this 2-core CPU, 4 processes oversubscribe.

Ranks are torch.multiprocessing children (gloo, OMP_NUM_THREADS=1), one world per N.

    python -m bench.bench_memory [--quick | --smoke]
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


def _model_cfg(smoke: bool):
    from omegaconf import OmegaConf

    from trainer.config import compose

    cfg = compose(["+experiment=cpu_demo", "model.head_dropout=0.0"])
    if smoke:
        cfg.model.vocab_size = 32000
    return OmegaConf.to_container(cfg, resolve=True)


def _worker(rank: int, world: int, port: int, cfg_dict: dict, steps: int, rows: int, seq: int, out: str) -> None:
    from trainer.distributed import all_reduce_max, destroy_distributed
    from trainer.model.testing import pack
    from trainer.parallel import local_state_bytes

    info, cfg, model, opt = setup_rank(rank, world, port, cfg_dict)
    g = torch.Generator().manual_seed(1000 + rank)
    per_rank = max(1, rows // world)

    def step(measure: bool = False) -> dict | None:
        batch = pack([torch.randint(0, cfg.model.vocab_size, (seq,), generator=g) for _ in range(per_rank)])
        logits = model(**batch)
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1
        loss = -(labels * torch.log_softmax(logits.float(), -1)).sum() / rows
        loss.backward()
        before = local_state_bytes(model, opt) if measure else None
        opt.step()
        after = local_state_bytes(model, opt) if measure else None
        opt.zero_grad(set_to_none=True)
        if measure:  # gradients exist before the step, moments after it
            return {"params": after["params"], "grads": before["grads"], "optimizer": after["optimizer"]}
        return None

    step()  # moments allocated, first-call costs paid
    sizes = step(measure=True)
    sizes["total"] = sizes["params"] + sizes["grads"] + sizes["optimizer"]
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = all_reduce_max(time.perf_counter() - t0, info.device)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, sizes)
    if rank == 0:
        Path(out).write_text(json.dumps({"per_rank": gathered, "steps_per_s": steps / elapsed}))
    destroy_distributed()


def measure(world: int, cfg_dict: dict, steps: int, rows: int = 8, seq: int = 128) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "out.json")
        spawn(_worker, world, cfg_dict, steps, rows, seq, out)
        return json.loads(Path(out).read_text())


def run(quick: bool = True, smoke: bool = False) -> list[dict]:
    cfg = _model_cfg(smoke)
    worlds = (1, 2) if smoke else (1, 2, 4)
    steps = 2 if smoke else (5 if quick else 20)
    results = {n: measure(n, cfg, steps) for n in worlds}
    base = results[1]["per_rank"][0]
    rows = []
    for n, r in results.items():
        worst = max(r["per_rank"], key=lambda s: s["total"])
        print(f"world {n}: per-rank MiB  params {worst['params'] / MiB:8.1f}  grads {worst['grads'] / MiB:8.1f}  "
              f"optimizer {worst['optimizer'] / MiB:8.1f}  total {worst['total'] / MiB:8.1f}  "
              f"({worst['total'] / base['total']:.3f} of 1 process; ideal {1 / n:.3f})  "
              f"steps/s {r['steps_per_s']:.2f}")
        rows.append({"name": f"memory: per-rank param+grad+optim state, {n} proc",
                     "ours": round(worst["total"] / MiB, 1), "alternative": round(base["total"] / MiB, 1),
                     "ratio": round(worst["total"] / base["total"], 4), "limit": round(1 / n, 4),
                     "unit": "MiB per rank (alternative = full replica, as 1 process / DDP; limit = 1/N)"})
    for n, r in results.items():
        rows.append({"name": f"memory: steps/s, {n} proc (8 rows x 128 tok per step)",
                     "ours": round(r["steps_per_s"], 3), "alternative": round(results[1]["steps_per_s"], 3),
                     "ratio": round(r["steps_per_s"] / results[1]["steps_per_s"], 3), "limit": None,
                     "unit": "optimizer steps/s (alternative = 1 process; 2 shared CPU cores)"})
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    for row in run(quick=a.quick or a.smoke, smoke=a.smoke):
        print(json.dumps(row))
