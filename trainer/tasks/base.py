"""What a task is: the one place that knows a dataset's schema.

A task owns reading rows (with the bad-row policy), rendering a row as token ids, the label
columns and class names, and augmentation with its test-time inverse. Everything downstream
(tokenize cache, token-budget sampler, collator, model, trainer, evaluation, predict, export)
is shared and takes class names and output columns from the task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from trainer.data.ingest import IngestReport


class Row(Protocol):
    id: int | str
    label: np.ndarray | None  # float32 [num classes], a distribution; None in unlabelled files
    teacher: np.ndarray | None  # float32 [num classes]: teacher probabilities (teacher_<class> columns), or None


class Renderer(Protocol):
    """Rows -> token ids (each at most max_length). Picklable: tokenization workers get a copy."""

    def build_many(self, rows: Sequence[Row]) -> list[np.ndarray]: ...


class Task(ABC):
    name: str = ""

    @property
    @abstractmethod
    def class_names(self) -> tuple[str, ...]:
        """Short class names: metric keys (f1_<name>), confusion matrix, logged tables."""

    @property
    def output_columns(self) -> tuple[str, ...]:
        """One probability column per class in predictions and submissions; the HF id2label."""
        return self.class_names

    @property
    def label_columns(self) -> tuple[str, ...] | None:
        """The columns that hold a row's label as one probability per class (pseudo-labels are
        written there), or None when the label is one class name per row."""
        return None

    @property
    def teacher_columns(self) -> tuple[str, ...]:
        """Optional columns with the teachers' probability per class (``loss.kind=distill``);
        validated like labels (finite, >= 0, summing to 1) under the same bad-row policy."""
        return tuple(f"teacher_{c}" for c in self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ---- augmentation -----------------------------------------------------------------
    #: class permutation that maps a prediction on an augmented row back to the original's
    #: classes (test-time augmentation); None when the task has no augmentation.
    tta_permutation: tuple[int, ...] | None = None

    def augment(self, row: Row) -> Row:
        raise NotImplementedError(f"task {self.name} has no augmentation")

    # ---- rows and tokens --------------------------------------------------------------
    @property
    @abstractmethod
    def text_fields(self) -> str:
        """The columns rendered into tokens, as named in row errors (e.g. a row too long)."""

    @abstractmethod
    def read(self, path: str | Path, on_bad_row: str = "error") -> tuple[list[Row], IngestReport]:
        """Validated rows of one file (file order) and the ingest report."""

    @abstractmethod
    def renderer(self, tokenizer, max_length: int) -> Renderer: ...

    def resolve(self, train_path: str | Path, on_bad_row: str = "error") -> "Task":
        """This task with anything it learns from the training file filled in (class names)."""
        return self

    # ---- identity ---------------------------------------------------------------------
    @abstractmethod
    def record(self) -> dict[str, Any]:
        """JSON description stored in checkpoints; equal records = interchangeable tasks.
        Also the tokenize cache's key for everything a rendering depends on."""

    def describe(self) -> str:
        return f"{self.name} ({self.num_classes} classes: {', '.join(self.class_names)})"
