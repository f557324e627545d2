"""End-to-end training on the shared arena data: it learns, and it runs under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.config import compose
from trainer.train import run

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cpu_demo_model_learns_32_rows(tmp_path):
    # 32 rows, one optimizer step per epoch: the model must be able to fit them.
    cfg = compose(["+experiment=cpu_demo", "data.limit_train_rows=32", "data.limit_eval_rows=32",
                   "data.global_batch_rows=32", "data.max_length=256", "trainer.epochs=30", "trainer.eval_every=null",
                   "model.head_dropout=0.0", "optim.lr=3e-3", "optim.warmup_ratio=0.05", "optim.decay=constant",
                   "checkpoint.every_steps=null", f"trainer.run_dir={tmp_path}", "logging.progress_bar=false",
                   "trainer.resume=never"])
    result = run(cfg)
    rows = [r for r in _rows(tmp_path / "metrics.jsonl") if "loss_step" in r]
    losses = [r["loss_step"] for r in rows]
    assert len(losses) == 30
    assert losses[0] > 1.0  # ~ln(3) at init
    assert min(losses[-5:]) < 0.25 * losses[0], losses
    assert result.checkpoint is not None and (result.checkpoint / ".metadata").is_file()
    assert {"log_loss", "accuracy", "macro_f1"} <= set(result.eval_metrics)


@pytest.mark.slow
def test_cpu_demo_under_torchrun_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launch.train",
           "+experiment=cpu_demo", "data.limit_train_rows=128", "data.limit_eval_rows=64", "trainer.eval_every=2",
           "checkpoint.every_steps=2", f"trainer.run_dir={run_dir}", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval: log_loss" in proc.stdout and "checkpoint:" in proc.stdout
    assert sum(line.startswith("run directory:") for line in proc.stdout.splitlines()) == 1  # rank 0 reports
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 4 and result["checkpoint"].endswith("step-00000004")
    ckpt = Path(result["checkpoint"])
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard file per rank
    rows = _rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss_step" in r] == [1, 2, 3, 4]  # written once, by rank 0
    evals = [r for r in rows if "eval/log_loss" in r or r.get("kind") == "eval"]
    assert len(evals) >= 2
    preds = sorted((run_dir / "eval").glob("predictions-step-*.csv"))
    assert len(preds) == 2 and len(preds[-1].read_text().splitlines()) == 65
    assert {p.name for p in (run_dir / "logs").iterdir()} == {"rank-0.log", "rank-1.log"}

    # A checkpoint written by 2 ranks consolidates on 1 process: predicting the eval rows with it
    # reproduces the probabilities the 2-rank evaluation wrote at the same step.
    import csv

    import numpy as np

    from launch.predict import main as predict_main

    eval_csv = REPO.parent / "shared" / "fixtures" / "arena" / "eval.csv"
    limited = tmp_path / "eval64.csv"
    with open(eval_csv, newline="") as f, open(limited, "w", newline="") as g:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(g, fieldnames=reader.fieldnames)
        writer.writeheader()
        for i, r in enumerate(reader):
            if i < 64:
                writer.writerow(r)
    out = predict_main([f"checkpoint={ckpt}", f"data.test_path={limited}", f"out={tmp_path / 'sub.csv'}", "tta=false"])
    assert out["rows"] == 64

    def probs(path):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        return {r["id"]: [float(r[k]) for k in ("winner_model_a", "winner_model_b", "winner_tie")] for r in rows}

    want, got = probs(preds[-1]), probs(tmp_path / "sub.csv")
    assert want.keys() == got.keys()
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], atol=1e-5)


SHORT = ["+experiment=cpu_demo", "data.limit_train_rows=48", "data.limit_eval_rows=16", "data.max_length=256",
         "data.global_batch_rows=16", "trainer.eval_every=null", "checkpoint.every_steps=null",
         "logging.progress_bar=false", "model.head_dropout=0.0", "trainer.resume=never"]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss_step"] for r in _rows(run_dir / "metrics.jsonl") if "loss_step" in r]


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    run(compose(SHORT + [f"trainer.run_dir={tmp_path / 'plain'}"]))
    run(compose(SHORT + [f"trainer.run_dir={tmp_path / 'ac'}", "model.activation_checkpointing=true"]))
    plain, ac = _losses(tmp_path / "plain"), _losses(tmp_path / "ac")
    assert len(plain) == 3 and plain == pytest.approx(ac, abs=1e-6)


def test_bf16_weights_with_kahan_recipe_path(tmp_path):
    # The 9B recipe's precision setup (bf16 weights and moments, Kahan-compensated updates,
    # no fp32 master copy), exercised on CPU.
    from trainer.train import Trainer

    cfg = compose(SHORT + [f"trainer.run_dir={tmp_path}", "model.dtype=bfloat16", "parallel.param_dtype=bfloat16",
                           "optim.use_kahan_summation=true", "optim.momentum_dtype=bfloat16",
                           "optim.variance_dtype=bfloat16", "optim.compensation_dtype=bfloat16"])
    trainer = Trainer(cfg)
    result = trainer.fit()
    # The optimizer's (sharded) parameters: after an eval forward FSDP2 leaves the root unsharded.
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(params) == len(list(trainer.model.parameters()))
    assert {p.dtype for p in params} == {torch.bfloat16}
    states = [trainer.optimizer.state[p] for p in params]
    assert all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert all("compensation" in s and s["compensation"].dtype == torch.bfloat16 for s in states)
    assert any(float(s["compensation"].to_local().abs().max()) > 0 for s in states)  # it did compensate
    losses = _losses(tmp_path)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert result.checkpoint is not None and math.isfinite(result.eval_metrics["log_loss"])
    from trainer.distributed import destroy_distributed

    destroy_distributed()
