"""Read back an offline wandb run from the ``.wandb`` transaction log it wrote.

wandb (>= 0.18, "wandb-core") has no public reader for offline runs. The record framing is
parsed by trainer/tracking/wandb_log.py (shared with the logger); this helper turns the
records into run info, config, history and summary. Format, as written by wandb-core
(``core/internal/transactionlog`` + ``core/pkg/leveldb/record.go``, which is
golang/leveldb's record format; the same as the old Python
``wandb/sdk/internal/datastore.py``):

* File header, 7 bytes: ``b":W&B"``, uint16 LE magic ``0xBEE1``, uint8 version 0.
  The header occupies the first 7 bytes of block 0 (blocks are counted from the
  start of the file).
* The file is a sequence of 32 KiB blocks; each block holds tightly packed
  chunks that never cross a block boundary. If fewer than 7 bytes remain in a
  block they are zero padding.
* Chunk: ``checksum`` uint32 LE, ``length`` uint16 LE, ``type`` uint8, then
  ``length`` payload bytes. The checksum is the *IEEE* CRC-32 (zlib.crc32)
  of ``type byte + payload`` (wandb-core uses ``leveldb.CRCAlgoIEEE``; the
  masked CRC-32C variant in the Go package is not used for .wandb files).
* Types: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST. A record is FULL, or FIRST
  (MIDDLE)* LAST, concatenated.
* Each record payload is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

History values are JSON strings keyed by ``key`` or ``nested_key`` (joined with
"/"), and include ``_step``, ``_runtime``, ``_timestamp``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The framing reader lives in the package (the logger needs it too); one parser of the format.
from trainer.tracking.wandb_log import (  # noqa: E402,F401 - re-exported for the tests
    FIRST,
    FULL,
    LAST,
    MIDDLE,
    WandbFileError,
    iter_record_bytes,
    iter_records,
)


def _item_path(item) -> list[str]:
    # wandb-core writes ``nested_key`` (a path); older writers used ``key``.
    return list(item.nested_key) if item.nested_key else [item.key]


def _set(out: dict, item) -> None:
    """Store an item's JSON value at its key path, rebuilding nested dicts
    (a logged dict/Table reference is flattened into one item per leaf)."""
    path = _item_path(item)
    value = json.loads(item.value_json) if item.value_json else None
    d = out
    for k in path[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = d[k] = {}
        d = nxt
    d[path[-1]] = value


def _pop(out: dict, item) -> None:
    path = _item_path(item)
    d = out
    for k in path[:-1]:
        d = d.get(k)
        if not isinstance(d, dict):
            return
    d.pop(path[-1], None)


def _items_to_dict(items) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        _set(out, item)
    return out


@dataclass
class OfflineRun:
    path: Path  # the .wandb file
    run_id: str | None = None
    project: str | None = None
    display_name: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None
    notes: str | None = None
    resumed: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    record_types: list[str] = field(default_factory=list)
    exit_code: int | None = None

    @property
    def files_dir(self) -> Path:
        return self.path.parent / "files"

    def load_table(self, ref: dict) -> dict[str, Any]:
        """Load a logged ``wandb.Table`` from its history reference
        (``{"_type": "table-file", "path": ...}``): returns {"columns", "data"}."""
        if not isinstance(ref, dict) or ref.get("_type") != "table-file":
            raise WandbFileError(f"not a table reference: {ref!r}")
        return json.loads((self.files_dir / ref["path"]).read_text())


def read_run(wandb_file: str | Path) -> OfflineRun:
    """Parse a ``run-<id>.wandb`` file into run info, config, history, summary."""
    run = OfflineRun(path=Path(wandb_file))
    for rec in iter_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        run.record_types.append(kind or "")
        if kind == "run":
            r = rec.run
            run.run_id = r.run_id or run.run_id
            run.project = r.project or run.project
            run.display_name = r.display_name or run.display_name
            run.tags = list(r.tags) or run.tags
            run.group = r.run_group or run.group
            run.notes = r.notes or run.notes
            run.resumed = run.resumed or bool(getattr(r, "resumed", False))
            for item in r.config.update:
                _set(run.config, item)
            for item in r.summary.update:
                _set(run.summary, item)
        elif kind == "config":
            for item in rec.config.update:
                _set(run.config, item)
            for item in rec.config.remove:
                _pop(run.config, item)
        elif kind == "history":
            row = _items_to_dict(rec.history.item)
            if "_step" not in row and rec.history.HasField("step"):
                row["_step"] = rec.history.step.num
            run.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _set(run.summary, item)
            for item in rec.summary.remove:
                _pop(run.summary, item)
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def find_offline_runs(root: str | Path, run_id: str | None = None) -> list[Path]:
    """All ``run-<id>.wandb`` files under ``<root>/wandb/offline-run-*-<id>[-N]/``,
    oldest first (by directory name: time stamp, then resume suffix)."""
    wandb_dir = Path(root) / "wandb"
    pattern = f"offline-run-*-{run_id}*" if run_id else "offline-run-*"
    found = []
    for d in wandb_dir.glob(pattern):
        for f in d.glob("run-*.wandb"):
            if run_id is None or f.name == f"run-{run_id}.wandb":
                found.append(f)

    def order(p: Path):
        name = p.parent.name  # offline-run-<date>_<time>-<id>[-<n>]
        parts = name.split("-")
        suffix = int(parts[-1]) if len(parts) > 4 and parts[-1].isdigit() else 0
        return (parts[2], suffix)

    return sorted(found, key=order)


def read_offline_run(root: str | Path, run_id: str | None = None) -> OfflineRun:
    """Read the latest offline run (optionally with ``run_id``) under ``root``."""
    files = find_offline_runs(root, run_id)
    if not files:
        raise FileNotFoundError(f"no offline wandb run under {root}/wandb (id={run_id})")
    return read_run(files[-1])


def read_offline_runs(root: str | Path, run_id: str) -> list[OfflineRun]:
    """Every segment of run ``run_id`` (offline resume writes a new
    ``offline-run-...-<id>-<n>`` dir each time), oldest first."""
    return [read_run(f) for f in find_offline_runs(root, run_id)]
