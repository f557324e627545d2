"""launch.submit: dry run (config + Slurm parameters) and a real local submitit job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.submit import main as submit_main


def test_dry_run_prints_config_and_slurm_parameters(capsys):
    out = submit_main(["+experiment=gemma2_9b", "--dry-run", "launcher.nodes=8", "launcher.partition=gpu",
                       "launcher.account=proj", "launcher.qos=high", "launcher.constraint=h100",
                       "trainer.run_dir=/tmp/dry"])
    printed = capsys.readouterr().out
    assert out["dry_run"] and out["run_dir"] == "/tmp/dry"
    slurm = out["slurm"]
    assert slurm["nodes"] == 8 and slurm["tasks_per_node"] == 1 and slurm["gpus_per_node"] == 8
    assert (slurm["slurm_partition"], slurm["slurm_account"], slurm["slurm_qos"], slurm["slurm_constraint"]) == \
        ("gpu", "proj", "high", "h100")
    assert slurm["slurm_signal_delay_s"] > 0
    assert "query_pre_attn_scalar: 256" in printed and '"nproc_per_node": 8' in printed
    # the planner's verdict at the job's size (8 nodes x 8 GPUs), printed before anything is submitted
    assert out["plan"].startswith("plan: fits") and "at 64 GPUs" in out["plan"] and out["plan"] in printed


def test_no_plan_skips_the_planner(capsys):
    out = submit_main(["+experiment=cpu_demo", "--dry-run", "--no-plan"])
    assert out["plan"] is None and "plan: " not in capsys.readouterr().out


def test_bad_override_is_refused_before_submission(capsys):
    with pytest.raises(SystemExit) as exc:
        submit_main(["+experiment=cpu_demo", "--dry-run", "model.hiden_size=3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hiden" in err and "Traceback" not in err


@pytest.mark.slow
def test_local_executor_runs_the_job(tmp_path):
    run_dir = tmp_path / "run"
    out = submit_main(["+experiment=cpu_demo", "--local", "--wait", "launcher.nproc_per_node=2",
                       f"launcher.folder={tmp_path / 'submitit'}", "trainer.max_steps=2", "data.limit_train_rows=64",
                       "data.limit_eval_rows=32", f"trainer.run_dir={run_dir}", "logging.progress_bar=false"])
    assert out["executor"] == "local"
    assert out["result"]["steps"] == 2 and Path(out["result"]["checkpoint"]).is_dir()
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 2
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank-0.log", "rank-1.log"]


def test_slurm_executor_accepts_the_parameters(tmp_path):
    """Every launcher setting maps to a parameter submitit's Slurm executor knows (no sbatch
    is run: building and configuring the executor validates the names)."""
    from launch.submit import build_executor
    from trainer.config import compose

    cfg = compose(["+experiment=gemma2_9b", "launcher.nodes=2", "launcher.partition=gpu", "launcher.mem_gb=64",
                   "launcher.max_requeues=4", f"launcher.folder={tmp_path}"])
    executor = build_executor(cfg.launcher, "slurm")
    assert executor.cluster == "slurm"
    assert executor._executor.max_num_timeout == 4
    assert executor._executor.parameters["nodes"] == 2
    assert executor._executor.parameters["srun_args"] == ["--kill-on-bad-exit=1"]


def test_checkpoint_hook_returns_once_torchrun_exits(tmp_path):
    """submitit calls TorchrunJob.checkpoint from its signal handler, interrupting the
    Popen.wait() in __call__; the hook must return as soon as torchrun has exited, not after
    stop_timeout_s (Popen's waitpid lock is held by the interrupted wait)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    import submitit

    from launch.submit import TorchrunJob

    job = TorchrunJob(["+experiment=cpu_demo"], str(tmp_path), 2, 29500, stop_timeout_s=30)
    job._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    got = {}

    def handler(signum, frame):
        t0 = time.monotonic()
        got["delayed"] = job.checkpoint()
        got["s"] = time.monotonic() - t0

    old = signal.signal(signal.SIGUSR2, handler)
    try:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR2)).start()
        assert job._proc.wait(timeout=60) == 0
    finally:
        signal.signal(signal.SIGUSR2, old)
    assert got["s"] < 10, got
    assert (tmp_path / "STOP").exists()
    delayed = got["delayed"]
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, TorchrunJob) and delayed.function.run_dir == str(tmp_path)


def test_checkpoint_hook_waits_for_every_nodes_agent(tmp_path, monkeypatch):
    """Task 0's hook returns (and submitit requeues, which SIGTERMs what is left of the job) only
    once every node's torchrun agent has exited, i.e. left its `.agents/<node>.exited` marker."""
    import subprocess
    import sys
    import threading
    import time

    import submitit

    from launch.submit import TorchrunJob

    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NODEID", "0")
    job = TorchrunJob(["+experiment=cpu_demo"], str(tmp_path), 2, 29500, stop_timeout_s=30)
    job._proc = subprocess.Popen([sys.executable, "-c", "pass"])
    job._proc.wait()
    (tmp_path / ".agents").mkdir()
    threading.Timer(1.5, (tmp_path / ".agents" / "1.exited").touch).start()  # node 1's agent, later
    t0 = time.monotonic()
    delayed = job.checkpoint()
    assert 1.4 < time.monotonic() - t0 < 10
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert (tmp_path / ".agents" / "0.exited").exists()


def test_checkpoint_hook_gives_up_on_a_missing_agent_with_a_warning(tmp_path, monkeypatch, caplog):
    import subprocess
    import sys
    import time

    import submitit

    from launch.submit import TorchrunJob

    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_NODEID", "0")
    (tmp_path / ".agents").mkdir()
    (tmp_path / ".agents" / "2.exited").touch()
    job = TorchrunJob(["+experiment=cpu_demo"], str(tmp_path), 2, 29500, stop_timeout_s=1)
    job._proc = subprocess.Popen([sys.executable, "-c", "pass"])
    job._proc.wait()
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="launch.submit"):
        delayed = job.checkpoint()
    assert time.monotonic() - t0 < 5
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert "node(s) 1 had not exited" in caplog.text


def test_each_node_marks_its_agent_exited(tmp_path, monkeypatch):
    """A node's task removes its marker (a previous allocation's) before it starts torchrun and
    writes it once torchrun has exited, also when torchrun failed."""
    import sys

    from launch.submit import TorchrunJob

    monkeypatch.setenv("SLURM_NODEID", "1")
    marker = tmp_path / ".agents" / "1.exited"
    marker.parent.mkdir()
    marker.touch()
    job = TorchrunJob(["+experiment=cpu_demo"], str(tmp_path), 2, 29500)
    # "torchrun" exits 3 if the stale marker is still there
    check = f"import os, sys; sys.exit(3 * os.path.exists({str(marker)!r}))"
    monkeypatch.setattr(TorchrunJob, "command", lambda self: [sys.executable, "-c", check])
    assert job() == {}
    assert marker.exists()
    monkeypatch.setattr(TorchrunJob, "command", lambda self: [sys.executable, "-c", "raise SystemExit(5)"])
    marker.unlink()
    with pytest.raises(RuntimeError, match="torchrun exited with 5"):
        job()
    assert marker.exists()
