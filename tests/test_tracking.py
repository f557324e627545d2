"""MetricsLogger: jsonl always, wandb offline read back from the .wandb file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from trainer.tracking import REDACTED, MetricsLogger, progress, redact, to_jsonable  # noqa: E402
from wandb_reader import (  # noqa: E402
    FIRST,
    LAST,
    MIDDLE,
    find_offline_runs,
    iter_record_bytes,
    read_offline_runs,
    read_run,
)

SECRET = "secret123"
CLASSES = ["a", "b", "tie"]
TRAIN_KEYS = [
    "loss_buffer_mean",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_per_device",
    "mfu",
    "step_time",
    "data_wait_frac",
    "peak_mem",
    "epoch",
]
EVAL_KEYS = ["log_loss", "accuracy", "macro_f1", "f1_a", "f1_b", "f1_tie"]


def wandb_cfg(mode: str, **kw) -> SimpleNamespace:
    base = dict(
        mode=mode,
        project="arena-test",
        entity=None,
        name="unit",
        tags=["t1", "t2"],
        group="g",
        notes="fake loop",
    )
    base.update(kw)
    return SimpleNamespace(**base)


RUN_CONFIG = {
    "optim": {"lr": 1e-3, "betas": [0.9, 0.95]},
    "api_key": SECRET,
    "wandb": {"hf_token": SECRET, "project": "arena-test"},
    "data": {"path": "/data/x", "max_tokens": 4096},
}


@pytest.fixture
def isolated_wandb(monkeypatch, tmp_path):
    """No network, no writes outside tmp_path, and an API key that must not leak."""
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_ARTIFACT_DIR", str(tmp_path / "wandb_artifacts"))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    yield tmp_path


def fake_training(logger: MetricsLogger, steps: range, eval_every: int = 3) -> None:
    for step in steps:
        logger.log(
            {
                "loss_buffer_mean": 1.0 / step,
                "lr": 1e-3 * step,
                "grad_norm": 0.5 + step,
                "tokens_per_s": 1000.0 * step,
                "tokens_per_s_per_device": 500.0 * step,
                "mfu": 0.01 * step,
                "step_time": 0.25,
                "data_wait_frac": 0.05,
                "peak_mem": 2**30,
                "epoch": step / 10,
            },
            step=step,
        )
        if step % eval_every == 0:
            logger.log_eval(
                {
                    "log_loss": 0.69 - 0.01 * step,
                    "accuracy": 0.4 + 0.01 * step,
                    "macro_f1": 0.3,
                    "f1_a": 0.5,
                    "f1_b": 0.4,
                    "f1_tie": float("nan"),  # never predicted: NaN -> null
                },
                step=step,
            )
            logger.log_confusion_matrix([[5, 1, 0], [2, 6, 1], [0, 3, step]], CLASSES, step=step)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_no_secret(root: Path) -> None:
    leaks = [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, f"secret leaked into {leaks}"


def test_offline_run_history_read_back_and_resume(isolated_wandb):
    run_dir = isolated_wandb / "run"
    logger = MetricsLogger(
        run_dir, rank=0, wandb_cfg=wandb_cfg("offline"), run_config=RUN_CONFIG, resume_run_id=None
    )
    run_id = logger.run_id
    assert run_id and len(run_id) == 8
    fake_training(logger, range(1, 7))
    logger.summary({"best/macro_f1": 0.3, "best/step": 6})
    logger.finish()
    logger.finish()  # idempotent

    # --- read the history from the .wandb transaction log (not from metrics.jsonl)
    files = find_offline_runs(run_dir, run_id)
    assert len(files) == 1 and files[0].name == f"run-{run_id}.wandb"
    run = read_run(files[0])
    assert run.run_id == run_id
    assert run.project == "arena-test" and run.display_name == "unit"
    assert run.tags == ["t1", "t2"] and run.group == "g" and run.notes == "fake loop"
    assert run.exit_code == 0

    assert [row["_step"] for row in run.history] == [1, 2, 3, 4, 5, 6]
    for row in run.history:
        assert set(TRAIN_KEYS) <= set(row), row.keys()
        assert row["loss_buffer_mean"] == pytest.approx(1.0 / row["_step"])
        assert row["peak_mem"] == 2**30
    eval_rows = {row["_step"]: row for row in run.history if "eval/accuracy" in row}
    assert sorted(eval_rows) == [3, 6]
    for step, row in eval_rows.items():
        assert {f"eval/{k}" for k in EVAL_KEYS} <= set(row)
        assert row["eval/accuracy"] == pytest.approx(0.4 + 0.01 * step)
        assert row["eval/f1_tie"] is None
        ref = row["eval/confusion_matrix"]
        assert ref["_type"] == "table-file"
        table = run.load_table(ref)
        assert table["columns"] == ["actual", *CLASSES]
        assert table["data"] == [["a", 5, 1, 0], ["b", 2, 6, 1], ["tie", 0, 3, step]]

    # config: logged, secrets redacted (both top-level and nested)
    assert run.config["optim"] == {"lr": 1e-3, "betas": [0.9, 0.95]}
    assert run.config["api_key"] == REDACTED
    assert run.config["wandb"]["hf_token"] == REDACTED
    assert run.config["wandb"]["project"] == "arena-test"
    # summary: explicit values + wandb's last-value summary
    assert run.summary["best/macro_f1"] == pytest.approx(0.3)
    assert run.summary["best/step"] == 6
    assert run.summary["_step"] == 6

    # --- metrics.jsonl has the same data
    recs = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(set(TRAIN_KEYS) <= set(r) for r in train)
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and evals[0]["eval/f1_tie"] is None
    cms = [r for r in recs if r["kind"] == "confusion_matrix"]
    assert cms[-1]["matrix"] == [[5, 1, 0], [2, 6, 1], [0, 3, 6]]
    assert cms[-1]["class_names"] == CLASSES

    # --- resume: a second logger continues the same run id
    logger2 = MetricsLogger(
        run_dir, rank=0, wandb_cfg=wandb_cfg("offline"), run_config=RUN_CONFIG, resume_run_id=run_id
    )
    assert logger2.run_id == run_id and logger2.resumed
    fake_training(logger2, range(7, 10))
    logger2.finish()

    # wandb offline writes a second segment dir with the same id:
    # offline-run-<time>-<id> (new time stamp), or offline-run-<time>-<id>-1 when
    # the time stamp (1 s resolution) collides.
    paths = find_offline_runs(run_dir, run_id)
    assert len(paths) == 2 and paths[0].parent != paths[1].parent
    assert all(p.name == f"run-{run_id}.wandb" and run_id in p.parent.name for p in paths)
    segments = read_offline_runs(run_dir, run_id)
    assert [seg.run_id for seg in segments] == [run_id, run_id]
    assert [row["_step"] for row in segments[1].history] == [7, 8, 9]
    all_steps = [row["_step"] for seg in segments for row in seg.history]
    assert all_steps == list(range(1, 10))
    # metrics.jsonl was appended, not truncated
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"] == list(
        range(1, 10)
    )

    assert_no_secret(isolated_wandb)


def test_multi_block_records_read_back(isolated_wandb):
    """A >32 KiB record spans FIRST/MIDDLE/LAST chunks across blocks."""
    run_dir = isolated_wandb / "run"
    big = {"vocab": [f"tok{i}" for i in range(12000)]}  # ~130 KB of config
    logger = MetricsLogger(run_dir, rank=0, wandb_cfg=wandb_cfg("offline"), run_config=big)
    for step in range(200):
        logger.log({"x": float(step), "label": "s" * 400}, step=step)
    logger.finish()
    (f,) = find_offline_runs(run_dir, logger.run_id)
    assert f.stat().st_size > 3 * 32 * 1024
    types: list[int] = []
    n_records = sum(1 for _ in iter_record_bytes(f, types))
    assert n_records > 200
    assert FIRST in types and MIDDLE in types and LAST in types
    run = read_run(f)
    assert run.config["vocab"] == big["vocab"]
    assert [row["_step"] for row in run.history] == list(range(200))
    assert [row["x"] for row in run.history] == list(range(200))


def test_disabled_mode_does_not_import_wandb(tmp_path):
    code = (
        "import sys; from pathlib import Path; from trainer.tracking import MetricsLogger\n"
        "lg = MetricsLogger(Path(sys.argv[1]), rank=0, wandb_cfg={'mode': 'disabled'}, run_config={})\n"
        "lg.log({'x': 1.0}, step=1); lg.log_confusion_matrix([[1, 0], [0, 1]], ['a', 'b'], step=1)\n"
        "lg.summary({'y': 2}); lg.finish()\n"
        "assert 'wandb' not in sys.modules, 'wandb imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], check=True, timeout=60)
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "wandb").exists()


def test_disabled_mode_metrics_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    run_dir = tmp_path / "run"
    logger = MetricsLogger(
        run_dir, rank=0, wandb_cfg=wandb_cfg("disabled"), run_config=RUN_CONFIG, resume_run_id=None
    )
    assert logger.run_id and len(logger.run_id) == 8
    fake_training(logger, range(1, 7))
    logger.summary({"best/macro_f1": 0.3})
    logger.log({"bad": float("inf"), "nan": float("nan")}, step=7)
    logger.finish()
    assert not (run_dir / "wandb").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]

    recs = read_jsonl(run_dir / "metrics.jsonl")
    kinds = [r["kind"] for r in recs]
    assert kinds.count("train") == 7 and kinds.count("eval") == 2
    assert kinds.count("confusion_matrix") == 2 and kinds[-2] == "summary"
    assert recs[-1] == {**recs[-1], "step": 7, "bad": None, "nan": None}
    for r in recs:
        if r["kind"] == "train" and r["step"] <= 6:
            assert set(TRAIN_KEYS) <= set(r)
    assert_no_secret(tmp_path)

    # resume id is kept in disabled mode too
    again = MetricsLogger(run_dir, rank=0, wandb_cfg=None, resume_run_id=logger.run_id)
    assert again.run_id == logger.run_id
    again.finish()


def test_nonzero_rank_is_noop(tmp_path):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, rank=1, wandb_cfg=wandb_cfg("offline"), run_config={}, resume_run_id="abc")
    logger.log({"x": 1.0}, step=1)
    logger.log_eval({"accuracy": 1.0}, step=1)
    logger.log_confusion_matrix([[1]], ["a"], step=1)
    logger.summary({"x": 1})
    logger.finish()
    assert logger.run_id == "abc"
    assert not run_dir.exists()


def test_redact_and_jsonable():
    torch = pytest.importorskip("torch")
    import numpy as np

    cfg = {"API_KEY": "x", "tokenizer_path": "p", "n": {"client_secret": 1, "ok": [{"auth_token": "y"}]}}
    assert redact(cfg) == {
        "API_KEY": REDACTED,
        "tokenizer_path": REDACTED,  # contains "token": over-redaction is the safe side
        "n": {"client_secret": REDACTED, "ok": [{"auth_token": REDACTED}]},
    }
    omegaconf = pytest.importorskip("omegaconf")
    oc = omegaconf.OmegaConf.create({"w": {"hf_token": "x", "l": [1, {"api_key": "y"}]}, "ref": "${w.l}"})
    assert redact(oc) == {
        "w": {"hf_token": REDACTED, "l": [1, {"api_key": REDACTED}]},
        "ref": [1, {"api_key": REDACTED}],  # interpolations resolved, plain containers out
    }
    assert to_jsonable(torch.tensor(2.5)) == 2.5
    assert to_jsonable(np.float32(1.5)) == 1.5
    assert to_jsonable(np.int64(3)) == 3
    assert to_jsonable(torch.tensor([[1, 2], [3, 4]])) == [[1, 2], [3, 4]]
    assert to_jsonable(float("-inf")) is None
    assert to_jsonable(torch.tensor(float("nan"))) is None
    assert not math.isnan(to_jsonable(0.0))


def test_progress_bar_rank_and_tty(monkeypatch):
    monkeypatch.delenv("ARENA_PROGRESS", raising=False)
    assert progress(10, "x", rank=1, force=True).disable
    assert not progress(10, "x", rank=0, force=True).disable
    assert progress(10, "x", rank=0, force=False).disable
    # pytest captures stderr: not a TTY -> hidden
    bar = progress(10, "x", rank=0, initial=3)
    assert bar.disable
    bar.update(2)
    bar.close()
    monkeypatch.setenv("ARENA_PROGRESS", "1")
    bar = progress(10, "x", rank=0, initial=3)
    assert not bar.disable and bar.n == 3
    bar.close()
