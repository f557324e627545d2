"""One error boundary: every kind of user error, on launch.train and launch.prepare (real
processes), ends in one `error: ...` line on stderr naming the file / row / field or the key,
exit code 2, no traceback, and a short stderr even for a binary input file. A bug still raises;
HYDRA_FULL_ERROR=1 still shows the traceback; under torchrun rank 0 alone reports."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARENA = REPO.parent / "shared" / "fixtures" / "arena"
HEADER = ["id", "model_a", "model_b", "prompt", "response_a", "response_b",
          "winner_model_a", "winner_model_b", "winner_tie"]


def _arena_row(i, label=("1", "0", "0")):
    return [str(i), "m1", "m2", json.dumps(["q"]), json.dumps(["a"]), json.dumps(["b"]), *label]


def _write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def bad_inputs(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """kind -> (overrides, strings stderr must hold)."""
    bad_row = _write_csv(tmp / "bad.csv", [_arena_row(1), _arena_row(77, ("0", "nan", "0")), _arena_row(3)])
    blob = tmp / "blob.csv"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4000)
    latin = tmp / "latin.csv"
    latin.write_bytes("id,réponse\n1,2\n".encode("latin-1"))
    empty = _write_csv(tmp / "empty.csv", [])
    parquet = tmp / "x.parquet"
    parquet.write_bytes(b"id,prompt\n1,2\n")
    return {
        "typo": (["model.hiden_size=64"], ["model.hiden_size", "did you mean model.hidden_size"]),
        "wrong_type": (["trainer.max_steps=abc"], ["trainer.max_steps", "'abc'"]),
        "bad_choice": (["data.on_bad_row=maybe"], ["data.on_bad_row", "maybe"]),
        "missing_file": ([f"data.train_path={tmp / 'nope.csv'}"], ["data.train_path", str(tmp / "nope.csv")]),
        "bad_row": ([f"data.train_path={bad_row}"], ["bad.csv", "row 2", "'77'", "winner_model_b", "bad_label"]),
        "binary_file": ([f"data.train_path={blob}"], ["blob.csv", "not a text file"]),
        "header_not_utf8": ([f"data.train_path={latin}"], ["latin.csv", "not UTF-8"]),
        "no_data_rows": ([f"data.train_path={empty}"], ["empty.csv", "no data rows"]),
        "not_parquet": ([f"data.train_path={parquet}"], ["x.parquet", "not a parquet file"]),
        "tokenizer": ([f"data.tokenizer_path={tmp / 'no-tokenizer'}"], ["data.tokenizer_path", "no-tokenizer"]),
    }


TRAIN_ONLY = {
    "resume_path": (["trainer.resume={tmp}/no-checkpoint"], ["no-checkpoint"]),
    "pretrained_dir": (["model.name_or_path={tmp}/no-model"], ["model.name_or_path", "no-model", "config.json"]),
}
FAST = ("typo", "bad_row")  # the rest are marked slow (each is a fresh interpreter)


def _run(entry: str, overrides: list[str], tmp: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", f"launch.{entry}", "+experiment=cpu_demo", *overrides, "logging.progress_bar=false"]
    if entry == "train":
        args.append(f"trainer.run_dir={tmp / 'run'}")
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
                               **(env or {})})


def _assert_user_error(proc: subprocess.CompletedProcess, must: list[str]) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(err) < 2000, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for s in must:
        assert s in lines[0], (s, lines[0])


CASES = [(entry, kind) for entry in ("train", "prepare") for kind in
         ("typo", "wrong_type", "bad_choice", "missing_file", "bad_row", "binary_file", "header_not_utf8",
          "no_data_rows", "not_parquet", "tokenizer")] + [("train", k) for k in TRAIN_ONLY]


@pytest.mark.parametrize("entry,kind", [pytest.param(e, k, marks=() if k in FAST else pytest.mark.slow)
                                        for e, k in CASES], ids=[f"{e}-{k}" for e, k in CASES])
def test_user_error_is_one_line_exit_2_no_traceback(tmp_path, entry, kind):
    if kind in TRAIN_ONLY:
        overrides, must = ([o.format(tmp=tmp_path) for o in TRAIN_ONLY[kind][0]], TRAIN_ONLY[kind][1])
    else:
        overrides, must = bad_inputs(tmp_path)[kind]
    proc = _run(entry, overrides, tmp_path)
    _assert_user_error(proc, must)
    if kind in ("typo", "wrong_type", "bad_choice"):
        assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.slow
def test_debug_shows_the_traceback_too(tmp_path):
    overrides, _ = bad_inputs(tmp_path)["bad_row"]
    proc = _run("train", overrides, tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "error: " in proc.stderr
    proc = _run("prepare", [*overrides, "logging.level=DEBUG"], tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_a_bug_is_not_a_user_error(monkeypatch, tmp_path):
    import launch.train
    import trainer.train

    def broken(cfg, command=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(trainer.train, "run", broken)
    with pytest.raises(ZeroDivisionError):
        launch.train.main(["+experiment=cpu_demo", f"trainer.run_dir={tmp_path}"])


def test_messages_quote_values_shortly(tmp_path, capsys):
    from launch.prepare import main

    long_label = "x" * 5000
    f = _write_csv(tmp_path / "long.csv", [_arena_row(1, (long_label, "0", "0"))])
    with pytest.raises(SystemExit) as exc:
        main(["+experiment=cpu_demo", f"data.train_path={f}", f"data.cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "long.csv" in err and "winner_model_a" in err and len(err) < 400


def test_unknown_option_and_cfg_job(capsys):
    from launch.train import main

    with pytest.raises(SystemExit) as exc:
        main(["+experiment=cpu_demo", "--resume"])
    assert exc.value.code == 2 and "unknown option '--resume'" in capsys.readouterr().err
    assert main(["+experiment=cpu_demo", "--cfg", "job", "trainer.seed=5"]) is None
    out = capsys.readouterr().out
    assert "seed: 5" in out and "task: arena" in out


@pytest.mark.slow
def test_under_torchrun_rank0_alone_reports(tmp_path):
    overrides, must = bad_inputs(tmp_path)["bad_row"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "launch.train", "+experiment=cpu_demo", *overrides, f"trainer.run_dir={tmp_path / 'run'}",
                           "logging.progress_bar=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "error: " in ln and "bad.csv" in ln]
    assert len(lines) == 1 and all(s in lines[0] for s in must), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr or "exitcode: 2" in proc.stderr.replace(" ", "")


def test_a_failure_mid_run_closes_group_async_save_and_wandb(tmp_path, monkeypatch):
    """A crash at step 3 (after async saves at steps 1 and 2): the process group is torn down,
    the in-flight async save finishes but is not committed (the previous checkpoint stays the
    latest), and the offline wandb run is closed with exit code 1."""
    import threading

    import torch.distributed as dist
    from wandb_reader import read_offline_run

    from trainer.config import compose
    from trainer.train import Trainer, run

    real_step = Trainer.train_step

    def failing_step(self, micro_batches, rows_in_step):
        if self.step == 2:
            raise RuntimeError("injected failure at step 3")
        return real_step(self, micro_batches, rows_in_step)

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(["+experiment=cpu_demo", "model.hidden_size=32", "model.intermediate_size=64", "model.head_dim=16",
                   "model.query_pre_attn_scalar=16", "data.max_length=256", "data.max_tokens=1024",
                   "data.global_batch_rows=8", "data.limit_train_rows=32", "data.eval_path=null",
                   "trainer.eval_every=null", "checkpoint.every_steps=1", "checkpoint.async_save=true",
                   "logging.wandb.mode=offline", "logging.progress_bar=false", f"trainer.run_dir={tmp_path}"])
    before = set(threading.enumerate())  # earlier tests' pools (inductor's compile workers) are not this run's
    with pytest.raises(RuntimeError, match="injected failure"):
        run(cfg)
    assert not dist.is_initialized()
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000001"
    assert (ckpts / "step-00000002.tmp").is_dir() and not (ckpts / "step-00000002").exists()
    assert any((ckpts / "step-00000002.tmp").glob("*.distcp"))  # the write was waited for
    wb = read_offline_run(tmp_path)
    assert wb.exit_code == 1 and [r["_step"] for r in wb.history if "loss" in r] == [1, 2]
    lingering = [t.name for t in set(threading.enumerate()) - before if not t.daemon]
    assert not lingering, lingering
