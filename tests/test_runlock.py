"""One job per run directory: a second job on a directory a live job holds is refused with the
holder's host and pid (exit 2, one line); a lock left by a killed job is taken over, said at
WARNING and recorded as an event; a requeued Slurm job takes over from itself."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

import dist_helpers as h
from trainer.runlock import LOCK_FILE, STALE_S, RunDirInUse, RunLock


@pytest.mark.slow
def test_second_job_is_refused_and_a_killed_jobs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = h.start(run_dir, 2, ["trainer.epochs=1000"])  # runs until killed
    try:
        lock = run_dir / LOCK_FILE
        holder = h.wait_for(lambda: lock.is_file() and lock.read_text() and json.loads(lock.read_text()),
                            proc=first)
        h.wait_for(lambda: h.read_metrics(run_dir), proc=first)  # training, not just starting

        second = h.run(run_dir, 1, ["trainer.max_steps=2"], check=False)
        assert second.returncode == 2
        out = h.log_text(second)
        line = [x for x in out.splitlines() if x.startswith("error:")]
        assert len(line) == 1, out[-2000:]  # (the harness sets HYDRA_FULL_ERROR=1: a traceback comes first)
        assert f"is in use by another job: host {socket.gethostname()} pid {holder['pid']}" in line[0]
        assert first.poll() is None  # the holder was not disturbed
    finally:
        h.kill_group(first)
        first.wait()
    assert lock.is_file()  # left behind by the killed job
    third = h.run(run_dir, 1, ["trainer.epochs=1"])
    text = (run_dir / "logs" / "rank-0.log").read_text()
    assert f"took over the run lock of host {socket.gethostname()} pid {holder['pid']}: pid {holder['pid']} is " \
           "not running" in text
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "event"' in x]
    # (a "checkpoint_refused" event too when the kill landed inside a save: its .tmp is ignored)
    assert [e["event"] for e in events].count("run_lock_taken_over") == 1
    assert third.returncode == 0 and not lock.exists()  # released at the end


def _lock_file(run_dir, **holder):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": "node-a", "pid": 4242, "proc_start": "1", "slurm_job": "77",
                                                 "started": "2026-11-30T00:00:00", **holder}))


def test_lock_of_another_host_is_respected_until_its_heartbeat_is_stale(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _lock_file(tmp_path)
    with pytest.raises(RunDirInUse, match=r"in use by another job: host node-a pid 4242 \(Slurm job 77\)"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_S - 5
    os.utime(tmp_path / LOCK_FILE, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert "no heartbeat from node-a" in lock.took_over
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirInUse, match=f"host {socket.gethostname()} pid {os.getpid()}"):
        other = RunLock(tmp_path)
        other._me = {**other._me, "pid": os.getpid() + 1, "host": "node-b"}  # a job elsewhere
        other.acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    _lock_file(tmp_path)  # fresh heartbeat, another host: only the job id says it is ours
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock = RunLock(tmp_path)
    lock.acquire()
    assert "the same Slurm job 77 (requeued)" in lock.took_over
    lock.release()
