"""One job per run directory.

Global rank 0 holds ``<run_dir>/.lock``: JSON naming the holder (host, pid, the process's start
time, Slurm job id, when it started), created with O_EXCL and touched every ``HEARTBEAT_S`` by a
daemon thread. A second job on the same run directory is refused, the holder named. A lock left
behind is taken over (logged at WARNING) only when its holder is provably gone:

- same host, and that pid is dead or is another process now (its start time differs);
- the same Slurm job (a requeued job takes over from its own previous run);
- another host, and no heartbeat for ``STALE_S`` seconds (that machine died or lost the disk).

Taking over renames the stale lock away first, so two jobs racing for it cannot both win.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunDirInUse(UserError, RuntimeError):
    """Another live job holds the run directory."""

    collective = True


def _proc_start(pid: int) -> str | None:
    """A running process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat);
    None when there is no such process or it is a zombie (dead, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _me() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_start(pid),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _gone(holder: dict[str, Any], age_s: float, me: dict[str, Any]) -> str | None:
    """Why the holder is certainly not running any more, or None if it may be."""
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return f"the same Slurm job {holder['slurm_job']} (requeued)"
    if holder.get("host") == me["host"]:
        start = _proc_start(int(holder.get("pid", -1)))
        if start is None:
            return f"pid {holder.get('pid')} is not running on {me['host']}"
        if holder.get("proc_start") and start != holder["proc_start"]:
            return f"pid {holder.get('pid')} is another process now"
        if int(holder.get("pid", -1)) == me["pid"]:
            return "left by an earlier run in this process"
        return None
    if age_s > STALE_S:
        return f"no heartbeat from {holder.get('host')} for {age_s:.0f} s"
    return None


class RunLock:
    """``acquire()`` on global rank 0 only; ``release()`` when the run ends, however it ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._me = _me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None

    def acquire(self) -> None:
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_gone()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._me, f)
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunDirInUse(f"{self.path.parent}: could not take the run lock {self.path} "
                          "(other jobs keep racing for it)")

    def _take_over_if_gone(self) -> None:
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = {}
        reason = _gone(holder, age, self._me) if holder else (
            f"unreadable lock, untouched for {age:.0f} s" if age > STALE_S else None)
        if reason is None:
            who = (f"host {holder.get('host')} pid {holder.get('pid')}"
                   + (f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else "")) if holder else "?"
            raise RunDirInUse(
                f"{self.path.parent} is in use by another job: {who}, started {holder.get('started', '?')}, last "
                f"heartbeat {age:.0f} s ago; wait for it to end, stop it (touch {self.path.parent}/STOP), or set "
                f"another trainer.run_dir")
        stale = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.rename(self.path, stale)  # only one taker wins the rename
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)
        self.took_over = f"took over the run lock of host {holder.get('host')} pid {holder.get('pid')}: {reason}"
        log.warning("%s", self.took_over)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        # Joined, not left to interpreter teardown: nothing of the run outlives run().
        self._thread.join(timeout=5.0)
        self._thread = None
        try:
            if json.loads(self.path.read_text()).get("pid") == self._me["pid"]:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
