"""The LMSYS Chatbot Arena task: given a prompt and two answers, predict A wins / B wins / tie.

Schema (Kaggle "LMSYS Chatbot Arena Human Preference" ``train.csv``):
``id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie``.
``prompt``/``response_a``/``response_b`` are JSON lists of strings, one per turn; the three
``winner_*`` columns hold the (possibly soft) label and are absent in test files. This module
is the only place that knows it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.ingest import (BadRow, IngestReport, check_record, collect_rows, fix_surrogates, has_surrogate,
                                 open_records, optional_columns, parse_distribution, parse_id, require_columns)
from trainer.errors import quote
from trainer.tasks.arena_prompt import PromptBuilder, template_key
from trainer.tasks.base import Task

TEXT_FIELDS = ("prompt", "response_a", "response_b")
LABEL_FIELDS = ("winner_model_a", "winner_model_b", "winner_tie")
CLASS_NAMES = ("a", "b", "tie")
TEACHER_FIELDS = tuple(f"teacher_{c}" for c in CLASS_NAMES)  # teacher probabilities (loss.kind=distill)
REQUIRED = ("id",) + TEXT_FIELDS
SWAP_AB = (1, 0, 2)  # A/B exchanged: class a <-> b, tie stays


@dataclass
class ArenaRow:
    id: int | str
    prompt: list[str]
    response_a: list[str]
    response_b: list[str]
    label: np.ndarray | None  # float32 [3]: P(A wins), P(B wins), P(tie); None for test files
    model_a: str = ""
    model_b: str = ""
    teacher: np.ndarray | None = None  # float32 [3]: the teachers' probabilities, when the file has them

    def swapped(self) -> "ArenaRow":
        """The same comparison with A and B exchanged (labels and teacher probabilities follow
        the answers)."""
        label = None if self.label is None else self.label[list(SWAP_AB)].copy()
        teacher = None if self.teacher is None else self.teacher[list(SWAP_AB)].copy()
        return ArenaRow(self.id, self.prompt, self.response_b, self.response_a, label,
                        self.model_b, self.model_a, teacher)


def _parse_turns(name: str, raw: Any) -> list[str]:
    if isinstance(raw, str):
        if has_surrogate(raw):  # only undecodable file bytes can put surrogates here
            raise BadRow("non_utf8", name, "holds bytes that are not UTF-8")
        try:
            value = json.loads(raw)
        except ValueError as e:
            raise BadRow("bad_json", name, f"not valid JSON ({e}): {quote(raw[:60])}") from None
    else:
        value = raw
    if not isinstance(value, list):
        raise BadRow("bad_json", name, f"expected a JSON list of turns, got {type(value).__name__}")
    turns = []
    for t in value:
        if t is None:
            turns.append("")  # null turns are real data (Kaggle): an empty text, not an error
        elif isinstance(t, str):
            turns.append(fix_surrogates(t))
        else:
            raise BadRow("bad_json", name, f"turn is {type(t).__name__}, expected string or null")
    return turns


def parse_record(rec: dict, has_labels: bool, has_teacher: bool = False) -> ArenaRow:
    check_record(rec)
    for name in REQUIRED:
        if name not in rec:
            raise BadRow("missing_field", name, "field absent in this record")
    row_id = parse_id(rec["id"])
    texts = {name: _parse_turns(name, rec[name]) for name in TEXT_FIELDS}
    n = {k: len(v) for k, v in texts.items()}
    if n["prompt"] == 0:
        raise BadRow("no_turns", "prompt", "conversation has no turns")
    if not n["prompt"] == n["response_a"] == n["response_b"]:
        raise BadRow("turn_mismatch", "response_a,response_b", f"turn counts differ: {n}")
    models = []
    for name in ("model_a", "model_b"):
        m = str(rec.get(name) or "")
        if has_surrogate(m):
            raise BadRow("non_utf8", name, "holds bytes that are not UTF-8")
        models.append(m)
    label = parse_distribution(rec, LABEL_FIELDS, "bad_label") if has_labels else None
    teacher = parse_distribution(rec, TEACHER_FIELDS, "bad_teacher") if has_teacher else None
    return ArenaRow(row_id, texts["prompt"], texts["response_a"], texts["response_b"], label, *models, teacher)


def read_rows(path: str | Path, on_bad_row: str = "error") -> tuple[list[ArenaRow], IngestReport]:
    """Read and validate one Arena file. Returns the kept rows (file order) and the ingest report.

    File-level problems (see trainer/data/ingest.py, plus a missing required column or only
    some label columns) always raise DataError; row-level problems follow ``on_bad_row``.
    """
    path = Path(path)
    header, records = open_records(path)
    require_columns(path, header, REQUIRED, " (an Arena file needs id, prompt, response_a, response_b)")
    has_labels = optional_columns(path, header, LABEL_FIELDS, "label")
    has_teacher = optional_columns(path, header, TEACHER_FIELDS, "teacher")
    return collect_rows(path, records, lambda rec: parse_record(rec, has_labels, has_teacher), on_bad_row)


class ArenaTask(Task):
    """Pairwise preference: 3 classes (A wins, B wins, tie), A/B-swap augmentation and TTA."""

    name = "arena"
    tta_permutation = SWAP_AB

    def __init__(self, prompt_layout: str = "interleaved"):
        self.prompt_layout = prompt_layout

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES

    @property
    def output_columns(self) -> tuple[str, ...]:
        return LABEL_FIELDS  # Kaggle submission columns

    @property
    def label_columns(self) -> tuple[str, ...]:
        return LABEL_FIELDS

    @property
    def text_fields(self) -> str:
        return ",".join(TEXT_FIELDS)

    def augment(self, row: ArenaRow) -> ArenaRow:
        return row.swapped()

    def read(self, path, on_bad_row="error"):
        return read_rows(path, on_bad_row)

    def renderer(self, tokenizer, max_length: int) -> PromptBuilder:
        return PromptBuilder(tokenizer, max_length, self.prompt_layout)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "class_names": list(CLASS_NAMES), "prompt_layout": self.prompt_layout,
                "template": template_key(self.prompt_layout)}
