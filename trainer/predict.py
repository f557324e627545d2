"""Prediction over a Kaggle-schema file, with optional A/B-swap test-time augmentation.

Data-parallel: every rank holds the whole (unsharded) model and scores its share of rows;
rank 0 gathers them. With TTA each row is also scored with A and B exchanged, and the
swapped prediction's A/B entries are exchanged back before averaging.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from .datasets import load_split
from .distributed import DistInfo
from .evaluate import predict_probs, write_predictions
from .metrics import classification_metrics

SWAP_AB = [1, 0, 2]  # class order a, b, tie


def predict(model: torch.nn.Module, cfg: DictConfig, info: DistInfo, *, split: str = "test",
            tta: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(row ids, probabilities [N, 3], labels or None) for every row of the split."""
    max_tokens = cfg.data.eval_max_tokens or cfg.data.max_tokens
    ds = load_split(cfg.data, split, info, swap_ab=False, augment=False)
    _, probs = predict_probs(model, ds, info, max_tokens=max_tokens)
    if tta:
        swapped = load_split(cfg.data, split, info, swap_ab=True, augment=False)
        if not np.array_equal(swapped.row_ids, ds.row_ids):
            raise RuntimeError("swapped rendering kept different rows than the original")
        _, probs_sw = predict_probs(model, swapped, info, max_tokens=max_tokens)
        probs = (probs + probs_sw[:, SWAP_AB]) / 2
    return ds.row_ids, probs, ds.labels


def write_submission(path: Path, row_ids: np.ndarray, probs: np.ndarray) -> None:
    write_predictions(path, row_ids, probs)


def score(probs: np.ndarray, labels: np.ndarray) -> dict:
    return classification_metrics(probs, labels)
