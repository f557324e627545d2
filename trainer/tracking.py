"""Metrics logging: a JSON-lines file always, Weights & Biases optionally.

Only rank 0 does anything; on other ranks every method is a no-op. Modes
(``wandb_cfg.mode``):

* ``"disabled"``: ``run_dir/metrics.jsonl`` only; ``wandb`` is never imported.
* ``"offline"``: also a wandb run written under ``run_dir/wandb/offline-run-*``
  (no network; sync later with ``wandb sync``).
* ``"online"``: also a live wandb run (needs ``WANDB_API_KEY`` or ``wandb login``).

The wandb run id is generated once and exposed as :attr:`MetricsLogger.run_id`;
the trainer stores it in checkpoints and passes it back as ``resume_run_id``
so a resumed job continues the same wandb run (``resume="allow"``).

Nothing secret is written: config keys containing "key", "token", "secret" or
"password" are redacted before they reach wandb or any file, and the API key is
never read or printed by this module.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import struct
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MetricsLogger",
    "progress",
    "redact",
    "to_jsonable",
    "METRICS_FILE",
    "REDACTED",
]

METRICS_FILE = "metrics.jsonl"
REDACTED = "<redacted>"
_SECRET_MARKERS = ("key", "token", "secret", "password")
_WANDB_MODES = ("online", "offline")
_ID_CHARS = string.ascii_lowercase + string.digits
_log = logging.getLogger(__name__)


def _is_secret_key(key: Any) -> bool:
    k = str(key).lower()
    return any(m in k for m in _SECRET_MARKERS)


def redact(obj: Any) -> Any:
    """Return a copy of ``obj`` with values under secret-looking keys replaced.

    Recurses through mappings and lists/tuples. A key is secret-looking when it
    contains "key", "token", "secret" or "password" (case-insensitive).
    """
    if isinstance(obj, Mapping):
        return {
            str(k): (REDACTED if _is_secret_key(k) and v is not None else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):  # list, tuple, ListConfig
        return [redact(v) for v in obj]
    return obj


def to_jsonable(value: Any) -> Any:
    """Convert tensors / numpy values to plain Python; non-finite floats -> None."""
    # torch / numpy scalars and arrays expose .tolist() (0-d -> Python scalar).
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f if math.isfinite(f) else None


def _cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _new_run_id(length: int = 8) -> str:
    # Same alphabet/length as wandb.util.generate_id, without importing wandb.
    return "".join(secrets.choice(_ID_CHARS) for _ in range(length))


def _wandb_generate_id() -> str:
    # wandb 0.31 no longer exposes wandb.util.generate_id; it lives in sdk.lib.runid.
    try:
        from wandb.sdk.lib.runid import generate_id
    except ImportError:  # pragma: no cover - older/newer layouts
        import wandb

        generate_id = getattr(wandb.util, "generate_id", _new_run_id)
    return generate_id()


class MetricsLogger:
    """Rank-0 metrics sink: ``run_dir/metrics.jsonl`` plus an optional wandb run.

    Args:
        run_dir: directory for ``metrics.jsonl`` and (wandb modes) ``wandb/``.
        rank: global rank; anything but 0 makes every method a no-op.
        wandb_cfg: object or mapping with ``mode`` ("online" | "offline" |
            "disabled"), ``project``, ``entity``, ``name``, ``tags``, ``group``,
            ``notes``. ``None`` means disabled.
        run_config: the resolved training config (logged as wandb config,
            secrets redacted).
        resume_run_id: wandb run id from a checkpoint; continues that run.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        wandb_cfg: Any,
        run_config: dict | None = None,
        resume_run_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.enabled = self.rank == 0
        self.mode = str(_cfg_get(wandb_cfg, "mode", "disabled") or "disabled")
        if self.mode not in (*_WANDB_MODES, "disabled"):
            raise ValueError(f"wandb mode must be online|offline|disabled, got {self.mode!r}")
        self.run_id: str | None = resume_run_id
        self.resumed = resume_run_id is not None
        self._run = None  # wandb Run
        self._fh = None
        self._closed = False
        if not self.enabled:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._fh = open(self.metrics_path, "a", encoding="utf-8")

        if self.mode in _WANDB_MODES:
            self._run = self._init_wandb(wandb_cfg, redact(run_config or {}), resume_run_id)
            self.run_id = self._run.id
        elif self.run_id is None:
            self.run_id = _new_run_id()

    # ------------------------------------------------------------------ wandb
    def _init_wandb(self, wandb_cfg: Any, config: dict, resume_run_id: str | None):
        import wandb  # lazy: never imported in disabled mode

        run_id = resume_run_id or _wandb_generate_id()
        settings = wandb.Settings(
            silent=True,
            console="off",  # don't capture stdout/stderr into the run
            x_disable_stats=True,  # no system-metrics sampler
            x_disable_meta=True,  # no host/git/env metadata collection
            x_disable_machine_info=True,
            x_save_requirements=False,
            save_code=False,
            disable_git=True,
            disable_job_creation=True,
        )
        tags = _cfg_get(wandb_cfg, "tags") or None
        run = wandb.init(
            project=_cfg_get(wandb_cfg, "project"),
            entity=_cfg_get(wandb_cfg, "entity"),
            name=_cfg_get(wandb_cfg, "name"),
            tags=list(tags) if tags else None,
            group=_cfg_get(wandb_cfg, "group"),
            notes=_cfg_get(wandb_cfg, "notes"),
            dir=str(self.run_dir),
            id=run_id,
            resume="allow",
            config=config,
            mode=self.mode,
            settings=settings,
            reinit="create_new",
        )
        return run

    # ---------------------------------------------------------------- writing
    def _write(self, record: dict) -> None:
        line = json.dumps(to_jsonable(record), allow_nan=False, sort_keys=False)
        self._fh.write(line + "\n")
        self._fh.flush()

    def _active(self) -> bool:
        return self.enabled and not self._closed

    def log(self, values: Mapping[str, Any], step: int, *, kind: str = "train") -> None:
        """Log scalar metrics for optimizer step ``step`` (must not decrease in wandb)."""
        if not self._active():
            return
        clean = {str(k): to_jsonable(v) for k, v in values.items()}
        self._write({"step": int(step), "kind": kind, "time": round(time.time(), 3), **clean})
        if self._run is not None:
            self._run.log(clean, step=int(step))

    def log_eval(self, values: Mapping[str, Any], step: int, *, prefix: str = "eval") -> None:
        """Log evaluation metrics; keys get ``f"{prefix}/"`` unless already prefixed."""
        if not self._active():
            return
        pre = f"{prefix}/" if prefix else ""
        vals = {(k if not pre or str(k).startswith(pre) else pre + str(k)): v for k, v in values.items()}
        self.log(vals, step, kind="eval")

    def log_confusion_matrix(
        self,
        cm: Any,
        class_names: Sequence[str],
        step: int,
        *,
        key: str = "eval/confusion_matrix",
    ) -> None:
        """Log a confusion matrix ``cm[actual][predicted]`` (counts).

        metrics.jsonl gets the nested lists; wandb gets a ``wandb.Table`` with
        one row per actual class (column "actual" then one column per predicted
        class). Offline, the table rows live in ``files/media/table/...json``
        and the history row holds a ``{"_type": "table-file", "path": ...}``
        reference to it.
        """
        if not self._active():
            return
        matrix = to_jsonable(cm)
        names = [str(c) for c in class_names]
        if len(matrix) != len(names) or any(len(r) != len(names) for r in matrix):
            raise ValueError(f"confusion matrix shape does not match {len(names)} classes")
        self._write(
            {
                "step": int(step),
                "kind": "confusion_matrix",
                "time": round(time.time(), 3),
                "key": key,
                "class_names": names,
                "matrix": matrix,
            }
        )
        if self._run is not None:
            import wandb

            table = wandb.Table(
                columns=["actual", *names],
                data=[[names[i], *matrix[i]] for i in range(len(names))],
            )
            self._run.log({key: table}, step=int(step))

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run-level summary values (final / best metrics)."""
        if not self._active():
            return
        clean = {str(k): to_jsonable(v) for k, v in values.items()}
        self._write({"step": None, "kind": "summary", "time": round(time.time(), 3), **clean})
        if self._run is not None:
            self._run.summary.update(clean)

    def finish(self, exit_code: int = 0, *, flush_timeout: float = 30.0) -> None:
        """Flush and close; idempotent.

        wandb 0.31's ``run.finish()`` returns before wandb-core has written its
        buffered transaction log (``run-<id>.wandb``) to disk (seen here: right
        after finish the file sometimes holds only its 7-byte header). So we
        also wait, up to ``flush_timeout`` seconds, until that file ends with
        the run's exit record; the offline run is then complete on disk.
        """
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._run is not None:
            run, self._run = self._run, None
            sync_file = None
            try:
                sync_file = Path(run.settings.sync_file)
            except Exception:  # pragma: no cover - settings layout changed
                pass
            run.finish(exit_code=exit_code)
            if sync_file is not None and flush_timeout > 0:
                if not _wait_for_exit_record(sync_file, flush_timeout):
                    _log.warning("wandb transaction log %s not complete after %.0fs", sync_file, flush_timeout)
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)


def _last_records(path: Path, keep: int = 4) -> list[bytes]:
    """Payloads of the last ``keep`` complete records of a wandb transaction log
    (leveldb-log framing: 7-byte file header, 32 KiB blocks, chunks of
    crc32/len/type; see tests/wandb_reader.py). Stops at a torn tail."""
    data = path.read_bytes()
    pos, block, hdr = 7, 32 * 1024, struct.Struct("<IHB")
    out: list[bytes] = []
    pending: bytearray | None = None
    while pos + hdr.size <= len(data):
        left = block - pos % block
        if left < hdr.size:
            pos += left
            continue
        crc, length, ctype = hdr.unpack_from(data, pos)
        if crc == 0 and length == 0 and ctype == 0:
            pos += left
            continue
        payload = data[pos + hdr.size : pos + hdr.size + length]
        if len(payload) < length or zlib.crc32(bytes([ctype]) + payload) != crc:
            break
        pos += hdr.size + length
        if ctype == 1:
            out.append(payload)
        elif ctype == 2:
            pending = bytearray(payload)
        elif ctype in (3, 4) and pending is not None:
            pending += payload
            if ctype == 4:
                out.append(bytes(pending))
                pending = None
        out = out[-keep:]
    return out


def _wait_for_exit_record(path: Path, timeout: float) -> bool:
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        try:
            for raw in _last_records(path):
                rec = pb.Record()
                rec.ParseFromString(raw)
                if rec.WhichOneof("record_type") == "exit":
                    return True
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def progress(
    total: int | None,
    desc: str,
    rank: int,
    initial: int = 0,
    *,
    force: bool | None = None,
    **kwargs: Any,
):
    """A tqdm bar shown only on rank 0 and only when stderr is a TTY.

    ``force=True`` shows it even without a TTY (rank 0 only); ``force=False``
    always hides it. Environment override: ``ARENA_PROGRESS=1`` / ``0``.
    Hidden bars are real tqdm objects with ``disable=True`` (all calls no-ops).
    """
    from tqdm.auto import tqdm

    if force is None:
        env = os.environ.get("ARENA_PROGRESS")
        force = None if env is None else env.strip().lower() in ("1", "true", "yes", "on")
    if rank != 0:
        show = False
    elif force is not None:
        show = force
    else:
        show = sys.stderr.isatty()
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(total=total, desc=desc, initial=initial, disable=not show, **kwargs)
