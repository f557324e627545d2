"""Checkpoint save and load time and size, synchronous vs asynchronous (trainer.checkpoint).

Two ranks (torch.multiprocessing children, gloo, one thread each) hold an FSDP2-sharded model
and its AnyPrecisionAdamW state (fp32 moments) after one training step, then run the real
Checkpointer: DCP sharded save under step-N.tmp, commit (trainer_state.json with file sizes,
rename, `latest`), and load (verification, DCP read, set_state_dict, RNG restore).

* sync: training is blocked for the whole save (Checkpointer.last_blocking_s).
* async (checkpoint.async_save=true): training is blocked while DCP stages a CPU copy of the
  state and starts the writer thread (last_blocking_s); the write finishes in the background
  and the commit happens at the next save or at the end (Checkpointer.wait()).
* size: bytes on disk vs the state itself (params + optimizer tensors over all ranks).

Models: cpu_demo (hidden 64, 2 layers, vocab 256000: the embedding dominates) and a larger
CPU config (hidden 512, 8 layers, intermediate 2048; vocab 32000 with --quick, 256000 full).
Figures depend on the page cache and on what else runs on the machine: medians of reps.

    python -m bench.bench_checkpoint [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._dist import setup_rank, spawn

MiB = 2**20

CONFIGS = {
    "cpu_demo": [],
    "large": ["model.hidden_size=512", "model.num_hidden_layers=8", "model.intermediate_size=2048",
              "model.num_attention_heads=8", "model.num_key_value_heads=4", "model.head_dim=64",
              "model.query_pre_attn_scalar=64"],
}


def _cfg(name: str, vocab: int | None) -> dict:
    from omegaconf import OmegaConf

    from trainer.config import compose

    cfg = compose(["+experiment=cpu_demo", "model.head_dropout=0.0", *CONFIGS[name]])
    if vocab:
        cfg.model.vocab_size = vocab
    return OmegaConf.to_container(cfg, resolve=True)


def _worker(rank: int, world: int, port: int, cfg_dict: dict, reps: int, root: str, out: str) -> None:
    from trainer.checkpoint import Checkpointer, step_dir_name
    from trainer.distributed import all_reduce_max, all_reduce_sum, barrier, destroy_distributed
    from trainer.model.testing import pack
    from trainer.parallel import local_state_bytes

    info, cfg, model, opt = setup_rank(rank, world, port, cfg_dict)
    g = torch.Generator().manual_seed(rank)
    batch = pack([torch.randint(0, cfg.model.vocab_size, (64,), generator=g) for _ in range(2)])
    model(**batch).float().logsumexp(-1).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sizes = local_state_bytes(model, opt)
    state_bytes = all_reduce_sum([sizes["params"] + sizes["optimizer"]], info.device)[0]

    meta = {"seed": 0, "world_size": world}

    res: dict[str, list[float]] = {"sync_s": [], "async_blocking_s": [], "async_total_s": [], "load_s": [],
                                   "hash_s_per_gb": [], "verify_s": []}
    sync = Checkpointer(Path(root) / "sync", rank=rank, keep_last=1)
    asyn = Checkpointer(Path(root) / "async", rank=rank, keep_last=1, async_save=True)
    size = 0
    for i in range(1, reps + 1):
        barrier()
        sync.save(i, model, opt, {}, meta)
        res["sync_s"].append(all_reduce_max(sync.last_blocking_s, info.device))
        barrier()
        t0 = time.perf_counter()
        asyn.save(i, model, opt, {}, meta)
        blocked = asyn.last_blocking_s
        asyn.wait()  # background write + commit
        res["async_blocking_s"].append(all_reduce_max(blocked, info.device))
        res["async_total_s"].append(all_reduce_max(time.perf_counter() - t0, info.device))
        path = Path(root) / "sync" / step_dir_name(i)
        if rank == 0:
            size = sum(p.stat().st_size for p in path.iterdir())
        # SHA-256: this rank hashing its own shards (what every save adds), and the resume check
        # of every file with the ranks sharing them
        t0 = time.perf_counter()
        digests = sync._own_digests(path)
        hashed = sum((path / n).stat().st_size for n in digests)
        res["hash_s_per_gb"].append(all_reduce_max((time.perf_counter() - t0) / max(hashed, 1) * 1e9, info.device))
        barrier()
        t0 = time.perf_counter()
        assert not sync._verify_contents(path)
        res["verify_s"].append(all_reduce_max(time.perf_counter() - t0, info.device))
        barrier()
        t0 = time.perf_counter()
        sync.load(path, model, opt, {})
        res["load_s"].append(all_reduce_max(time.perf_counter() - t0, info.device))
    if rank == 0:
        Path(out).write_text(json.dumps({**{k: statistics.median(v) for k, v in res.items()},
                                         "size": size, "state_bytes": state_bytes}))
    destroy_distributed()


def measure(cfg_dict: dict, reps: int, world: int = 2) -> dict:
    root = tempfile.mkdtemp(prefix="bench-ckpt-")
    try:
        out = str(Path(root) / "out.json")
        spawn(_worker, world, cfg_dict, reps, root, out)
        return json.loads(Path(out).read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(quick: bool = True, smoke: bool = False) -> list[dict]:
    if smoke:
        plan = {"cpu_demo": _cfg("cpu_demo", 32000)}
        reps = 1
    else:
        plan = {"cpu_demo": _cfg("cpu_demo", None), "large": _cfg("large", 32000 if quick else None)}
        reps = 2 if quick else 5
    rows = []
    for name, cfg in plan.items():
        m = measure(cfg, reps)
        label = f"{name} (h{cfg['model']['hidden_size']} x{cfg['model']['num_hidden_layers']} v{cfg['model']['vocab_size']})"
        mib = m["size"] / MiB
        print(f"{label}: size {mib:.1f} MiB (state {m['state_bytes'] / MiB:.1f} MiB); sync save {m['sync_s']:.3f} s "
              f"({mib / m['sync_s']:.0f} MiB/s); async: blocked {m['async_blocking_s']:.3f} s, done+committed "
              f"{m['async_total_s']:.3f} s; load {m['load_s']:.3f} s ({mib / m['load_s']:.0f} MiB/s); SHA-256 "
              f"{m['hash_s_per_gb']:.2f} s/GB per rank, verify before resume {m['verify_s']:.3f} s")
        rows += [
            {"name": f"checkpoint: training blocked per save, async vs sync, {label}",
             "ours": round(m["async_blocking_s"], 4), "alternative": round(m["sync_s"], 4),
             "ratio": round(m["async_blocking_s"] / m["sync_s"], 3), "limit": None,
             "unit": "s (ours = async staging, alternative = sync dcp.save + commit; 2 ranks)"},
            {"name": f"checkpoint: async save until committed, {label}",
             "ours": round(m["async_total_s"], 4), "alternative": round(m["sync_s"], 4),
             "ratio": round(m["async_total_s"] / m["sync_s"], 3), "limit": None,
             "unit": "s (background write + commit vs sync save)"},
            {"name": f"checkpoint: SHA-256 of a rank's shards, per GB, {label}",
             "ours": round(m["hash_s_per_gb"], 3), "alternative": None, "ratio": None, "limit": None,
             "unit": "s/GB, each rank hashing its own files (in parallel), warm page cache"},
            {"name": f"checkpoint: verify every file before resume (2 ranks share the files), {label}",
             "ours": round(m["verify_s"], 4), "alternative": None, "ratio": None, "limit": None,
             "unit": "s, warm page cache"},
            {"name": f"checkpoint: load (structure check + DCP read + set_state_dict), {label}",
             "ours": round(m["load_s"], 4), "alternative": None, "ratio": None, "limit": None,
             "unit": "s, warm page cache"},
            {"name": f"checkpoint: size on disk, {label}",
             "ours": round(mib, 1), "alternative": round(m["state_bytes"] / MiB, 1),
             "ratio": round(m["size"] / m["state_bytes"], 4), "limit": None,
             "unit": "MiB (alternative = params + optimizer tensors over all ranks)"},
        ]
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    for row in run(quick=a.quick or a.smoke, smoke=a.smoke):
        print(json.dumps(row))
