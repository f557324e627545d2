"""Prediction over a data file, with optional test-time augmentation (Arena: A/B swap).

Data-parallel: every rank holds the whole (unsharded) model and scores its share of rows;
rank 0 gathers them. With TTA each row is also scored through the task's augmentation, and
that prediction is mapped back to the original classes (``task.tta_permutation``) before the
two are averaged.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from .datasets import load_split
from .distributed import DistInfo
from .errors import ConfigError
from .evaluate import predict_probs
from .tasks import Task


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
