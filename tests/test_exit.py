"""Exit paths leave nothing of a run to interpreter teardown (issue 16, "the exit abort"):
the process groups are destroyed even when the final barrier fails, and the run lock's
heartbeat thread is joined when the lock is released."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from trainer.distributed import free_port
from trainer.runlock import RunLock

REPO = Path(__file__).resolve().parents[1]

# Rank 1 fails (no barrier) and leaves; rank 0 ends well and barriers: its barrier fails.
PEER_GONE = textwrap.dedent("""
    import sys, time
    import torch, torch.distributed as dist
    from trainer.distributed import destroy_distributed, init_distributed
    info = init_distributed("cpu", "gloo", timeout_s=60)
    dist.all_reduce(torch.ones(2))
    if info.rank == 1:
        destroy_distributed(graceful=False)
        sys.exit(1)
    time.sleep(0.5)
    try:
        destroy_distributed(graceful=True)
    except RuntimeError as e:
        print("barrier failed:", type(e).__name__, flush=True)
    print("initialized after destroy:", dist.is_initialized(), flush=True)
""")


@pytest.mark.slow
def test_groups_are_destroyed_when_the_final_barrier_fails(tmp_path):
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        procs.append(subprocess.Popen([sys.executable, "-c", PEER_GONE], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert procs[1].returncode == 1, outs[1]
    assert procs[0].returncode == 0, outs[0]
    assert "barrier failed: RuntimeError" in outs[0], outs[0]  # the peer's failure is still raised
    assert "initialized after destroy: False" in outs[0], outs[0]
    assert not any(m in out for out in outs for m in ("terminate called", "Aborted", "core dumped")), outs


def test_run_lock_release_joins_its_heartbeat_thread(tmp_path, monkeypatch):
    import trainer.runlock as runlock

    touching = threading.Event()

    def slow_utime(path):  # a heartbeat on a slow filesystem, under way when the run ends
        touching.set()
        time.sleep(0.5)

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(runlock.os, "utime", slow_utime)
    lock = RunLock(tmp_path)
    lock.acquire()
    beats = [t for t in threading.enumerate() if t.name == "run-lock-heartbeat"]
    assert beats and touching.wait(5)
    lock.release()
    assert not any(t.is_alive() for t in beats)
    assert not (tmp_path / ".lock").exists()
