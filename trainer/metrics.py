"""Training-loss smoothing and classification metrics (single process, no collectives).

``LossBuffer`` smooths the logged training loss over recent optimizer steps. The trainer pushes
one value per step: the step loss already reduced across ranks (row-weighted) once per step --
reducing inside the micro-batch loop would distort it.

``classification_metrics`` scores gathered validation predictions: log loss (the competition
metric), accuracy and F1, matching sklearn's definitions (see the function's docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["LossBuffer", "classification_metrics"]


class LossBuffer:
    """Fixed-size circular buffer of (value, weight) pairs with a weighted mean.

    Storage is preallocated once (no growing lists); ``push`` overwrites the oldest entry when
    full. ``state_dict`` holds only tensors and ints, so it saves with ``torch.save(...,
    weights_only=True)`` or DCP and needs no pickled objects.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        self.size = int(size)
        # float64: summing thousands of losses in fp32 would add visible noise to the log.
        self._values = torch.zeros(self.size, dtype=torch.float64)
        self._weights = torch.zeros(self.size, dtype=torch.float64)
        self._pos = 0  # next slot to write
        self._count = 0  # filled slots (<= size)

    def push(self, value: float | torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        # float() on a tensor syncs with the device; that is once per optimizer step.
        self._values[self._pos] = float(value)
        self._weights[self._pos] = float(weight)
        self._pos = (self._pos + 1) % self.size
        self._count = min(self._count + 1, self.size)

    def mean(self) -> float:
        """Weighted mean of the filled entries; NaN when empty or all weights are zero."""
        if self._count == 0:
            return float("nan")
        v, w = self._values[: self._count], self._weights[: self._count]
        total = float(w.sum())
        return float((v * w).sum()) / total if total > 0 else float("nan")

    def __len__(self) -> int:
        return self._count

    def _ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled entries, oldest first."""
        if self._count < self.size:
            idx = torch.arange(self._count)
        else:
            idx = (torch.arange(self.size) + self._pos) % self.size
        return self._values[idx], self._weights[idx]

    def state_dict(self) -> dict[str, Any]:
        values, weights = self._ordered()
        return {"size": self.size, "values": values.clone(), "weights": weights.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore entries oldest-first; if this buffer is smaller, keep the newest ones."""
        values = torch.as_tensor(state["values"], dtype=torch.float64).flatten()
        weights = torch.as_tensor(state["weights"], dtype=torch.float64).flatten()
        if values.shape != weights.shape:
            raise ValueError("values and weights differ in length")
        values, weights = values[-self.size :], weights[-self.size :]
        n = values.numel()
        self._values.zero_()
        self._weights.zero_()
        self._values[:n] = values
        self._weights[:n] = weights
        self._count = n
        self._pos = n % self.size


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    eps: float = 1e-15,
    *,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Log loss, accuracy, per-class and macro F1 and the confusion matrix.

    Args:
        probs: [N, C] predicted probabilities.
        labels: [N, C] one-hot or soft targets (rows summing to 1).
        eps: probabilities are clipped to [eps, 1 - eps] and rows renormalised before the log,
            as sklearn's ``log_loss(eps=1e-15)`` did.
        class_names: the task's class names, for the ``f1_<name>`` keys (one per class).

    Returns a dict with ``log_loss`` (mean over rows of ``-sum_c y_c log p_c``, which for one-hot
    labels is sklearn's log_loss), ``accuracy`` (argmax of probs vs argmax of labels; a soft-label
    tie goes to the lower class index), ``f1_<name>`` per class, ``macro_f1``, ``confusion_matrix``
    ([C, C] int64, rows = true class, columns = predicted) and ``n``.

    F1 follows sklearn ``f1_score(average="macro", zero_division=0)``: per class
    ``F1 = 2 TP / (2 TP + FP + FN)``, 0 when that denominator is 0; a class that is true for some
    rows but never predicted therefore scores 0 and counts in the macro mean. As in sklearn with
    default ``labels``, the macro mean runs over classes present in the true or predicted labels
    only (a class absent from both is reported as ``f1_<name> = 0`` but not averaged).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must both be [N, C]")
    n, num_classes = probs.shape
    if n == 0:
        raise ValueError("no predictions")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")

    clipped = np.clip(probs, eps, 1 - eps)
    clipped /= clipped.sum(axis=1, keepdims=True)
    log_loss = float(-(labels * np.log(clipped)).sum(axis=1).mean())

    y_true = labels.argmax(axis=1)
    y_pred = probs.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)

    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp  # predicted c, true something else
    fn = confusion.sum(axis=1) - tp  # true c, predicted something else
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    present = denom > 0  # class occurs in y_true or y_pred

    out: dict[str, Any] = {
        "log_loss": log_loss,
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": float(f1[present].mean()),
    }
    for name, value in zip(class_names, f1):
        out[f"f1_{name}"] = float(value)
    out["confusion_matrix"] = confusion
    out["n"] = int(n)
    return out
