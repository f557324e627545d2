"""Ingest: real arena fixtures, every bad-input case under both policies, parquet/JSONL parity."""
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from trainer.errors import DataError
from trainer.tasks.arena import read_rows

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ARENA = SHARED / "fixtures" / "arena"
HEADER = ["id", "model_a", "model_b", "prompt", "response_a", "response_b",
          "winner_model_a", "winner_model_b", "winner_tie"]


def row(i, p=("hi",), a=("A says",), b=("B says",), label=(1, 0, 0), **over):
    r = {"id": str(i), "model_a": "m1", "model_b": "m2", "prompt": json.dumps(list(p)),
         "response_a": json.dumps(list(a)), "response_b": json.dumps(list(b)),
         "winner_model_a": str(label[0]), "winner_model_b": str(label[1]), "winner_tie": str(label[2])}
    r.update(over)
    return r


def write_csv(path, rows, header=HEADER):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("name,n,counts", [("train.csv", 1934, [753, 791, 390]),
                                           ("eval.csv", 457, [189, 180, 88])])
def test_shared_arena_files(name, n, counts):
    rows, report = read_rows(ARENA / name)
    assert len(rows) == n and report.rows_kept == n and not report.skipped
    labels = np.stack([r.label for r in rows])
    assert labels.dtype == np.float32 and labels.sum(0).tolist() == counts
    assert all(isinstance(r.id, int) for r in rows)
    assert sum(1 for r in rows if "" in r.response_a + r.response_b) > 0  # empty answers kept


# (reason, field named in the error, the bad row's overrides)
BAD = [
    ("bad_json", "prompt", {"prompt": '["unterminated'}),
    ("bad_json", "response_a", {"response_a": '{"not": "a list"}'}),
    ("bad_json", "response_b", {"response_b": "[1]"}),
    ("no_turns", "prompt", {"prompt": "[]", "response_a": "[]", "response_b": "[]"}),
    ("turn_mismatch", "response_a", {"prompt": '["q1", "q2"]'}),
    ("bad_label", "winner_model_a", {"winner_model_a": "-1", "winner_tie": "2"}),
    ("bad_label", "winner_tie", {"winner_model_a": "0.5", "winner_tie": "0.2"}),  # sums to 0.7
    ("bad_label", "winner_model_b", {"winner_model_b": "nan"}),
    ("bad_label", "winner_model_b", {"winner_model_b": ""}),
    ("bad_id", "id", {"id": ""}),
]


@pytest.mark.parametrize("reason,field,over", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_row_error_and_skip(tmp_path, caplog, reason, field, over):
    bad = row(77, **over)
    f = write_csv(tmp_path / "bad.csv", [row(1), bad, row(3)])
    with pytest.raises(DataError) as e:
        read_rows(f)
    msg = str(e.value)
    assert "bad.csv" in msg and "row 2" in msg and field in msg and reason in msg
    assert repr(bad["id"]) in msg
    with caplog.at_level(logging.WARNING, logger="trainer.data.ingest"):
        rows, report = read_rows(f, on_bad_row="skip")
    assert [r.id for r in rows] == [1, 3]
    assert dict(report.skipped) == {reason: 1} and report.skipped_ids[reason] == [bad["id"]]
    assert any(reason in m and "ids" in m for m in caplog.messages)


def test_non_utf8_bytes(tmp_path):
    f = write_csv(tmp_path / "enc.csv", [row(1), row(2, a=("XXXX",)), row(3)])
    f.write_bytes(f.read_bytes().replace(b"XXXX", b"caf\xe9 \xff"))  # latin-1 byte, not UTF-8
    with pytest.raises(DataError, match=r"enc\.csv.*id '2'.*response_a.*non_utf8"):
        read_rows(f)
    rows, report = read_rows(f, on_bad_row="skip")
    assert [r.id for r in rows] == [1, 3] and report.skipped_ids == {"non_utf8": ["2"]}
    j = tmp_path / "enc.jsonl"
    j.write_bytes(b"\n".join(json.dumps(r).encode() for r in [row(1), row(2, a=("XXXX",))])
                  .replace(b"XXXX", b"caf\xe9"))
    with pytest.raises(DataError, match=r"enc\.jsonl.*id '2'.*response_a.*non_utf8"):
        read_rows(j)


def test_duplicate_ids(tmp_path):
    f = write_csv(tmp_path / "dup.csv", [row(1), row(2), row(1, a=("other",))])
    with pytest.raises(DataError, match=r"dup\.csv: row 3.*id '1'.*'id'.*duplicate_id.*row 1"):
        read_rows(f)
    rows, report = read_rows(f, on_bad_row="skip")
    assert [r.response_a for r in rows] == [["A says"], ["A says"]]  # first occurrence kept
    assert report.skipped == {"duplicate_id": 1}


def test_missing_column_is_always_fatal(tmp_path):
    header = [h for h in HEADER if h != "response_b"]
    f = write_csv(tmp_path / "cols.csv", [row(1)], header=header)
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=r"cols\.csv.*missing column.*response_b"):
            read_rows(f, on_bad_row=policy)
    f = write_csv(tmp_path / "lab.csv", [row(1)], header=HEADER[:-1])  # winner_tie missing
    with pytest.raises(DataError, match="label columns incomplete"):
        read_rows(f, on_bad_row="skip")


def test_null_and_empty_turns_are_data_and_soft_labels(tmp_path):
    f = write_csv(tmp_path / "ok.csv", [
        row(1, p=("q1", None), a=(None, "x"), b=("", "")),
        row(2, label=(0.7, 0.2, 0.1)),
        row(3, a=("\ud83d\ude00 ok \ud83d",)),  # a valid pair and a lone surrogate escape
    ])
    rows, report = read_rows(f)
    assert rows[0].prompt == ["q1", ""] and rows[0].response_a == ["", "x"]
    np.testing.assert_allclose(rows[1].label, [0.7, 0.2, 0.1])
    assert rows[2].response_a == ["\U0001F600 ok \ufffd"]
    assert rows[1].swapped().label.tolist() == pytest.approx([0.2, 0.7, 0.1])
    assert rows[1].swapped().model_a == "m2"


def test_test_file_without_labels(tmp_path):
    f = write_csv(tmp_path / "test.csv", [row(5), row(6)], header=["id", "prompt", "response_a", "response_b"])
    rows, _ = read_rows(f)
    assert [r.label for r in rows] == [None, None] and rows[0].model_a == ""


def test_parquet_and_jsonl_match_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [row(1, p=("q", None), a=("x", "y"), b=("z", None)), row(2, label=(0, 0, 1))]
    ref, _ = read_rows(write_csv(tmp_path / "a.csv", recs))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    # JSONL may also carry real lists and numbers instead of JSON-in-strings
    live = [dict(r, prompt=json.loads(r["prompt"]), winner_model_a=float(r["winner_model_a"])) for r in recs]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in live))
    for name in ("a.parquet", "a.jsonl", "b.jsonl"):
        got, _ = read_rows(tmp_path / name)
        assert [(r.id, r.prompt, r.response_a, r.label.tolist()) for r in got] == \
               [(r.id, r.prompt, r.response_a, r.label.tolist()) for r in ref], name
    (tmp_path / "c.jsonl").write_text(json.dumps(recs[0]) + "\n{broken\n")
    with pytest.raises(DataError, match=r"c\.jsonl: row 2 \(line 2\)"):
        read_rows(tmp_path / "c.jsonl")


@pytest.mark.parametrize("name,content,message", [
    ("blob.csv", b"id,prompt\n\x00\x01\x02binary", r"blob\.csv: not a text file \(NUL byte at offset 10\)"),
    ("latin.csv", "id,prompt,réponse\n".encode("latin-1"), r"latin\.csv: the first line is not UTF-8 text \(byte 0xe9"),
    ("empty.csv", b"", r"empty\.csv: empty file \(no header line\)"),
    ("header.csv", ",".join(HEADER).encode() + b"\n", r"header\.csv: no data rows"),
    ("x.parquet", b"id,prompt\n1,2\n", r"x\.parquet: not a parquet file"),
    ("x.jsonl", b"not json\n{}\n", r"x\.jsonl: the first line is not a JSON object"),
    ("x.tsv", b"id\tprompt\n", r"x\.tsv: unsupported file type '\.tsv'"),
])
def test_file_level_problems_are_named_without_dumping_bytes(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=message) as e:
            read_rows(f, on_bad_row=policy)
        assert len(str(e.value)) < 300


def test_a_file_whose_every_row_is_bad_is_an_error_even_when_skipping(tmp_path):
    f = write_csv(tmp_path / "allbad.csv", [row(1, label=(2, 0, 0)), row(2, prompt="[")])
    with pytest.raises(DataError, match=r"allbad\.csv: none of its 2 rows is usable \(skipped: \{'bad_label': 1, 'bad_json': 1\}\)"):
        read_rows(f, on_bad_row="skip")
