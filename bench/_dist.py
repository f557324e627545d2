"""Shared plumbing for benchmarks that run ranks with torch.multiprocessing (gloo, CPU)."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def spawn(worker: Callable[..., None], world: int, *args: Any) -> None:
    """Run worker(rank, world, port, *args) on `world` processes with a fresh rendezvous port."""
    from trainer.distributed import free_port

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=True)


def setup_rank(rank: int, world: int, port: int, cfg_dict: dict):
    """In a spawned rank: join the group and build the FSDP2-sharded model and its optimizer.

    Returns (info, cfg, model, optimizer); the model is fp32 with the same init on every rank.
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from omegaconf import OmegaConf

    from trainer.build import build_model
    from trainer.distributed import init_distributed
    from trainer.optim import build_optimizer
    from trainer.parallel import build_mesh
    from trainer.tasks import ArenaTask

    cfg = OmegaConf.create(cfg_dict)
    cfg.parallel.param_dtype = cfg.parallel.reduce_dtype = "float32"
    info = init_distributed("cpu", "gloo")
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, ArenaTask(), info, build_mesh(info, 1))
    return info, cfg, model, build_optimizer(model, cfg.optim)
