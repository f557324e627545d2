"""Tokenize a whole data file into a TokenizedDataset with the task's renderer, with an on-disk cache.

Cache: one .npz (numpy arrays only, loaded with allow_pickle=False) per key, where the key is
sha256(file bytes) + sha256(tokenizer files) + the task's record (its schema and rendering
settings: template, layout, class names) + max_length, augmentation and bad-row policy. Writes
go to a temp file renamed into place, so a crashed or concurrent writer never leaves a
half-written cache behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from trainer.data.ingest import BadRow, IngestReport, RowPolicy
from trainer.data.render import load_tokenizer, tokenizer_fingerprint
from trainer.data.workers import worker_context
from trainer.tasks.base import Renderer, Row, Task

log = logging.getLogger(__name__)
CACHE_FORMAT = 3  # 3: teacher probabilities
DEFAULT_CACHE_DIR = Path(os.environ.get("ARENA_DATA_CACHE", Path.home() / ".cache" / "arena-trainer"))


@dataclass
class TokenizedDataset:
    row_ids: np.ndarray  # [N] int64, or unicode when a file has non-integer ids
    input_ids: np.ndarray  # [total tokens] int32, rows back to back
    offsets: np.ndarray  # [N + 1] int64; row i is input_ids[offsets[i]:offsets[i+1]]
    labels: np.ndarray | None  # [N, num classes] float32; None for unlabelled (test) files
    swapped: np.ndarray  # [N] bool: row rendered through the task's augmentation (Arena: A/B swapped)
    report: IngestReport | None = None
    # faults handled while loading, as (event, detail): the trainer logs them to metrics.jsonl
    events: list = field(default_factory=list, compare=False)
    teacher: np.ndarray | None = None  # [N, num classes] float32 teacher probabilities; None without such columns

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    def tokens(self, i: int) -> np.ndarray:
        return self.input_ids[self.offsets[i]:self.offsets[i + 1]]

    def label(self, i: int) -> np.ndarray | None:
        return None if self.labels is None else self.labels[i]

    def teacher_probs(self, i: int) -> np.ndarray | None:
        return None if self.teacher is None else self.teacher[i]

    def take(self, indices: Sequence[int] | np.ndarray) -> "TokenizedDataset":
        """The rows at ``indices``, in that order (the report stays the whole file's)."""
        indices = np.asarray(indices, dtype=np.int64)
        parts = [self.tokens(int(i)) for i in indices]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)]).astype(np.int64)
        return TokenizedDataset(self.row_ids[indices], np.concatenate(parts) if parts else self.input_ids[:0],
                                offsets, None if self.labels is None else self.labels[indices],
                                self.swapped[indices], self.report, self.events,
                                None if self.teacher is None else self.teacher[indices])

    @staticmethod
    def concat(parts: Sequence["TokenizedDataset"]) -> "TokenizedDataset":
        """E.g. original + swapped copy for A/B augmentation (rows keep their ids)."""
        if len({p.labels is None for p in parts}) > 1:
            raise ValueError("cannot concatenate labelled and unlabelled datasets")
        if len({p.teacher is None for p in parts}) > 1:
            raise ValueError("cannot concatenate datasets with and without teacher probabilities")
        starts = np.cumsum([0] + [len(p.input_ids) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts)])
        return TokenizedDataset(
            np.concatenate([p.row_ids for p in parts]),
            np.concatenate([p.input_ids for p in parts]), offsets,
            None if parts[0].labels is None else np.concatenate([p.labels for p in parts]),
            np.concatenate([p.swapped for p in parts]), events=[e for p in parts for e in p.events],
            teacher=None if parts[0].teacher is None else np.concatenate([p.teacher for p in parts]))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(path: str | Path, task: Task, tokenizer_path: str | Path, max_length: int,
              swap_ab: bool, on_bad_row: str) -> str:
    parts = {"format": CACHE_FORMAT, "file": _file_sha256(Path(path)),
             "tokenizer": tokenizer_fingerprint(tokenizer_path), "max_length": int(max_length),
             "task": task.record(), "swap": bool(swap_ab), "on_bad_row": on_bad_row}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------- worker side
_BUILDER: Renderer | None = None


def _init_worker(builder: Renderer) -> None:
    global _BUILDER
    # Parallelism comes from the process pool; rayon threads inside each worker would only
    # oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _BUILDER = builder


def _build_chunk(rows: list[Row]) -> list[np.ndarray]:
    return _BUILDER.build_many(rows)


def _tokenize_rows(builder: Renderer, rows: list[Row], num_workers: int,
                   desc: str, chunk_rows: int = 128) -> list[np.ndarray]:
    from tqdm import tqdm

    chunks = [rows[i:i + chunk_rows] for i in range(0, len(rows), chunk_rows)]
    bar = tqdm(total=len(rows), desc=desc, unit="row", disable=not sys.stderr.isatty())
    out: list[np.ndarray] = []
    with bar:
        if num_workers <= 0:
            for c in chunks:
                out += builder.build_many(c)
                bar.update(len(c))
        else:
            # never fork a process that has threads: see trainer.data.workers
            with worker_context().Pool(num_workers, initializer=_init_worker, initargs=(builder,)) as pool:
                for res in pool.imap(_build_chunk, chunks):
                    out += res
                    bar.update(len(res))
    return out


# ---------------------------------------------------------------- cache io

def _save(path: Path, ds: TokenizedDataset) -> None:
    arrays = {"input_ids": ds.input_ids, "offsets": ds.offsets, "swapped": ds.swapped,
              "row_ids": ds.row_ids,
              "report": np.frombuffer(json.dumps(ds.report.to_json()).encode(), dtype=np.uint8)}
    if ds.labels is not None:
        arrays["labels"] = ds.labels
    if ds.teacher is not None:
        arrays["teacher"] = ds.teacher
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _load(path: Path) -> TokenizedDataset:
    """Read a cache file; ValueError if it is not a whole, consistent one (npz members carry a
    CRC-32 that zipfile checks on read, so a flipped byte fails here too)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            report = IngestReport.from_json(json.loads(z["report"].tobytes().decode()))
            ds = TokenizedDataset(z["row_ids"], z["input_ids"], z["offsets"],
                                  z["labels"] if "labels" in z else None, z["swapped"], report,
                                  teacher=z["teacher"] if "teacher" in z else None)
    except Exception as e:  # noqa: BLE001 - zipfile, numpy and json each raise their own
        raise ValueError(f"{type(e).__name__}: {e}") from e
    n, off = len(ds.row_ids), ds.offsets
    if (len(off) != n + 1 or off[0] != 0 or off[-1] != len(ds.input_ids) or np.any(np.diff(off) < 0)
            or len(ds.swapped) != n or (ds.labels is not None and len(ds.labels) != n)
            or (ds.teacher is not None and len(ds.teacher) != n)):
        raise ValueError("arrays of inconsistent lengths")
    return ds


def _ids_array(ids: list) -> np.ndarray:
    if all(isinstance(i, int) for i in ids):
        return np.asarray(ids, dtype=np.int64)
    return np.asarray([str(i) for i in ids], dtype=np.str_)


def _filter_too_long(ds: TokenizedDataset, max_tokens: int | None, on_bad_row: str, path: str,
                     fields: str) -> TokenizedDataset:
    """Rows that cannot fit one micro-batch (max_length > max_tokens) are bad rows."""
    if max_tokens is None:
        return ds
    lengths = ds.lengths
    bad = np.flatnonzero(lengths > max_tokens)
    if len(bad) == 0:
        return ds
    report = IngestReport.from_json(ds.report.to_json())
    policy = RowPolicy(path, on_bad_row, report)
    for i in bad:
        policy.bad(BadRow("too_long", fields, f"{lengths[i]} tokens after truncation > max_tokens={max_tokens}"),
                   ds.row_ids[i].item(), f"row {i + 1} of the kept rows")
    keep = np.flatnonzero(lengths <= max_tokens)
    out = ds.take(keep)
    report.rows_kept = len(keep)
    report.log_summary()
    out.report = report
    return out


def load_tokenized(path: str | Path, task: Task, tokenizer_path: str | Path, max_length: int, *,
                   swap_ab: bool = False, on_bad_row: str = "error", max_tokens: int | None = None,
                   cache_dir: str | Path | None = DEFAULT_CACHE_DIR, num_workers: int = 0) -> TokenizedDataset:
    """Validate, render and tokenize one file with ``task``; cached on disk (cache_dir=None disables).

    ``swap_ab`` renders every row through the task's augmentation (Arena: A and B exchanged).
    ``max_tokens`` (the micro-batch token budget) is checked after truncation; rows over it
    follow ``on_bad_row`` (reason "too_long"). It is applied after the cache, so it is not
    part of the cache key.
    """
    path, tokenizer_path = Path(path), str(tokenizer_path)
    cache_file, rebuilt = None, None
    if cache_dir is not None and path.is_file():
        # The key needs no tokenizer: a cache hit never pays the ~3 s tokenizer build.
        key = cache_key(path, task, tokenizer_path, max_length, swap_ab, on_bad_row)
        cache_file = Path(cache_dir) / f"{path.stem}-{key}.npz"
        if cache_file.is_file():
            try:
                cached = _load(cache_file)
            except ValueError as e:  # truncated or corrupted: rebuilt, never trusted
                rebuilt = f"{cache_file}: unreadable tokenized cache ({str(e)[:200]}), rebuilt from {path}"
                log.warning("%s", rebuilt)
            else:
                log.info("%s: tokenized cache hit %s", path, cache_file)
                return _filter_too_long(cached, max_tokens, on_bad_row, str(path), task.text_fields)

    rows, report = task.read(path, on_bad_row)
    builder = task.renderer(load_tokenizer(tokenizer_path), max_length)
    if swap_ab:
        rows = [task.augment(r) for r in rows]
    seqs = _tokenize_rows(builder, rows, num_workers, desc=f"tokenize {path.name}")
    labelled = rows[0].label is not None
    ds = TokenizedDataset(
        _ids_array([r.id for r in rows]),
        np.concatenate(seqs),
        np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64),
        np.stack([r.label for r in rows]).astype(np.float32) if labelled else None,
        np.full(len(rows), bool(swap_ab)), report,
        teacher=np.stack([r.teacher for r in rows]).astype(np.float32) if rows[0].teacher is not None else None)
    if cache_file is not None:
        _save(cache_file, ds)
    out = _filter_too_long(ds, max_tokens, on_bad_row, str(path), task.text_fields)
    out.events = [("tokenized_cache_rebuilt", rebuilt)] if rebuilt else []
    return out
