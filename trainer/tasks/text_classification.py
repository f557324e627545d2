"""Single-text classification: one text column, one label column, any number of classes.

A CSV / parquet / JSONL file with ``data.text_column`` (default ``text``) and
``data.label_column`` (default ``label``; absent in unlabelled files to predict). An ``id``
column is used when present, else the 1-based row number is the id.

Labels are class names or integers. ``data.class_names`` fixes the classes and their order
(an integer label in [0, N) is then an index into it); without it the classes are the distinct
labels of the training file, sorted (numerically when every label is an integer), so every
rank and every resume derives the same list. A label outside the classes is a bad row.

Rendering: ``<bos>`` + the text's tokens, truncated to ``data.max_length`` by keeping the
head; the same ids transformers' Gemma tokenizer gives, so an exported model scores the same
there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trainer.data.ingest import (BadRow, IngestReport, check_record, collect_rows, fix_surrogates, has_surrogate,
                                 open_records, optional_columns, parse_distribution, parse_id,
                                 require_columns)
from trainer.data.render import BOS_ID, text_backend
from trainer.errors import ConfigError, DataError, quote
from trainer.tasks.base import Task

RENDER_VERSION = 1  # bump when rendering changes (it is in the cache key)


@dataclass
class TextRow:
    id: int | str
    text: str
    label: np.ndarray | None  # one-hot float32 [num classes]; None in unlabelled files
    teacher: np.ndarray | None = None  # teacher_<class> probabilities, when the file has them


def label_text(raw: Any) -> str | None:
    """A label cell as text ('3' for 3 or 3.0); None when empty."""
    if raw is None:
        return None
    if isinstance(raw, float):
        if raw != raw:  # NaN: an empty parquet/pandas cell
            return None
        if raw.is_integer():
            return str(int(raw))
    if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
        return str(int(raw))
    text = str(raw).strip()
    return text or None


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def sort_class_names(labels) -> tuple[str, ...]:
    names = set(labels)
    if names and all(_is_int(n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


class TextRenderer:
    """<bos> + text tokens, head kept, at most max_length ids. Picklable."""

    def __init__(self, tokenizer, max_length: int):
        if max_length < 2:
            raise ConfigError(f"data.max_length={max_length}: needs room for <bos> and at least one token")
        self.max_length = int(max_length)
        self._tok = text_backend(tokenizer)

    def build_many(self, rows: Sequence[TextRow]) -> list[np.ndarray]:
        enc = self._tok.encode_batch([r.text for r in rows], add_special_tokens=False)
        return [np.asarray([BOS_ID, *e.ids[: self.max_length - 1]], dtype=np.int32) for e in enc]


class TextClassificationTask(Task):
    name = "text_classification"

    def __init__(self, text_column: str = "text", label_column: str = "label",
                 class_names: Sequence[str] | None = None):
        self.text_column, self.label_column = text_column, label_column
        self._class_names = None if class_names is None else tuple(str(c) for c in class_names)
        if self._class_names is not None:
            if len(self._class_names) < 2:
                raise ConfigError(f"data.class_names={list(self._class_names)}: a classifier needs at least 2 classes")
            if len(set(self._class_names)) != len(self._class_names):
                raise ConfigError(f"data.class_names={list(self._class_names)}: names repeat")

    @property
    def class_names(self) -> tuple[str, ...]:
        if self._class_names is None:
            raise RuntimeError("class names not resolved yet: call resolve(train_path) first")
        return self._class_names

    @property
    def text_fields(self) -> str:
        return self.text_column

    # ---- classes from the training file ----------------------------------------------
    def resolve(self, train_path, on_bad_row="error") -> "TextClassificationTask":
        if self._class_names is not None:
            return self
        path = Path(train_path)
        header, records = open_records(path)
        require_columns(path, header, [self.text_column, self.label_column],
                        f" (data.text_column={self.text_column!r}, data.label_column={self.label_column!r})")
        # Empty cells are bad rows, reported by read(); they name no class.
        found = {t for _, rec in records if "__bad__" not in rec
                 and (t := label_text(rec.get(self.label_column))) is not None and not has_surrogate(t)}
        names = sort_class_names(found)
        if len(names) < 2:
            raise DataError(f"{path}: column {self.label_column!r} holds {len(names)} distinct label(s) "
                            f"{quote(list(names))}; a classifier needs at least 2 (or set data.class_names)")
        return TextClassificationTask(self.text_column, self.label_column, names)

    # ---- rows -------------------------------------------------------------------------
    def _label(self, raw: Any) -> np.ndarray:
        text = label_text(raw)
        if text is None:
            raise BadRow("missing_label", self.label_column, "empty label")
        names = self.class_names
        if text in names:
            index = names.index(text)
        elif _is_int(text) and 0 <= int(text) < len(names):
            index = int(text)  # an index into data.class_names
        else:
            raise BadRow("unknown_label", self.label_column,
                         f"{quote(text, 60)} is not one of the {len(names)} classes {quote(list(names))}")
        onehot = np.zeros(len(names), dtype=np.float32)
        onehot[index] = 1.0
        return onehot

    def _parse(self, rec: dict, index: int, has_labels: bool, has_ids: bool, has_teacher: bool = False) -> TextRow:
        check_record(rec)
        if self.text_column not in rec:
            raise BadRow("missing_field", self.text_column, "field absent in this record")
        row_id = parse_id(rec["id"]) if has_ids else index
        raw = rec[self.text_column]
        if raw is None or (isinstance(raw, float) and raw != raw):
            raise BadRow("empty_text", self.text_column, "no text")
        text = str(raw)
        if has_surrogate(text):
            raise BadRow("non_utf8", self.text_column, "holds bytes that are not UTF-8")
        if not text.strip():
            raise BadRow("empty_text", self.text_column, "the text is empty")
        label = self._label(rec.get(self.label_column)) if has_labels else None
        teacher = parse_distribution(rec, self.teacher_columns, "bad_teacher") if has_teacher else None
        return TextRow(row_id, fix_surrogates(text), label, teacher)

    def read(self, path, on_bad_row="error") -> tuple[list[TextRow], IngestReport]:
        path = Path(path)
        header, records = open_records(path)
        require_columns(path, header, [self.text_column], f" (data.text_column={self.text_column!r})")
        has_labels, has_ids = self.label_column in header, "id" in header
        has_teacher = optional_columns(path, header, self.teacher_columns, "teacher")
        numbered = ((where, dict(rec, __index__=i)) for i, (where, rec) in enumerate(records, start=1))
        return collect_rows(path, numbered,
                            lambda rec: self._parse(rec, rec["__index__"], has_labels, has_ids, has_teacher),
                            on_bad_row, row_id=lambda rec: rec.get("id", "") if has_ids else rec["__index__"])

    def renderer(self, tokenizer, max_length: int) -> TextRenderer:
        return TextRenderer(tokenizer, max_length)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "class_names": list(self.class_names), "text_column": self.text_column,
                "label_column": self.label_column, "render_version": RENDER_VERSION}
