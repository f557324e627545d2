"""Fine-tuning from a transformers Gemma 2 directory: rank 0 reads it, the others get shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _tiny_hf_checkpoint(path: Path) -> None:
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=256000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                       sliding_window=64, num_labels=3, pad_token_id=0)
    Gemma2ForSequenceClassification(cfg).save_pretrained(path)


def _train(run_dir: Path, ckpt: Path, nproc: int) -> list[float]:
    args = ["+experiment=cpu_demo", f"model.name_or_path={ckpt}", "model.head=mlp", "model.head_dropout=0.0",
            "model.query_pre_attn_scalar=null", "data.max_length=256", "data.max_tokens=1024",
            "data.global_batch_rows=8", "data.limit_train_rows=24", "data.limit_eval_rows=16", "trainer.eval_every=null",
            "checkpoint.every_steps=null", "optim.lr=1e-3", f"trainer.run_dir={run_dir}", "logging.progress_bar=false"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    proc = subprocess.run(launcher + ["-m", "launch.train", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss_step"] for r in rows if "loss_step" in r]


@pytest.mark.slow
def test_finetune_from_hf_dir_one_vs_two_ranks(tmp_path):
    ckpt = tmp_path / "hf"
    _tiny_hf_checkpoint(ckpt)
    one = _train(tmp_path / "one", ckpt, 1)
    two = _train(tmp_path / "two", ckpt, 2)
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, abs=1e-5)
