"""Export a sharded checkpoint to safetensors and predict with / without A/B-swap TTA."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import scratch
from trainer.config import compose
from trainer.consolidate import checkpoint_config, load_model_from_checkpoint, resolve_checkpoint
from trainer.data.collate import Item, VarlenCollator
from trainer.model.hf_io import load_pretrained
from trainer.train import run

REPO = Path(__file__).resolve().parents[1]
EVAL_CSV = REPO.parent / "shared" / "fixtures" / "arena" / "eval.csv"
TINY = ["+experiment=cpu_demo", "model.hidden_size=32", "model.intermediate_size=64", "model.head_dim=16",
        "model.query_pre_attn_scalar=16", "data.max_length=256", "data.max_tokens=2048", "data.global_batch_rows=16",
        "data.limit_train_rows=48", "data.limit_eval_rows=null", "trainer.eval_every=null",
        "checkpoint.every_steps=null", "logging.progress_bar=false", "trainer.resume=never"]


@pytest.fixture(scope="module", params=["mlp", "linear"])
def trained(request, tmp_path_factory):
    run_dir = scratch.module_dir(request, tmp_path_factory, f"run-{request.param}")
    result = run(compose(TINY + [f"model.head={request.param}", f"trainer.run_dir={run_dir}"]))
    return request.param, run_dir, result


def _batch(n: int = 4):
    rng = np.random.default_rng(0)
    items = [Item(rng.integers(3, 256000, size=int(k)), None, i, 1.0) for i, k in enumerate(rng.integers(5, 40, n))]
    return VarlenCollator(3)(items).inputs


def test_export_round_trip(trained, tmp_path):
    head, run_dir, _ = trained
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "launch.export", f"checkpoint={run_dir}", f"out={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    ckpt = resolve_checkpoint(run_dir)
    reference = load_model_from_checkpoint(ckpt, checkpoint_config(ckpt))
    exported = load_pretrained(out, head=head).eval()
    batch = _batch()
    with torch.no_grad():
        want = reference(**batch)
        torch.testing.assert_close(exported(**batch), want, rtol=0, atol=0)
    if head == "linear":  # transformers loads it and agrees, one sequence at a time
        from transformers import Gemma2ForSequenceClassification

        hf = Gemma2ForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
        cu = batch["cu_seqlens"].tolist()
        ids = batch["input_ids"][0]
        with torch.no_grad():
            got = torch.cat([hf(input_ids=ids[a:b][None], use_cache=False).logits for a, b in zip(cu[:-1], cu[1:])])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_export_streams_shards_with_an_index_in_the_training_dtype(trained, tmp_path):
    """shard_gb tiny: several safetensors shards + model.safetensors.index.json, as transformers
    writes them; every loader reads them back to the same logits. A bf16 run exports bf16."""
    import json

    from launch.export import main as export_main
    from safetensors import safe_open

    head, run_dir, _ = trained
    out = export_main([f"checkpoint={run_dir}", f"out={tmp_path / 'sharded'}", "shard_gb=0.00002"])  # 20 kB shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()
    sizes = []
    for name in shards:
        with safe_open(out / name, framework="pt") as f:
            tensors = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(tensors) <= 20_000 or len(tensors) == 1  # a larger tensor (the embedding) sits alone
        sizes.append(sum(tensors))
    assert index["metadata"]["total_size"] == sum(sizes)
    ckpt = resolve_checkpoint(run_dir)
    batch = _batch()
    with torch.no_grad():
        want = load_model_from_checkpoint(ckpt, checkpoint_config(ckpt))(**batch)
        torch.testing.assert_close(load_pretrained(out, head=head).eval()(**batch), want, rtol=0, atol=0)
    if head == "linear":
        from transformers import Gemma2ForSequenceClassification

        hf = Gemma2ForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
        assert hf.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
        return
    # bf16 weights stay bf16 (the mlp-head leg: one more tiny run, 1 step, bf16 + Kahan)
    bf16_dir = tmp_path / "bf16-run"
    run(compose(TINY + ["model.dtype=bfloat16", "optim.use_kahan_summation=true", "trainer.max_steps=1",
                        f"trainer.run_dir={bf16_dir}"]))
    out16 = export_main([f"checkpoint={bf16_dir}", f"out={tmp_path / 'bf16'}"])
    with safe_open(out16 / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _read_submission(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    probs = np.array([[float(r["winner_model_a"]), float(r["winner_model_b"]), float(r["winner_tie"])] for r in rows])
    return [r["id"] for r in rows], probs


def test_predict_matches_evaluation_and_tta(trained, tmp_path):
    from launch.predict import main as predict_main

    _, run_dir, result = trained
    with open(EVAL_CSV) as f:
        want_ids = [r["id"] for r in csv.DictReader(f)]
    plain = predict_main([f"checkpoint={run_dir}", f"data.test_path={EVAL_CSV}", f"out={tmp_path / 'plain.csv'}",
                          "tta=false"])
    ids, probs = _read_submission(tmp_path / "plain.csv")
    assert ids == want_ids and plain["rows"] == 457
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # Same checkpoint, same rows: the log loss the training run's final evaluation reported.
    assert plain["log_loss"] == pytest.approx(result.eval_metrics["log_loss"], abs=1e-6)

    tta = predict_main([f"checkpoint={run_dir}", f"data.test_path={EVAL_CSV}", f"out={tmp_path / 'tta.csv'}"])
    ids_tta, probs_tta = _read_submission(tmp_path / "tta.csv")
    assert ids_tta == want_ids
    np.testing.assert_allclose(probs_tta.sum(1), 1.0, atol=1e-6)
    assert not np.allclose(probs_tta, probs)  # the swapped view really was averaged in
    assert np.isfinite(tta["log_loss"])


@pytest.mark.slow
def test_predict_unlabelled_file_under_torchrun(trained, tmp_path):
    _, run_dir, _ = trained
    test_csv = tmp_path / "test.csv"
    with open(EVAL_CSV) as f, open(test_csv, "w", newline="") as g:
        reader = csv.DictReader(f)
        cols = ["id", "prompt", "response_a", "response_b"]  # the Kaggle test schema: no labels
        w = csv.DictWriter(g, fieldnames=cols)
        w.writeheader()
        for i, r in enumerate(reader):
            if i < 40:
                w.writerow({c: r[c] for c in cols})
    out = tmp_path / "sub.csv"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "launch.predict", f"checkpoint={run_dir}", f"data.test_path={test_csv}", f"out={out}"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, probs = _read_submission(out)
    assert len(ids) == 40 and len(set(ids)) == 40
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_predict_user_errors_are_one_line_exit_2(trained, tmp_path, capsys):
    from launch.predict import main as predict_main

    _, run_dir, _ = trained
    empty = tmp_path / "empty.csv"
    empty.write_text("id,prompt,response_a,response_b\n")
    blob = tmp_path / "blob.csv"
    blob.write_bytes(b"\x00\x01PK\x03\x04" + bytes(range(256)) * 100)
    cases = [([f"data.test_path={empty}"], ["empty.csv", "no data rows"]),
             ([f"data.test_path={blob}"], ["blob.csv", "not a text file"]),
             ([f"data.test_path={EVAL_CSV}", "model.num_hidden_layers=3"], ["model.num_hidden_layers", "3", "2"]),
             ([f"data.test_path={EVAL_CSV}", "model.hiden_size=3"], ["hiden_size"]),
             (["data.test_path=null"], ["data.test_path"])]
    for extra, must in cases:
        with pytest.raises(SystemExit) as exc:
            predict_main([f"checkpoint={run_dir}", f"out={tmp_path / 'o.csv'}", *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert all(m in err for m in must), (must, err)
    with pytest.raises(SystemExit):
        predict_main([f"checkpoint={tmp_path / 'nowhere'}", f"out={tmp_path / 'o.csv'}"])
    assert "no such file or directory" in capsys.readouterr().err


def test_predict_bad_rows_follow_on_bad_row(trained, tmp_path, capsys):
    """A bad row in the file to score: one line naming file, row, id and field (exit 2), or
    with data.on_bad_row=skip, scored without it and counted (left out of a pseudo-label file)."""
    from launch.predict import main as predict_main

    _, run_dir, _ = trained
    with open(EVAL_CSV, newline="") as f:
        rows = [r for _, r in zip(range(12), csv.DictReader(f))]
    rows[3]["response_a"] = "[not json"
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as g:
        w = csv.DictWriter(g, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(SystemExit) as exc:
        predict_main([f"checkpoint={run_dir}", f"data.test_path={bad}", f"out={tmp_path / 'o.csv'}", "tta=false"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert all(m in err for m in ("bad.csv: row 4", f"id '{rows[3]['id']}'", "field 'response_a'", "bad_json")), err
    out = tmp_path / "pseudo.csv"
    res = predict_main([f"checkpoint={run_dir}", f"data.test_path={bad}", f"out={out}", "tta=false",
                        "data.on_bad_row=skip", "out_format=train"])
    assert res["rows"] == res["written"] == 11 and res["left_out"] == 1
    with open(out, newline="") as f:
        assert [r["id"] for r in csv.DictReader(f)] == [r["id"] for i, r in enumerate(rows) if i != 3]


def test_an_ensemble_of_another_task_or_weight_count_is_refused():
    from types import SimpleNamespace

    from trainer.errors import CheckpointError, ConfigError
    from trainer.predict import normalised_weights, predict_ensemble
    from trainer.tasks import ArenaTask, TextClassificationTask

    arena = SimpleNamespace(task=ArenaTask(), checkpoint="runs/a")
    text = SimpleNamespace(task=TextClassificationTask(class_names=["neg", "pos"]), checkpoint="runs/t")
    with pytest.raises(CheckpointError, match=r"runs/t was trained on text_classification \(2 classes.*but runs/a"):
        predict_ensemble([arena, text], info=None)
    with pytest.raises(ConfigError, match="2 weight"):
        normalised_weights([1, 2], 3)
    with pytest.raises(ConfigError, match=">= 0"):
        normalised_weights([1, -1], 2)
    assert normalised_weights([3, 1], 2) == [0.75, 0.25] and normalised_weights(None, 4) == [0.25] * 4
