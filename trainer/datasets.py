"""Config -> tokenized splits, on every rank, tokenizing once per cluster (rank 0 fills the cache)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from .data.tokenize import TokenizedDataset, load_tokenized
from .distributed import DistInfo, barrier, broadcast_object

log = logging.getLogger(__name__)

_SPLIT_KEYS = {"train": "data.train_path", "eval": "data.eval_path", "test": "data.test_path"}


def take_rows(ds: TokenizedDataset, n: int) -> TokenizedDataset:
    """The first n rows (a deterministic subset for demos and smoke tests)."""
    if n >= len(ds):
        return ds
    offsets = ds.offsets[: n + 1]
    return TokenizedDataset(ds.row_ids[:n], ds.input_ids[: offsets[-1]], offsets,
                            None if ds.labels is None else ds.labels[:n], ds.swapped[:n], ds.report)


def split_path(dcfg: DictConfig, split: str) -> Path:
    key = _SPLIT_KEYS[split]
    value = dcfg.get(key.split(".", 1)[1])
    if not value:
        raise FileNotFoundError(f"no {split} file configured: set {key}=/path/to/{split}.csv")
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{split} data not found at {path.resolve()}: point {key}=... at a Kaggle-schema "
                                f"CSV/parquet/JSONL file (the shared fixtures live in ../shared/fixtures/arena)")
    return path


def load_split(dcfg: DictConfig, split: str, info: DistInfo, *, swap_ab: bool | None = None,
               augment: bool | None = None) -> TokenizedDataset:
    """Tokenized rows of one split.

    Training with ``data.swap_ab`` appends the A/B-swapped copy of every row (augmentation);
    ``swap_ab=True`` instead returns only the swapped rendering (test-time augmentation).
    Rank 0 tokenizes (and writes the cache) first; the other ranks then read the cache, so a
    cold start costs one tokenization, not world_size of them.
    """
    path = split_path(dcfg, split)
    if augment is None:
        augment = split == "train" and bool(dcfg.swap_ab)
    limit = {"train": dcfg.limit_train_rows, "eval": dcfg.limit_eval_rows}.get(split)

    def load(swapped: bool) -> TokenizedDataset:
        return load_tokenized(path, dcfg.tokenizer_path, dcfg.max_length, prompt_layout=dcfg.prompt_layout,
                              swap_ab=swapped, on_bad_row=dcfg.on_bad_row,
                              max_tokens=dcfg.eval_max_tokens if split != "train" and dcfg.eval_max_tokens
                              else dcfg.max_tokens,
                              cache_dir=dcfg.cache_dir, num_workers=dcfg.num_workers)

    def build() -> TokenizedDataset:
        variants = [bool(swap_ab)] if not augment else [False, True]
        parts = [load(v) for v in variants]
        if limit:
            parts = [take_rows(p, limit) for p in parts]
        return parts[0] if len(parts) == 1 else TokenizedDataset.concat(parts)

    failure: Exception | None = None
    ds = None
    if info.is_main:
        try:
            ds = build()
        except Exception as e:  # noqa: BLE001 - re-raised below, and reported on every rank
            failure = e
    error = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if error is not None:
        raise RuntimeError(f"rank 0 failed to load the {split} split: {error}")
    barrier()
    if not info.is_main:
        ds = build()
    report = ds.report
    if report is not None and info.is_main:
        skipped = sum(report.skipped.values())
        log.info("%s split: %s -> %d rows (%d skipped%s), %d tokens, median length %d", split, path, len(ds),
                 skipped, f": {dict(report.skipped)}" if skipped else "", int(ds.lengths.sum()),
                 int(np.median(ds.lengths)) if len(ds) else 0)
    if len(ds) == 0:
        raise ValueError(f"{split} split {path} has no usable rows")
    return ds
