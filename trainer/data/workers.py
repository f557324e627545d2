"""The start method for every worker process the data pipeline starts (tokenizer pool, DataLoader).

Never fork. By the time data is prepared the process has threads: gloo/NCCL loops and watchdogs,
wandb, the run lock's heartbeat, tqdm's monitor, DCP's async-save executor. fork() copies only the
calling thread, so a lock another thread held at that instant stays held in the child forever,
and the worker hangs on its first use of it. That hung a CI run inside the tokenizer pool, in a
process where nothing looked wrong. A forkserver is started by exec, once, while it is still
single-threaded; workers are forked from it, never from us. The price is that a worker receives
its state pickled (the Gemma tokenizer: ~14 MB, ~1.5 s to unpickle) instead of shared. Python
3.14 made the same choice its default on Linux.
"""
from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

# imported once by the forkserver, so each worker starts with them already loaded
_PRELOAD = ["numpy", "trainer.data.tokenize", "trainer.data.collate"]


def worker_context() -> BaseContext:
    """forkserver where the platform has it (Linux, macOS), spawn elsewhere (Windows)."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")
