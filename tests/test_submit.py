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


def test_bad_override_is_refused_before_submission():
    with pytest.raises(Exception, match="hiden"):
        submit_main(["+experiment=cpu_demo", "--dry-run", "model.hiden_size=3"])


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
