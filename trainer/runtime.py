"""Per-process run environment: run directory, logging, seeding, and preemption requests."""

from __future__ import annotations

import logging
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import PROJECT_ROOT
from .distributed import DistInfo, all_reduce_max, broadcast_object

log = logging.getLogger(__name__)

# Fault-injection for tests: ARENA_TRAINER_PAUSE_AT="save=3" holds the process 3 s at that
# point (load: before the data loads; eval: before an evaluation; save: after a checkpoint's
# write was issued, before its commit), so a test can land a signal exactly there.
PAUSE_ENV = "ARENA_TRAINER_PAUSE_AT"
STOP_FILE = "STOP"  # touch <run_dir>/STOP to ask a running job to checkpoint and exit
PREEMPTED_MARKER = ".preempted"  # written when a job stopped early on request (requeue me)
DONE_MARKER = ".done"  # written when training finished


def resolve_run_dir(run_dir: str | None, experiment: str, info: DistInfo) -> Path:
    """All ranks agree on one directory; rank 0 picks it when the config leaves it open."""
    if run_dir is None:
        chosen = None
        if info.is_main:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            chosen = str(PROJECT_ROOT / "runs" / f"{experiment}-{stamp}")
            base, i = chosen, 1
            while Path(chosen).exists():  # two runs started within the same second
                chosen, i = f"{base}-{i}", i + 1
        run_dir = broadcast_object(chosen)
    path = Path(run_dir).expanduser().resolve()
    if info.is_main:
        path.mkdir(parents=True, exist_ok=True)
    from .distributed import barrier

    barrier()
    return path


# What setup_logging replaced, so that restore_logging can put it back: a run inside a longer-lived
# process (tests, a notebook, a sweep) must not leave handlers writing into its run directory.
# (the root logger's handlers and level before setup_logging, the handlers it installed)
_saved_logging: tuple[list[logging.Handler], int, list[logging.Handler]] | None = None


def setup_logging(run_dir: Path, rank: int, level: str = "INFO") -> None:
    """Rank 0 logs to the console and train.log; every rank keeps logs/rank-N.log. The root
    logger's previous handlers and level come back with restore_logging()."""
    global _saved_logging
    restore_logging()  # a second run without a restore in between: close the first's files
    root = logging.getLogger()
    previous, previous_level = list(root.handlers), root.level
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    per_rank = logging.FileHandler(run_dir / "logs" / f"rank-{rank}.log")
    per_rank.setFormatter(fmt)
    per_rank.setLevel(level)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(level if rank == 0 else logging.WARNING)
    installed: list[logging.Handler] = [per_rank, console]
    if rank == 0:
        shared = logging.FileHandler(run_dir / "train.log")
        shared.setFormatter(fmt)
        shared.setLevel(level)
        installed.append(shared)
    for h in installed:
        root.addHandler(h)
    _saved_logging = (previous, previous_level, installed)
    for noisy in ("urllib3", "filelock", "wandb", "git", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def restore_logging() -> None:
    """Remove and close the handlers setup_logging installed and give the root logger back its
    previous handlers and level; a no-op when nothing is installed. Without it, a closed file
    handler left on the root logger reopens its file on the next record, and raises once the
    run directory is gone."""
    global _saved_logging
    if _saved_logging is None:
        return
    previous, level, installed = _saved_logging
    _saved_logging = None
    root = logging.getLogger()
    for h in installed:
        root.removeHandler(h)
        try:
            h.close()
        except Exception:  # noqa: BLE001 - a handler that cannot flush must not hide the run's outcome
            pass
    for h in previous:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def pause_point(where: str) -> None:
    """Sleep here if ``ARENA_TRAINER_PAUSE_AT`` names this point (tests only; see PAUSE_ENV)."""
    import os

    for item in os.environ.get(PAUSE_ENV, "").split(","):
        name, _, seconds = item.partition("=")
        if name.strip() == where and seconds:
            log.info("pausing at %s for %s s (%s)", where, seconds, PAUSE_ENV)
            time.sleep(float(seconds))


def seed_everything(seed: int) -> None:
    """The same seed on every rank: data order and model init must agree across ranks.
    (Dropout streams are made per-rank by the trainer once the model exists.)"""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PreemptionWatcher:
    """SIGTERM, SIGUSR1 (slurm/train.sh's pre-timeout signal), SIGUSR2 (submitit's) or a STOP
    file ask the job to finish its current step, checkpoint and exit. All ranks agree once
    per step, so a signal that reached only some ranks still stops all of them together."""

    def __init__(self, run_dir: Path, info: DistInfo):
        self.run_dir = run_dir
        self.info = info
        self.requested_by: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some test harnesses)
                pass

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.requested_by = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Collective: call once per step on every rank."""
        local = self.requested_by is not None or (self.run_dir / STOP_FILE).exists()
        if local and self.requested_by is None:
            self.requested_by = STOP_FILE
        return all_reduce_max(1.0 if local else 0.0, self.info.device) > 0
