"""Sharded inference: every rank scores its micro-batches, rank 0 gathers, dedupes and scores.

Eval rows are cut by the same token-budget sampler as training (one "step" holding every row,
no shuffle), so all ranks run the same number of forwards, as FSDP's collectives require.
Padding rows (weight 0) are dropped before gathering; each row id appears exactly once.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.collate import Item, VarlenCollator
from .data.sampler import TokenBudgetSampler
from .data.tokenize import TokenizedDataset
from .distributed import DistInfo, all_gather_objects
from .metrics import classification_metrics
from .tasks import Task
from .tracking import progress

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, ds: TokenizedDataset, info: DistInfo, *,
                  max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(row positions in ds, probabilities [N, num classes]) for every row of ds, on every rank."""
    was_training = model.training
    model.eval()
    sampler = TokenBudgetSampler(ds.lengths, global_batch_rows=len(ds), max_tokens=max_tokens,
                                 world_size=info.world_size, rank=info.rank, shuffle=False)
    collate = VarlenCollator(model.args.num_labels)
    local_idx: list[int] = []
    local_probs: list[np.ndarray] = []
    plan = sampler.plan_step(0, 0)
    bar = progress(len(plan), "eval", info.rank)
    for mb in plan:
        bar.update(1)
        batch = collate([Item(ds.tokens(i), ds.label(i), i, w) for i, w in zip(mb.indices, mb.weights)])
        logits = model(**batch.to(info.device).inputs)
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        for i, w, p in zip(mb.indices, mb.weights, probs):
            if w > 0:
                local_idx.append(int(i))
                local_probs.append(p)
    bar.close()
    model.train(was_training)
    gathered = all_gather_objects((local_idx, local_probs))
    probs_by_row: dict[int, np.ndarray] = {}
    for idx, probs in gathered:
        for i, p in zip(idx, probs):
            probs_by_row.setdefault(i, p)
    if len(probs_by_row) != len(ds):
        raise RuntimeError(f"evaluation covered {len(probs_by_row)} of {len(ds)} rows")
    order = np.arange(len(ds))
    return order, np.stack([probs_by_row[i] for i in order]).astype(np.float64)


def write_predictions(path: Path, task: Task, row_ids: np.ndarray, probs: np.ndarray,
                      labels: np.ndarray | None = None) -> None:
    """``id`` then one probability column per class (the task's output columns: Kaggle's
    ``winner_*`` for Arena) and, when known, ``label_<class>`` columns; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        header = ["id", *task.output_columns]
        if labels is not None:
            header += [f"label_{c}" for c in task.class_names]
        w.writerow(header)
        for k, (rid, p) in enumerate(zip(row_ids, probs)):
            row = [rid.item() if hasattr(rid, "item") else rid, *(f"{x:.8f}" for x in p)]
            if labels is not None:
                row += [f"{x:g}" for x in labels[k]]
            w.writerow(row)
    tmp.replace(path)


def evaluate(model: torch.nn.Module, ds: TokenizedDataset, info: DistInfo, task: Task, *, max_tokens: int,
             predictions_path: Path | None = None) -> dict[str, Any]:
    """Log loss, accuracy, macro/per-class F1 and confusion matrix over all of ds (all ranks)."""
    if ds.labels is None:
        raise ValueError("evaluation needs labelled rows")
    _, probs = predict_probs(model, ds, info, max_tokens=max_tokens)
    metrics: dict[str, Any] = {}
    if info.is_main:
        metrics = classification_metrics(probs, ds.labels, class_names=task.class_names)
        metrics["confusion_matrix"] = np.asarray(metrics["confusion_matrix"]).tolist()
        if predictions_path is not None:
            write_predictions(predictions_path, task, ds.row_ids, probs, ds.labels)
    return metrics
