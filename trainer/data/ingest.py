"""Load Arena preference files (CSV / parquet / JSONL, Kaggle schema) into validated rows.

All validation happens here, at load time, so nothing can fail later in the middle of an
epoch. Each bad row is either fatal (``on_bad_row="error"``, the default) or dropped and
counted (``on_bad_row="skip"``). See docs/data.md for the policy table.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

TEXT_FIELDS = ("prompt", "response_a", "response_b")
LABEL_FIELDS = ("winner_model_a", "winner_model_b", "winner_tie")
REQUIRED = ("id",) + TEXT_FIELDS
BAD_ROW_POLICIES = ("error", "skip")


class DataError(ValueError):
    """A data file (or a row of it) that cannot be used. The message names file, row and field."""


@dataclass
class ArenaRow:
    id: int | str
    prompt: list[str]
    response_a: list[str]
    response_b: list[str]
    label: np.ndarray | None  # float32 [3]: P(A wins), P(B wins), P(tie); None for test files
    model_a: str = ""
    model_b: str = ""

    def swapped(self) -> "ArenaRow":
        """The same comparison with A and B exchanged (labels follow the answers)."""
        label = None if self.label is None else self.label[[1, 0, 2]].copy()
        return ArenaRow(self.id, self.prompt, self.response_b, self.response_a, label,
                        self.model_b, self.model_a)


@dataclass
class IngestReport:
    path: str
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_ids: dict = field(default_factory=dict)  # reason -> [ids]

    def add_skip(self, reason: str, row_id: Any) -> None:
        self.skipped[reason] += 1
        self.skipped_ids.setdefault(reason, []).append(row_id)

    def to_json(self) -> dict:
        return {"path": self.path, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "skipped": dict(self.skipped), "skipped_ids": self.skipped_ids}

    @classmethod
    def from_json(cls, d: dict) -> "IngestReport":
        return cls(d["path"], d["rows_read"], d["rows_kept"], Counter(d["skipped"]),
                   {k: list(v) for k, v in d["skipped_ids"].items()})

    def log_summary(self) -> None:
        if not self.skipped:
            log.info("%s: %d rows, none skipped", self.path, self.rows_kept)
            return
        log.warning("%s: kept %d of %d rows; skipped %s", self.path, self.rows_kept,
                    self.rows_read, dict(self.skipped))
        for reason, ids in self.skipped_ids.items():
            log.warning("%s: skipped (%s) ids: %s", self.path, reason, ids)


class BadRow(Exception):
    """Internal: one row failed one check. ``reason`` is the counter key, ``field`` the column."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


class RowPolicy:
    """Applies ``on_bad_row`` uniformly (used by ingest and by the tokenizer's length check)."""

    def __init__(self, path: str | Path, on_bad_row: str, report: IngestReport):
        if on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
        self.path, self.on_bad_row, self.report = str(path), on_bad_row, report

    def bad(self, err: BadRow, row_id: Any, where: str) -> None:
        if self.on_bad_row == "error":
            raise DataError(f"{self.path}: {where}, id {row_id!r}, field {err.field!r}: "
                            f"{err.reason}: {err.detail}")
        self.report.add_skip(err.reason, row_id)


# ---------------------------------------------------------------- raw readers
# Each yields (location string, raw dict, raw id) per record. Raw text values are str
# (JSON-encoded lists) or already-decoded lists (parquet/JSONL may hold real lists).

def _read_csv(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # Kaggle fields exceed the 128 KiB default
    # surrogateescape keeps undecodable bytes as lone surrogates so ONE bad row can be
    # reported (or skipped) instead of the whole file failing to decode.
    f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        f.close()
        raise DataError(f"{path}: empty file (no header)")

    def rows():
        with f:
            for i, rec in enumerate(reader, start=1):
                if len(rec) != len(header):
                    yield (f"row {i} (line {reader.line_num})",
                           {"__bad__": f"{len(rec)} fields, header has {len(header)}",
                            "id": rec[0] if rec else ""})
                    continue
                yield f"row {i} (line {reader.line_num})", dict(zip(header, rec))
    return header, rows()


def _read_jsonl(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    lines = path.read_bytes().splitlines()
    records = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            raw.decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        try:
            rec = json.loads(raw.decode("utf-8", errors="surrogateescape"))
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            if not valid:  # name the fields that hold the undecodable bytes
                rec["__non_utf8__"] = [k for k, v in rec.items() if _has_surrogate(json.dumps(v, ensure_ascii=False))]
        except ValueError as e:
            rec = {"__bad__": f"invalid JSON line: {e}", "id": ""}
        records.append((f"row {len(records) + 1} (line {n})", rec))
    header = list(records[0][1].keys()) if records else []
    # Columns are defined by the first record; a later record missing a key is a bad row.
    return header, iter(records)


def _read_parquet(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    header = table.column_names
    return header, ((f"row {i}", r) for i, r in enumerate(table.to_pylist(), start=1))


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


# ---------------------------------------------------------------- field parsing

def _has_surrogate(s: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in s)


def _fix_surrogates(s: str) -> str:
    # JSON escapes may hold a lone UTF-16 surrogate (seen in Kaggle data): pair what pairs,
    # replace the rest with U+FFFD so the text is valid UTF-8 for the tokenizer.
    if not _has_surrogate(s):
        return s
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _parse_id(raw: Any) -> int | str:
    if isinstance(raw, bool) or raw is None:
        raise BadRow("bad_id", "id", f"id is {raw!r}")
    if isinstance(raw, (int, np.integer)):
        return int(raw)
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    s = str(raw).strip()
    if not s:
        raise BadRow("bad_id", "id", "empty id")
    if _has_surrogate(s):
        raise BadRow("non_utf8", "id", "id holds bytes that are not UTF-8")
    try:
        return int(s)
    except ValueError:
        return s


def _parse_turns(name: str, raw: Any) -> list[str]:
    if isinstance(raw, str):
        if _has_surrogate(raw):  # only undecodable file bytes can put surrogates here
            raise BadRow("non_utf8", name, "holds bytes that are not UTF-8")
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise BadRow("bad_json", name, f"not valid JSON ({e}): {raw[:60]!r}") from None
    else:
        value = raw
    if not isinstance(value, list):
        raise BadRow("bad_json", name, f"expected a JSON list of turns, got {type(value).__name__}")
    turns = []
    for t in value:
        if t is None:
            turns.append("")  # null turns are real data (Kaggle): an empty text, not an error
        elif isinstance(t, str):
            turns.append(_fix_surrogates(t))
        else:
            raise BadRow("bad_json", name, f"turn is {type(t).__name__}, expected string or null")
    return turns


def _parse_label(rec: dict) -> np.ndarray:
    vals = []
    for name in LABEL_FIELDS:
        raw = rec.get(name)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise BadRow("bad_label", name, f"not a number: {raw!r}") from None
        if not math.isfinite(v) or v < 0:
            raise BadRow("bad_label", name, f"value {v} is not a probability")
        vals.append(v)
    if abs(sum(vals) - 1.0) > 1e-3:
        raise BadRow("bad_label", ",".join(LABEL_FIELDS), f"labels {vals} do not sum to 1")
    return np.asarray(vals, dtype=np.float32)


def parse_record(rec: dict, has_labels: bool) -> ArenaRow:
    if "__bad__" in rec:
        raise BadRow("bad_record", "*", rec["__bad__"])
    if rec.get("__non_utf8__"):
        raise BadRow("non_utf8", ",".join(rec["__non_utf8__"]), "holds bytes that are not UTF-8")
    for name in REQUIRED:
        if name not in rec:
            raise BadRow("missing_field", name, "field absent in this record")
    row_id = _parse_id(rec["id"])
    texts = {name: _parse_turns(name, rec[name]) for name in TEXT_FIELDS}
    n = {k: len(v) for k, v in texts.items()}
    if n["prompt"] == 0:
        raise BadRow("no_turns", "prompt", "conversation has no turns")
    if not n["prompt"] == n["response_a"] == n["response_b"]:
        raise BadRow("turn_mismatch", "response_a,response_b",
                     f"turn counts differ: {n}")
    models = []
    for name in ("model_a", "model_b"):
        m = rec.get(name) or ""
        m = str(m)
        if _has_surrogate(m):
            raise BadRow("non_utf8", name, "holds bytes that are not UTF-8")
        models.append(m)
    label = _parse_label(rec) if has_labels else None
    return ArenaRow(row_id, texts["prompt"], texts["response_a"], texts["response_b"], label,
                    *models)


def read_rows(path: str | Path, on_bad_row: str = "error") -> tuple[list[ArenaRow], IngestReport]:
    """Read and validate one file. Returns the kept rows (file order) and the ingest report.

    File-level problems (unknown extension, missing required column, only some label
    columns) always raise DataError; row-level problems follow ``on_bad_row``.
    """
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (csv, parquet, jsonl)")
    header, records = reader(path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; header is {header}")
    present = [c for c in LABEL_FIELDS if c in header]
    if present and len(present) != len(LABEL_FIELDS):
        raise DataError(f"{path}: label columns incomplete: has {present}, needs {list(LABEL_FIELDS)}")
    has_labels = bool(present)

    report = IngestReport(str(path))
    policy = RowPolicy(path, on_bad_row, report)
    rows: list[ArenaRow] = []
    seen: dict[Any, str] = {}
    for where, rec in records:
        report.rows_read += 1
        raw_id = rec.get("id", "")
        try:
            row = parse_record(rec, has_labels)
            if row.id in seen:
                raise BadRow("duplicate_id", "id", f"id already used at {seen[row.id]}")
        except BadRow as e:
            policy.bad(e, raw_id, where)
            continue
        seen[row.id] = where
        rows.append(row)
    report.rows_kept = len(rows)
    report.log_summary()
    return rows, report
