"""Config -> tokenized splits: the one ``load_split``.

Every rank calls it with the same arguments and gets the same rows. With a process group, rank
0 tokenizes first (filling the cache) and the others then read the cache, so a cold start costs
one tokenization, not world_size of them.

Splits: ``train`` (with ``data.swap_ab=double|full`` it also holds the A/B-swapped copy of
every row: the original rows first, then their twins in the same order),
``eval`` and ``test``. With no eval file and ``data.eval_fraction`` set, ``eval`` is a seeded,
label-stratified share of the training file held out from ``train`` (the same rows on every
rank and every resume: a pure function of the file, the fraction and ``trainer.seed``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .data.sampler import TokenBudgetSampler
from .data.tokenize import DEFAULT_CACHE_DIR, TokenizedDataset, load_tokenized
from .config import swap_mode
from .distributed import DistInfo, rank0_result
from .errors import ConfigError, DataError
from .tasks import Task, build_task

log = logging.getLogger(__name__)

_SPLIT_KEYS = {"train": "data.train_path", "eval": "data.eval_path", "test": "data.test_path"}
SPLITS = tuple(_SPLIT_KEYS)


def resolve_task(dcfg: Mapping[str, Any], info: DistInfo | None = None) -> Task:
    """The configured task with what it learns from the training file (class names), read
    once by rank 0 and shared, so every rank trains the same classes in the same order."""
    task = build_task(dcfg)
    names = rank0_result(lambda: list(task.resolve(dcfg["train_path"], dcfg["on_bad_row"]).class_names), info)
    return build_task(dcfg, class_names=names)


def take_rows(ds: TokenizedDataset, n: int | None) -> TokenizedDataset:
    """The first n rows (a deterministic subset for demos and smoke tests)."""
    return ds if not n or n >= len(ds) else ds.take(np.arange(n))


def holds_out_eval(dcfg: Mapping[str, Any]) -> bool:
    """True when the eval split is carved out of the training file (no eval file configured)."""
    return not dcfg.get("eval_path") and bool(dcfg.get("eval_fraction"))


def has_split(dcfg: Mapping[str, Any], split: str) -> bool:
    return bool(dcfg.get(f"{split}_path")) or (split == "eval" and holds_out_eval(dcfg))


def holdout_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) row indices, both in file order: round(fraction * N) rows held out,
    stratified by the label's argmax (each class gives its share, largest remainders first),
    chosen by a generator seeded with ``seed`` alone."""
    n = len(labels)
    classes = np.asarray(labels).argmax(axis=1)
    members = [np.flatnonzero(classes == c) for c in range(labels.shape[1])]
    quota = np.array([fraction * len(m) for m in members])
    take = np.floor(quota).astype(int)
    short = int(round(fraction * n)) - int(take.sum())
    for c in np.argsort(-(quota - take), kind="stable")[:max(short, 0)]:
        take[c] += 1
    rng = np.random.default_rng([int(seed), 0xE7A1])
    held = np.concatenate([rng.permutation(m)[:k] for m, k in zip(members, take)]) if n else np.zeros(0, int)
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_path(dcfg: Mapping[str, Any], split: str) -> Path:
    key = _SPLIT_KEYS[split]
    value = dcfg.get(key.split(".", 1)[1])
    if not value:
        raise ConfigError(f"no {split} file configured: set {key}=/path/to/{split}.csv")
    path = Path(value).expanduser()
    if not path.is_file():
        raise DataError(f"{key}={path}: no such file" + (" (it is a directory)" if path.is_dir() else "")
                        + "; point it at a CSV/parquet/JSONL file (the shared Arena fixtures live in "
                        "../shared/fixtures/arena)")
    return path


def _tokenized(dcfg: Mapping[str, Any], task: Task, path: Path, *, swapped: bool, max_tokens: int) -> TokenizedDataset:
    return load_tokenized(path, task, dcfg["tokenizer_path"], int(dcfg["max_length"]), swap_ab=swapped,
                          on_bad_row=dcfg["on_bad_row"], max_tokens=max_tokens,
                          cache_dir=dcfg.get("cache_dir") or DEFAULT_CACHE_DIR,
                          num_workers=int(dcfg.get("num_workers") or 0))


def _build(dcfg: Mapping[str, Any], task: Task, split: str, *, swapped: bool | None, seed: int) -> TokenizedDataset:
    train_budget = int(dcfg["max_tokens"])
    eval_budget = int(dcfg.get("eval_max_tokens") or train_budget)
    augment = split == "train" and swapped is None and swap_mode(dcfg.get("swap_ab", "none")) != "none"
    variants = [False, True] if augment else [bool(swapped)]
    if split in ("train", "eval") and holds_out_eval(dcfg):
        path = split_path(dcfg, "train")
        budget = min(train_budget, eval_budget)  # held-out rows must fit the eval budget too
        base = take_rows(_tokenized(dcfg, task, path, swapped=False, max_tokens=budget), dcfg.get("limit_train_rows"))
        if base.labels is None:
            raise DataError(f"{path}: data.eval_fraction needs labelled training rows")
        kept, held = holdout_indices(base.labels, float(dcfg["eval_fraction"]), seed)
        if split == "eval":
            return take_rows(base.take(held), dcfg.get("limit_eval_rows"))
        parts = []
        for v in variants:
            full = base if not v else take_rows(_tokenized(dcfg, task, path, swapped=True, max_tokens=budget),
                                                dcfg.get("limit_train_rows"))
            if not np.array_equal(full.row_ids, base.row_ids):
                raise RuntimeError(f"{path}: the augmented rendering kept other rows than the original")
            parts.append(full.take(kept))
    else:
        path = split_path(dcfg, split)
        limit = {"train": dcfg.get("limit_train_rows"), "eval": dcfg.get("limit_eval_rows")}.get(split)
        budget = train_budget if split == "train" else eval_budget
        parts = [take_rows(_tokenized(dcfg, task, path, swapped=v, max_tokens=budget), limit) for v in variants]
    if len(parts) == 1:
        return parts[0]
    return TokenizedDataset.concat(_twins_aligned(parts, path))


def _twins_aligned(parts: list[TokenizedDataset], path: Path) -> list[TokenizedDataset]:
    """(originals, twins) with row i of one the twin of row i of the other: a row that only one
    rendering kept (a bad-row skip, e.g. too long one way round) loses its twin too, logged."""
    a, b = parts
    if np.array_equal(a.row_ids, b.row_ids):
        return parts
    common = set(a.row_ids.tolist()) & set(b.row_ids.tolist())
    lost = len(a) + len(b) - 2 * len(common)
    log.warning("%s: %d row(s) were kept in only one A/B orientation (bad-row skips); their twins are "
                "dropped too, so every training row has its swapped twin", path, lost)
    keep = [np.flatnonzero(np.isin(p.row_ids, list(common))) for p in parts]
    a, b = a.take(keep[0]), b.take(keep[1])
    order = {rid: i for i, rid in enumerate(b.row_ids.tolist())}
    return [a, b.take([order[rid] for rid in a.row_ids.tolist()])]


def load_split(dcfg: Mapping[str, Any], task: Task, split: str, info: DistInfo | None = None, *,
               swapped: bool | None = None, seed: int = 0) -> TokenizedDataset:
    """Tokenized rows of one split.

    ``swapped=None``: training gets the augmented copy appended when ``data.swap_ab``; other
    splits are plain. ``swapped=True/False`` asks for exactly that rendering (test-time
    augmentation). ``seed`` picks the held-out rows under ``data.eval_fraction``.
    """
    if swapped and task.tta_permutation is None:
        raise ConfigError(f"task {task.name} has no A/B-swap augmentation")
    built: list[TokenizedDataset] = []
    # Rank 0 first (it fills the cache; its failure is raised on every rank), then the others.
    rank0_result(lambda: built.append(_build(dcfg, task, split, swapped=swapped, seed=seed)), info)
    ds = built[0] if built else _build(dcfg, task, split, swapped=swapped, seed=seed)
    if len(ds) == 0:
        err = DataError(f"the {split} split ({_describe(dcfg, split)}) has no usable rows")
        err.collective = True  # every rank holds the same rows
        raise err
    if info is None or info.is_main:
        report = ds.report
        skipped = sum(report.skipped.values()) if report is not None else 0
        log.info("%s split: %s -> %d rows (%d skipped%s), %d tokens, median length %d", split,
                 _describe(dcfg, split), len(ds), skipped, f": {dict(report.skipped)}" if skipped else "",
                 int(ds.lengths.sum()), int(np.median(ds.lengths)))
    return ds


def _describe(dcfg: Mapping[str, Any], split: str) -> str:
    if split in ("train", "eval") and holds_out_eval(dcfg):
        share = float(dcfg["eval_fraction"])
        return f"{dcfg['train_path']} ({'held-out' if split == 'eval' else 'kept'} share, eval_fraction={share})"
    return str(dcfg.get(f"{split}_path"))


def train_sampler(ds: TokenizedDataset, dcfg: Mapping[str, Any], *, world_size: int, rank: int,
                  seed: int) -> TokenBudgetSampler:
    """The training split's sampler: with data.swap_ab=full it keeps each row with its twin
    (the second half of ``ds``) in the same optimizer step."""
    return TokenBudgetSampler(ds.lengths, global_batch_rows=dcfg["global_batch_rows"], max_tokens=dcfg["max_tokens"],
                              world_size=world_size, rank=rank, seed=seed, shuffle=dcfg["shuffle"],
                              paired=swap_mode(dcfg.get("swap_ab", "none")) == "full")


def prepare_splits(dcfg: Mapping[str, Any], task: Task) -> dict[str, TokenizedDataset]:
    """Tokenize every configured file (and its A/B-swapped rendering under data.swap_ab) into the
    cache, ahead of a job. Returns the datasets by name (train, train_swapped, eval, ...)."""
    out = {}
    variants = (False, True) if swap_mode(dcfg.get("swap_ab", "none")) != "none" else (False,)
    for split in SPLITS:
        if not dcfg.get(f"{split}_path"):
            continue
        for v in variants:
            ds = _tokenized(dcfg, task, split_path(dcfg, split), swapped=v,
                            max_tokens=int(dcfg.get("eval_max_tokens") or dcfg["max_tokens"]) if split != "train"
                            else int(dcfg["max_tokens"]))
            name = split + ("_swapped" if v else "")
            if len(ds) == 0:
                raise DataError(f"{split_path(dcfg, split)}: no usable rows for the {name} split")
            out[name] = ds
            log.info("%s: %d rows, %d tokens (median %d, max %d)", name, len(ds), ds.offsets[-1],
                     int(np.median(ds.lengths)), int(ds.lengths.max()))
    return out
