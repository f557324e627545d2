"""A real training run logging to wandb offline, read back from the files wandb wrote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trainer.config import compose
from trainer.train import run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wandb_reader import read_offline_runs  # noqa: E402

TINY = ["+experiment=cpu_demo", "model.hidden_size=32", "model.intermediate_size=64", "model.head_dim=16",
        "model.query_pre_attn_scalar=16", "data.max_length=256", "data.max_tokens=2048", "data.global_batch_rows=8",
        "data.limit_train_rows=48", "data.limit_eval_rows=24", "trainer.eval_every=2", "checkpoint.every_steps=2",
        "logging.progress_bar=false", "logging.wandb.mode=offline", "logging.wandb.project=arena-test",
        "logging.wandb.tags=[ci]", "trainer.peak_flops_per_device=1e11"]

TRAIN_KEYS = {"loss", "loss_step", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "step_time",
              "data_wait_frac", "peak_mem_gb", "epoch"}
EVAL_KEYS = {"eval/log_loss", "eval/accuracy", "eval/macro_f1", "eval/f1_a", "eval/f1_b", "eval/f1_tie",
             "eval/confusion_matrix"}


def test_wandb_offline_history_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-should-never-be-written-0123456789")
    run(compose(TINY + [f"trainer.run_dir={tmp_path}", "trainer.max_steps=4"]))
    state = json.loads(next((tmp_path / "checkpoints").glob("step-00000004/trainer_state.json")).read_text())
    run_id = state["state"]["logger"]["wandb_run_id"]
    assert run_id

    first = read_offline_runs(tmp_path, run_id)
    assert len(first) == 1 and first[0].run_id == run_id
    hist = first[0].history
    train_rows = [r for r in hist if "loss" in r]
    assert [r["_step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert 0 < r["mfu"] < 1 and r["tokens_per_s"] > 0
    eval_rows = [r for r in hist if "eval/log_loss" in r]
    assert [r["_step"] for r in eval_rows] == [2, 4]
    assert EVAL_KEYS <= {k for r in hist if r["_step"] in (2, 4) for k in r}
    assert first[0].project == "arena-test" and "ci" in first[0].tags
    # The same numbers went to metrics.jsonl.
    jsonl = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in jsonl if "loss" in r] == pytest.approx([r["loss"] for r in train_rows])

    # A second launch in the same run directory resumes the checkpoint and the wandb run.
    run(compose(TINY + [f"trainer.run_dir={tmp_path}", "trainer.max_steps=6"]))
    segments = read_offline_runs(tmp_path, run_id)
    assert len(segments) == 2 and {s.run_id for s in segments} == {run_id}
    assert [r["_step"] for r in segments[1].history if "loss" in r] == [5, 6]

    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"secret-should-never-be-written" not in f.read_bytes(), f


def test_a_run_inside_a_longer_lived_process_gives_the_root_logger_back(tmp_path):
    """run() installs console and file handlers for its run directory; when it returns, the root
    logger has its own handlers and level back and nothing writes into the run directory (a file
    handler left behind reopens its file once something closes it, e.g. logging.config, and raises
    when the directory is gone: that broke 11 later tests when a module's runs were cleaned up)."""
    import logging

    root = logging.getLogger()
    mine = logging.Handler(logging.DEBUG)
    seen: list[str] = []
    mine.emit = lambda record: seen.append(record.getMessage())
    root.addHandler(mine)
    level = root.level
    before = list(root.handlers)
    try:
        root.setLevel(logging.ERROR)
        runs = [tmp_path / "first", tmp_path / "second"]
        for run_dir in runs:
            run(compose(TINY + [f"trainer.run_dir={run_dir}", "trainer.max_steps=1", "trainer.eval_every=null",
                                "checkpoint.every_steps=null", "logging.wandb.mode=disabled"]))
            assert root.handlers == before and root.level == logging.ERROR
            assert not [h for h in root.handlers if str(run_dir) in str(getattr(h, "baseFilename", ""))]
        first_log = (runs[0] / "train.log").read_text()
        assert "step 1/1" in first_log and str(runs[1]) not in first_log  # the second run wrote its own
        logging.getLogger("trainer.train").error("after the runs")
        assert seen == ["after the runs"]  # to the process's own handler, not into a run directory
        assert all("after the runs" not in (d / "train.log").read_text() for d in runs)
    finally:
        root.removeHandler(mine)
        root.setLevel(level)
