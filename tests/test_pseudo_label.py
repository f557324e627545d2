"""Teacher / pseudo-label columns: validated at ingest like labels, carried through swap and
cache to the batch, and written back into a copy of the input file (trainer/pseudo_label.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from trainer.data.collate import TokenizedTorchDataset, VarlenCollator
from trainer.data.tokenize import load_tokenized
from trainer.errors import ConfigError, DataError
from trainer.pseudo_label import write_with_probabilities
from trainer.tasks import ArenaTask, TextClassificationTask

ARENA = ArenaTask()
TURN = json.dumps(["hi"])


def _arena_rows(n=4, teacher=True):
    rows = []
    for i in range(n):
        r = {"id": 100 + i, "model_a": "m1", "model_b": "m2", "prompt": TURN, "response_a": json.dumps([f"a{i}"]),
             "response_b": json.dumps([f"b{i}"]), "winner_model_a": 1, "winner_model_b": 0, "winner_tie": 0}
        if teacher:
            r.update(teacher_a=0.6, teacher_b=0.3, teacher_tie=0.1)
        rows.append(r)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_teacher_columns_are_read_swapped_cached_and_batched(tmp_path, tokenizer_dir):
    path = _write_csv(tmp_path / "t.csv", _arena_rows())
    rows, _ = ARENA.read(path)
    np.testing.assert_allclose(rows[0].teacher, [0.6, 0.3, 0.1])
    np.testing.assert_allclose(rows[0].swapped().teacher, [0.3, 0.6, 0.1])  # follows the answers, like labels
    for cache in (tmp_path / "c", tmp_path / "c"):  # built, then a cache hit
        ds = load_tokenized(path, ARENA, tokenizer_dir, 256, swap_ab=True, cache_dir=cache)
        np.testing.assert_allclose(ds.teacher, [[0.3, 0.6, 0.1]] * 4)
    batch = VarlenCollator(3)([TokenizedTorchDataset(ds)[i] for i in range(3)])
    assert batch.teacher.shape == (3, 3) and batch.teacher.dtype.is_floating_point
    plain = load_tokenized(_write_csv(tmp_path / "n.csv", _arena_rows(teacher=False)), ARENA, tokenizer_dir, 256,
                           cache_dir=None)
    assert plain.teacher is None and VarlenCollator(3)([TokenizedTorchDataset(plain)[0]]).teacher is None


@pytest.mark.parametrize("value,message", [("0.9", "do not sum to 1"), ("nan", "not a probability"),
                                           ("x", "not a number"), ("-0.1", "not a probability")])
def test_bad_teacher_values_follow_the_bad_row_policy(tmp_path, value, message):
    rows = _arena_rows()
    rows[2]["teacher_a"] = value
    path = _write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(DataError, match=rf"t\.csv: row 3 .*id '102', field 'teacher_a.*bad_teacher: .*{message}"):
        ARENA.read(path)
    kept, report = ARENA.read(path, "skip")
    assert [r.id for r in kept] == [100, 101, 103] and report.skipped == {"bad_teacher": 1}


def test_some_teacher_columns_without_the_others_are_refused(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "teacher_tie"} for r in _arena_rows()]
    with pytest.raises(DataError, match=r"teacher columns incomplete: has \['teacher_a', 'teacher_b'\]"):
        ARENA.read(_write_csv(tmp_path / "t.csv", rows))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("out_format", ["train", "teacher"])
def test_written_file_keeps_every_row_and_column_and_reads_back(tmp_path, suffix, out_format):
    rows = _arena_rows(5, teacher=False)
    rows[1]["extra"] = None if suffix != ".csv" else ""
    for r in rows:
        r.setdefault("extra", "x")
    src = tmp_path / f"in{suffix}"
    if suffix == ".csv":
        _write_csv(src, rows)
    elif suffix == ".jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), src)
    ids = np.array([104, 100, 101, 103])  # row 102 was skipped (say, a bad row): left out
    probs = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.1]])
    out = tmp_path / f"out{suffix}"
    counts = write_with_probabilities(src, out, ARENA, ids, probs, out_format)
    assert counts == {"written": 4, "left_out": 1}
    back, report = ARENA.read(out)
    assert [r.id for r in back] == [100, 101, 103, 104] and not report.skipped
    expect = {int(i): p for i, p in zip(ids, probs)}
    for r in back:
        got = r.label if out_format == "train" else r.teacher
        np.testing.assert_allclose(got, expect[r.id], rtol=0, atol=1e-7)  # full precision written
        if out_format == "teacher":
            np.testing.assert_array_equal(r.label, [1, 0, 0])  # the labels are kept
        original = rows[r.id - 100]
        assert (r.prompt, r.response_a, r.response_b, r.model_a) == (["hi"], [f"a{r.id - 100}"],
                                                                      [f"b{r.id - 100}"], original["model_a"])


def test_refusals(tmp_path):
    src = _write_csv(tmp_path / "in.csv", _arena_rows(2))
    with pytest.raises(ConfigError, match=r"name the output \*\.csv"):
        write_with_probabilities(src, tmp_path / "o.jsonl", ARENA, np.array([100]), np.ones((1, 3)) / 3, "train")
    text = TextClassificationTask(class_names=["neg", "pos"])
    with pytest.raises(ConfigError, match="use out_format=teacher"):
        write_with_probabilities(src, tmp_path / "o.csv", text, np.array([100]), np.ones((1, 2)) / 2, "train")
    with pytest.raises(RuntimeError, match="not in the file"):
        write_with_probabilities(src, tmp_path / "o.csv", ARENA, np.array([999]), np.ones((1, 3)) / 3, "train")
