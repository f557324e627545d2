"""The text_classification task: reading, classes, rendering, the held-out eval split, and an
N-class classifier trained, evaluated, predicted and exported end to end on the shared engine."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scratch
import text_data
from trainer.data.render import BOS_ID, load_tokenizer
from trainer.data.tokenize import load_tokenized
from trainer.datasets import holdout_indices, load_split
from trainer.errors import DataError
from trainer.tasks import TextClassificationTask, build_task

REPO = Path(__file__).resolve().parents[1]
TOK = REPO.parent / "shared" / "fixtures" / "gemma2-tokenizer"
CLASSES = text_data.CLASSES


def _csv(path: Path, rows: list[list], header=("id", "text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---- reading and classes --------------------------------------------------------------------
def test_class_names_from_the_training_file_sorted_and_labels_one_hot(tmp_path):
    f = _csv(tmp_path / "t.csv", [[1, "a", "joy"], [2, "b", "anger"], [3, "c", "sadness"], [4, "d", "joy"]])
    task = TextClassificationTask().resolve(f)
    assert task.class_names == ("anger", "joy", "sadness")
    rows, report = task.read(f)
    assert [r.id for r in rows] == [1, 2, 3, 4] and report.rows_kept == 4
    np.testing.assert_array_equal(np.stack([r.label for r in rows]), np.eye(3, dtype=np.float32)[[1, 0, 2, 1]])


def test_integer_labels_sort_numerically_or_index_given_names(tmp_path):
    f = _csv(tmp_path / "t.csv", [[1, "a", 10], [2, "b", 2], [3, "c", 1]])
    assert TextClassificationTask().resolve(f).class_names == ("1", "2", "10")  # not "1", "10", "2"
    g = _csv(tmp_path / "g.csv", [[1, "a", 0], [2, "b", 2], [3, "c", "neu"]])
    task = TextClassificationTask(class_names=["neg", "neu", "pos"])
    assert [int(r.label.argmax()) for r in task.read(g)[0]] == [0, 2, 1]  # an index, a name


def test_bad_rows_name_file_row_id_and_field(tmp_path):
    f = _csv(tmp_path / "bad.csv", [[1, "fine", "joy"], [2, "x", "grumpy"], [3, "", "joy"], [4, "ok", "anger"]])
    task = TextClassificationTask(class_names=["anger", "joy"])
    with pytest.raises(DataError, match=r"bad\.csv: row 2 \(line 3\), id '2', field 'label': unknown_label: 'grumpy'"):
        task.read(f)
    rows, report = task.read(f, on_bad_row="skip")
    assert [r.id for r in rows] == [1, 4] and dict(report.skipped) == {"unknown_label": 1, "empty_text": 1}
    with pytest.raises(DataError, match=r"bad\.csv: missing column\(s\) \['body'\].*data.text_column='body'"):
        TextClassificationTask(text_column="body").read(f)
    one = _csv(tmp_path / "one.csv", [[1, "a", "joy"], [2, "b", "joy"]])
    with pytest.raises(DataError, match="needs at least 2"):
        TextClassificationTask().resolve(one)


def test_no_id_column_numbers_rows_and_unlabelled_files_have_no_labels(tmp_path):
    f = _csv(tmp_path / "t.csv", [["first text"], ["second text"]], header=("text",))
    rows, _ = TextClassificationTask(class_names=["a", "b"]).read(f)
    assert [(r.id, r.text, r.label) for r in rows] == [(1, "first text", None), (2, "second text", None)]


def test_rendering_is_bos_plus_text_tokens_cut_to_max_length(tmp_path):
    tok = load_tokenizer(str(TOK))
    long = "word " * 100
    f = _csv(tmp_path / "t.csv", [[1, "hello <bos> world", "a"], [2, long, "b"]])
    task = TextClassificationTask().resolve(f)
    ds = load_tokenized(f, task, TOK, 16, cache_dir=tmp_path / "cache")
    first = ds.tokens(0).tolist()
    hf = tok("hello <bos> world", add_special_tokens=True, split_special_tokens=True)["input_ids"]
    assert first == hf and first[0] == BOS_ID and first.count(BOS_ID) == 1  # typed "<bos>" stays text
    assert len(ds.tokens(1)) == 16 and ds.tokens(1)[0] == BOS_ID
    assert ds.labels.shape == (2, 2)


# ---- held-out eval split --------------------------------------------------------------------
def test_holdout_is_seeded_stratified_and_disjoint():
    labels = np.eye(5)[np.random.default_rng(0).integers(0, 5, size=203)]
    kept, held = holdout_indices(labels, 0.2, seed=7)
    assert len(held) == round(0.2 * 203) and sorted(np.concatenate([kept, held])) == list(range(203))
    per_class, held_per_class = labels.sum(0), labels[held].sum(0)
    assert np.all(np.abs(held_per_class - 0.2 * per_class) <= 1)  # each class gives its share
    again_kept, again_held = holdout_indices(labels, 0.2, seed=7)
    np.testing.assert_array_equal(held, again_held)
    assert not np.array_equal(held, holdout_indices(labels, 0.2, seed=8)[1])


def test_eval_fraction_splits_the_training_file_and_keeps_swapped_twins_together(tmp_path, arena_dir):
    cfg = {"task": "arena", "train_path": str(arena_dir / "train.csv"), "eval_path": None, "eval_fraction": 0.25,
           "tokenizer_path": str(TOK), "max_length": 512, "max_tokens": 4096, "on_bad_row": "error",
           "prompt_layout": "interleaved", "swap_ab": True, "limit_train_rows": 80, "cache_dir": str(tmp_path)}
    task = build_task(cfg)
    train = load_split(cfg, task, "train", seed=3)
    held = load_split(cfg, task, "eval", seed=3)
    assert len(held) == 20 and len(train) == 2 * 60 and not held.swapped.any()
    assert not set(held.row_ids.tolist()) & set(train.row_ids.tolist())
    originals, twins = train.row_ids[~train.swapped], train.row_ids[train.swapped]
    np.testing.assert_array_equal(originals, twins)  # both renderings of every kept row, none of a held one
    assert load_split(cfg, task, "eval", seed=3).row_ids.tolist() == held.row_ids.tolist()


# ---- end to end -----------------------------------------------------------------------------
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


TEXT = ["+experiment=cpu_demo", "data/task=text_classification", "data.max_length=64", "data.max_tokens=2048",
        "data.global_batch_rows=25", "trainer.epochs=4", "trainer.eval_every=null", "checkpoint.every_steps=null",
        "logging.progress_bar=false", "model.head=linear"]


@pytest.fixture(scope="module")
def text_run(request, tmp_path_factory):
    d = scratch.module_dir(request, tmp_path_factory, "text")
    train = text_data.write(d / "train.csv", text_data.rows(250, 0))
    evaluation = text_data.write(d / "eval.csv", text_data.rows(100, 1))
    proc = subprocess.run([sys.executable, "-m", "launch.train", *TEXT, "trainer.resume=never", f"data.train_path={train}",
                           f"data.eval_path={evaluation}", f"trainer.run_dir={d / 'run'}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, proc


@pytest.mark.slow
def test_five_named_classes_train_evaluate_and_report_per_class_f1(text_run):
    d, proc = text_run
    result = json.loads((d / "run" / "result.json").read_text())
    assert result["eval_n"] == 100
    for key in ("eval_log_loss", "eval_accuracy", "eval_macro_f1", *(f"eval_f1_{c}" for c in CLASSES)):
        assert np.isfinite(result[key]), key
    assert result["eval_accuracy"] > 0.6 and result["eval_log_loss"] < 1.0  # chance: 0.2 and ln 5 = 1.61
    # per-class F1 and the confusion matrix are over the task's classes
    rows = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    cm = [r for r in rows if r.get("kind") == "confusion_matrix"][-1]
    assert cm["class_names"] == CLASSES and np.asarray(cm["matrix"]).sum() == 100
    preds = next((d / "run" / "eval").glob("predictions-step-*.csv")).read_text().splitlines()
    assert preds[0] == ",".join(["id", *CLASSES, *(f"label_{c}" for c in CLASSES)])
    state = json.loads(next((d / "run" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["task"]["class_names"] == CLASSES and state["model"]["architecture"]["num_labels"] == 5


@pytest.mark.slow
def test_predict_writes_one_column_per_class_and_export_carries_them(text_run, tmp_path):
    from launch.export import main as export_main
    from launch.predict import main as predict_main

    d, _ = text_run
    out = tmp_path / "pred.csv"
    got = predict_main([f"checkpoint={d / 'run'}", f"data.test_path={d / 'eval.csv'}", f"out={out}"])
    assert got["tta"] is False and got["columns"] == ["id", *CLASSES]  # no augmentation for this task
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", *CLASSES] and len(rows) == 100
    probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    result = json.loads((d / "run" / "result.json").read_text())
    assert got["log_loss"] == pytest.approx(result["eval_log_loss"], abs=1e-6)  # the run's own evaluation

    unlabelled = text_data.write(tmp_path / "test.csv", text_data.rows(10, 2), columns=("id", "text"))
    predict_main([f"checkpoint={d / 'run'}", f"data.test_path={unlabelled}", f"out={tmp_path / 'u.csv'}"])
    assert len((tmp_path / "u.csv").read_text().splitlines()) == 11
    with pytest.raises(SystemExit) as exc:
        predict_main([f"checkpoint={d / 'run'}", f"data.test_path={unlabelled}", f"out={tmp_path / 'x.csv'}",
                      "tta=true"])
    assert exc.value.code == 2

    # the HF config's id2label is the task's classes; transformers loads the export and agrees
    import torch
    from transformers import AutoTokenizer, Gemma2ForSequenceClassification

    exported = export_main([f"checkpoint={d / 'run'}", f"out={tmp_path / 'export'}"])
    hf = Gemma2ForSequenceClassification.from_pretrained(exported, attn_implementation="eager").eval()
    assert [hf.config.id2label[i] for i in range(5)] == CLASSES
    tok = AutoTokenizer.from_pretrained(exported)
    first_id = rows[0]["id"]
    src = {r["id"]: r["text"] for r in csv.DictReader(open(d / "eval.csv"))}[first_id]
    with torch.no_grad():
        p = torch.softmax(hf(**tok(src, return_tensors="pt"), use_cache=False).logits.float(), -1)[0]
    np.testing.assert_allclose(p.numpy(), probs[0], atol=1e-5)


@pytest.mark.slow
def test_eval_fraction_holds_out_the_same_rows_on_two_ranks_and_on_resume(tmp_path):
    train = text_data.write(tmp_path / "train.csv", text_data.rows(120, 0))
    args = [*TEXT, f"data.train_path={train}", "data.eval_fraction=0.2", "trainer.epochs=1", "trainer.max_steps=2",
            "checkpoint.every_steps=1"]

    def launch(run_dir: Path, nproc: int, extra=()):
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--standalone", f"--nproc_per_node={nproc}"]
        proc = subprocess.run([*launcher, "-m", "launch.train", *args, *extra, f"trainer.run_dir={run_dir}"],
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return sorted(run_dir.glob("eval/predictions-step-*.csv"))

    def ids(path: Path) -> set[str]:
        return {r["id"] for r in csv.DictReader(open(path))}

    one = launch(tmp_path / "one", 1, ["trainer.resume=never"])
    two = launch(tmp_path / "two", 2, ["trainer.resume=never"])
    labels = np.eye(5)[[CLASSES.index(r["label"]) for r in csv.DictReader(open(train))]]
    _, held = holdout_indices(labels, 0.2, seed=0)
    want = {list(csv.DictReader(open(train)))[i]["id"] for i in held}
    assert ids(one[-1]) == ids(two[-1]) == want and len(want) == 24
    # resume the 1-rank run for 2 more steps: the same held-out rows
    resumed = launch(tmp_path / "one", 1, ["trainer.resume=auto", "trainer.max_steps=4"])
    assert ids(resumed[-1]) == want
