"""Write a data file back with predicted probabilities in it: pseudo-labels and teacher columns.

``launch.predict ... out_format=train`` (the recipe's stage 2 input) writes every input row
unchanged, every column kept and in the file's own format (CSV / JSONL / parquet), with the
predicted probabilities in the task's label columns (Arena: ``winner_model_a``,
``winner_model_b``, ``winner_tie``), so the file is a ``data.train_path``.
``out_format=teacher`` keeps the labels and puts the probabilities in ``teacher_<class>``
columns instead, for ``loss.kind=distill``. A column that exists is overwritten in place, a
new one is appended.

Rows are matched by id (the row number for a text-classification file without an ``id``
column). A row the predictions do not cover (a bad row skipped under ``data.on_bad_row=skip``)
is left out of the output, counted and logged at WARNING: the output holds exactly the rows
that carry probabilities.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .data.ingest import BadRow, open_records, parse_id
from .errors import ConfigError
from .tasks import Task

log = logging.getLogger(__name__)

OUT_FORMATS = ("submission", "train", "teacher")


def probability_columns(task: Task, out_format: str) -> tuple[str, ...]:
    """The columns that receive the probabilities (in the task's class order)."""
    if out_format == "teacher":
        return task.teacher_columns
    if out_format == "train":
        if task.label_columns is None:
            raise ConfigError(f"out_format=train: task {task.name} keeps its label as one class name per row, "
                              "not as probabilities; use out_format=teacher (teacher_<class> columns, "
                              "loss.kind=distill)")
        return task.label_columns
    raise ConfigError(f"out_format={out_format!r}: expected one of {list(OUT_FORMATS)}")


def _row_key(rec: dict, index: int, has_ids: bool) -> Any:
    if not has_ids:
        return index
    try:
        return parse_id(rec.get("id"))
    except BadRow:
        return None


def write_with_probabilities(src: Path, out: Path, task: Task, row_ids: np.ndarray, probs: np.ndarray,
                             out_format: str) -> dict[str, int]:
    """Copy ``src`` to ``out`` with ``probs`` (row i for ``row_ids[i]``) in the probability
    columns of ``out_format``; written atomically. Returns row counts (written, left out)."""
    columns = probability_columns(task, out_format)
    if out.suffix.lower() != src.suffix.lower():
        raise ConfigError(f"out={out}: out_format={out_format} writes the input's rows in the input's format "
                          f"({src.suffix}); name the output *{src.suffix}")
    by_id = {(rid.item() if hasattr(rid, "item") else rid): p for rid, p in zip(row_ids, probs)}
    header, records = open_records(src)
    has_ids = "id" in header
    out_header = list(header) + [c for c in columns if c not in header]
    kept: list[dict] = []
    left_out: list[Any] = []
    for index, (_, rec) in enumerate(records, start=1):
        key = _row_key(rec, index, has_ids)
        p = by_id.pop(key, None)
        if p is None:
            left_out.append(rec.get("id", index))
            continue
        row = {k: v for k, v in rec.items() if not k.startswith("__")}
        row.update({c: float(x) for c, x in zip(columns, p)})
        kept.append(row)
    if by_id:  # every prediction must land on a row of the file it was made from
        raise RuntimeError(f"{src}: {len(by_id)} predicted row id(s) are not in the file (first: {next(iter(by_id))})")
    if left_out:
        log.warning("%s: %d row(s) have no prediction (skipped as bad rows) and are left out of %s: ids %s",
                    src, len(left_out), out, left_out[:20])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = {".csv": _write_csv, ".jsonl": _write_jsonl, ".parquet": _write_parquet}[src.suffix.lower()]
    writer(tmp, src, out_header, kept, columns)
    tmp.replace(out)
    return {"written": len(kept), "left_out": len(left_out)}


def _write_csv(path: Path, src: Path, header: list[str], rows: list[dict], columns: tuple[str, ...]) -> None:
    # surrogateescape: bytes the reader kept undecoded go back out as they came in
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for row in rows:
            w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})


def _write_jsonl(path: Path, src: Path, header: list[str], rows: list[dict], columns: tuple[str, ...]) -> None:
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in header if k in row}, ensure_ascii=False) + "\n")


def _write_parquet(path: Path, src: Path, header: list[str], rows: list[dict], columns: tuple[str, ...]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(src)  # the input's column types; probability columns are float64
    fields = [pa.field(n, pa.float64()) if n in columns else schema.field(n) for n in header]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)
