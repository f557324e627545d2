"""Read tabular data files (CSV / parquet / JSONL) into records, and apply the bad-row policy.

Task-agnostic: a task (``trainer/tasks``) checks the header and turns each raw record into a
validated row. All validation happens at load time, so nothing can fail later in the middle of
an epoch. Each bad row is either fatal (``on_bad_row="error"``, the default) or dropped and
counted (``on_bad_row="skip"``). See docs/data.md for the policy table.

File-level problems always raise :class:`DataError` naming the file: a missing file, an unknown
extension, a binary file or a header that is not UTF-8 text, a missing column, a file without
data rows, a file whose every row was skipped.
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
from typing import Any, Callable, Iterable, Iterator

from trainer.errors import DataError, quote

log = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("error", "skip")
SUFFIXES = (".csv", ".jsonl", ".parquet")
_SNIFF_BYTES = 1 << 16

__all__ = ["BAD_ROW_POLICIES", "BadRow", "DataError", "IngestReport", "RowPolicy", "collect_rows",
           "has_surrogate", "fix_surrogates", "open_records", "optional_columns", "parse_distribution", "parse_id"]


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
    """One row failed one check. ``reason`` is the counter key, ``field`` the column."""

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
            raise DataError(f"{self.path}: {where}, id {quote(row_id, 60)}, field {err.field!r}: "
                            f"{err.reason}: {err.detail} (set data.on_bad_row=skip to drop such rows)")
        self.report.add_skip(err.reason, row_id)


# ---------------------------------------------------------------- files -> raw records
# Each reader returns (header, iterator of (location string, raw dict)). Raw values are str for
# CSV; parquet/JSONL may hold real lists, numbers and nulls.

def _sniff_text(path: Path) -> None:
    """Refuse binary files before a reader turns their bytes into a giant garbled header."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: not a text file (NUL byte at offset {nul}); expected a UTF-8 "
                        f"{path.suffix.lstrip('.').upper()} file")
    first_line = head.split(b"\n", 1)[0]
    try:
        first_line.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(first_line) < len(head) or e.start < len(first_line) - 4:  # not a character cut by the sniff
            raise DataError(f"{path}: the first line is not UTF-8 text (byte 0x{first_line[e.start]:02x} at offset "
                            f"{e.start}); save the file as UTF-8") from None


def _read_csv(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # Kaggle fields exceed the 128 KiB default
    # surrogateescape keeps undecodable bytes as lone surrogates so ONE bad row can be
    # reported (or skipped) instead of the whole file failing to decode.
    f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")
    reader = csv.reader(f)
    try:
        header = next(reader, None)
    except csv.Error as e:
        f.close()
        raise DataError(f"{path}: the header line is not valid CSV: {e}") from None
    if header is None:
        f.close()
        raise DataError(f"{path}: empty file (no header line)")

    def rows():
        with f:
            i = 0
            while True:
                try:
                    rec = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # e.g. a NUL byte or an unterminated quote mid-file
                    i += 1
                    yield f"row {i} (line {reader.line_num})", {"__bad__": f"not valid CSV: {e}", "id": ""}
                    continue
                i += 1
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
                rec["__non_utf8__"] = [k for k, v in rec.items() if has_surrogate(json.dumps(v, ensure_ascii=False))]
        except ValueError as e:
            rec = {"__bad__": f"invalid JSON line: {e}", "id": ""}
        records.append((f"row {len(records) + 1} (line {n})", rec))
    header = list(records[0][1].keys()) if records else []
    if records and "__bad__" in records[0][1]:
        raise DataError(f"{path}: the first line is not a JSON object ({records[0][1]['__bad__']}); "
                        "expected one JSON object per line")
    # Columns are defined by the first record; a later record missing a key is a bad row.
    return header, iter(records)


def _read_parquet(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        if f.read(4) != b"PAR1":
            raise DataError(f"{path}: not a parquet file (no PAR1 magic bytes at the start)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable parquet file: {quote(str(e))}") from None
    header = table.column_names
    return header, ((f"row {i}", r) for i, r in enumerate(table.to_pylist(), start=1))


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def open_records(path: str | Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    """(header, (location, raw record) per data row) of a CSV / JSONL / parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" + (" (it is a directory)" if path.is_dir() else ""))
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected one of {', '.join(SUFFIXES)})")
    if reader is not _read_parquet:
        _sniff_text(path)
    return reader(path)


# ---------------------------------------------------------------- field helpers

def has_surrogate(s: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in s)


def fix_surrogates(s: str) -> str:
    # JSON escapes may hold a lone UTF-16 surrogate (seen in Kaggle data): pair what pairs,
    # replace the rest with U+FFFD so the text is valid UTF-8 for the tokenizer.
    if not has_surrogate(s):
        return s
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def parse_id(raw: Any) -> int | str:
    import numpy as np

    if isinstance(raw, bool) or raw is None:
        raise BadRow("bad_id", "id", f"id is {raw!r}")
    if isinstance(raw, (int, np.integer)):
        return int(raw)
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    s = str(raw).strip()
    if not s:
        raise BadRow("bad_id", "id", "empty id")
    if has_surrogate(s):
        raise BadRow("non_utf8", "id", "id holds bytes that are not UTF-8")
    try:
        return int(s)
    except ValueError:
        return s


def parse_distribution(rec: dict, columns: tuple[str, ...], reason: str) -> "numpy.ndarray":  # noqa: F821
    """float32 [len(columns)]: one probability per column, finite, >= 0, summing to 1 (1e-3).
    Labels and teacher probabilities are validated alike; ``reason`` is the bad-row counter key."""
    import numpy as np

    vals = []
    for name in columns:
        raw = rec.get(name)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise BadRow(reason, name, f"not a number: {quote(raw, 60)}") from None
        if not math.isfinite(v) or v < 0:
            raise BadRow(reason, name, f"value {v} is not a probability")
        vals.append(v)
    if abs(sum(vals) - 1.0) > 1e-3:
        raise BadRow(reason, ",".join(columns), f"values {vals} do not sum to 1")
    return np.asarray(vals, dtype=np.float32)


def optional_columns(path: Path, header: list[str], columns: tuple[str, ...], what: str) -> bool:
    """True when the file has all of ``columns``, False when none; a file with only some of
    them is refused (a typo there would otherwise silently drop them all)."""
    present = [c for c in columns if c in header]
    if present and len(present) != len(columns):
        raise DataError(f"{path}: {what} columns incomplete: has {present}, needs {list(columns)}")
    return bool(present)


def check_record(rec: dict) -> None:
    """Record-level problems found by the readers (bad framing, undecodable bytes)."""
    if "__bad__" in rec:
        raise BadRow("bad_record", "*", rec["__bad__"])
    if rec.get("__non_utf8__"):
        raise BadRow("non_utf8", ",".join(rec["__non_utf8__"]), "holds bytes that are not UTF-8")


def require_columns(path: Path, header: list[str], required: Iterable[str], what: str = "") -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}{what}; the file's columns are {quote(header)}")


def collect_rows(path: str | Path, records: Iterable[tuple[str, dict]], parse: Callable[[dict], Any],
                 on_bad_row: str, row_id: Callable[[dict], Any] = lambda rec: rec.get("id", "")
                 ) -> tuple[list, IngestReport]:
    """Parse every record with ``parse`` (raising BadRow), apply the bad-row policy, refuse
    duplicate ids, and refuse a file that yields no usable row. Returns (rows, report)."""
    report = IngestReport(str(path))
    policy = RowPolicy(path, on_bad_row, report)
    rows: list = []
    seen: dict[Any, str] = {}
    for where, rec in records:
        report.rows_read += 1
        try:
            row = parse(rec)
            if row.id in seen:
                raise BadRow("duplicate_id", "id", f"id already used at {seen[row.id]}")
        except BadRow as e:
            policy.bad(e, row_id(rec), where)
            continue
        seen[row.id] = where
        rows.append(row)
    report.rows_kept = len(rows)
    if report.rows_read == 0:
        raise DataError(f"{path}: no data rows (the file has a header but nothing under it)")
    if not rows:
        raise DataError(f"{path}: none of its {report.rows_read} rows is usable (skipped: {dict(report.skipped)})")
    report.log_summary()
    return rows, report
