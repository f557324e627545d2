"""Prediction over a data file, with optional test-time augmentation (Arena: A/B swap), by one
model or an ensemble of teachers.

Data-parallel: every rank holds the whole (unsharded) model and scores its share of rows;
rank 0 gathers them. With TTA each row is also scored through the task's augmentation, and
that prediction is mapped back to the original classes (``task.tta_permutation``) before the
two are averaged. An ensemble loads its teachers one at a time (memory stays one model's)
and averages their probabilities, optionally weighted; TTA applies per teacher.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from .datasets import load_split
from .distributed import DistInfo
from .errors import CheckpointError, ConfigError
from .evaluate import predict_probs
from .tasks import Task

log = logging.getLogger(__name__)


def predict(model: torch.nn.Module, cfg: DictConfig, task: Task, info: DistInfo, *, split: str = "test",
            tta: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(row ids, probabilities [N, num classes], labels or None) for every row of the split."""
    if tta and task.tta_permutation is None:
        raise ConfigError(f"tta=true: task {task.name} has no test-time augmentation (use tta=false)")
    max_tokens = cfg.data.eval_max_tokens or cfg.data.max_tokens
    ds = load_split(cfg.data, task, split, info, swapped=False)
    _, probs = predict_probs(model, ds, info, max_tokens=max_tokens)
    if tta:
        augmented = load_split(cfg.data, task, split, info, swapped=True)
        if not np.array_equal(augmented.row_ids, ds.row_ids):
            raise RuntimeError("the augmented rendering kept different rows than the original")
        _, probs_aug = predict_probs(model, augmented, info, max_tokens=max_tokens)
        probs = (probs + probs_aug[:, list(task.tta_permutation)]) / 2
    return ds.row_ids, probs, ds.labels


@dataclass
class EnsemblePrediction:
    task: Task
    cfg: DictConfig  # the first teacher's config (its data.test_path is the file scored)
    row_ids: np.ndarray
    probs: np.ndarray  # [N, num classes]: the weighted mean of the teachers' probabilities
    labels: np.ndarray | None
    checkpoints: list[str] = field(default_factory=list)  # each teacher's resolved checkpoint
    weights: list[float] = field(default_factory=list)  # normalised, summing to 1
    teacher_probs: list[np.ndarray] = field(default_factory=list)


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ConfigError(f"weights={list(weights)}: {len(weights)} weight(s) for {n} checkpoint(s); give one per "
                          "checkpoint, in the same order")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"weights={list(weights)}: weights must be >= 0, finite, and not all 0")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def predict_ensemble(teachers: Sequence, info: DistInfo, *, weights: Sequence[float] | None = None,
                     tta: bool | None = None, split: str = "test") -> EnsemblePrediction:
    """Score ``split`` with every teacher (``TrainedRun``s from ``consolidate.open_trained``),
    loading one model at a time, and average their probabilities with ``weights``.

    ``tta=None`` uses the task's augmentation when it has one. The teachers must be trained on
    the same task and classes (in the same order) and keep the same rows of the file;
    otherwise a CheckpointError names both.
    """
    w = normalised_weights(weights, len(teachers))
    first = teachers[0]
    task = first.task
    tta = task.tta_permutation is not None if tta is None else tta
    for trained in teachers[1:]:  # refused before any model is loaded
        if trained.task.record() != task.record():
            raise CheckpointError(f"checkpoint {trained.checkpoint} was trained on {trained.task.describe()} "
                                  f"({trained.task.record()}), but {first.checkpoint} on {task.describe()} "
                                  f"({task.record()}); an ensemble needs the same task and classes")
    out: EnsemblePrediction | None = None
    for k, trained in enumerate(teachers):
        model = trained.load_model(info.device)
        ids, probs, labels = predict(model, trained.cfg, task, info, split=split, tta=tta)
        del model  # one teacher in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if out is None:
            out = EnsemblePrediction(task, trained.cfg, ids, np.zeros_like(probs), labels)
        elif not np.array_equal(ids, out.row_ids):
            raise CheckpointError(
                f"checkpoint {trained.checkpoint} kept {len(ids)} rows of {trained.cfg.data[split + '_path']}, "
                f"{first.checkpoint} kept {len(out.row_ids)} (other rows were skipped as bad: different max_length "
                "or data settings); score the teachers with the same data.* settings")
        out.probs += w[k] * probs
        out.teacher_probs.append(probs)
        out.checkpoints.append(str(trained.checkpoint))
        log.info("teacher %d/%d: %s (weight %.3f, tta=%s)", k + 1, len(teachers), trained.checkpoint, w[k], tta)
    out.weights = w
    return out
