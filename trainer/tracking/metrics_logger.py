"""The metrics sink: a JSON-lines file always, Weights & Biases optionally.

Only rank 0 does anything; on other ranks every method is a no-op. Modes
(``wandb_cfg.mode``):

* ``"disabled"``: ``run_dir/metrics.jsonl`` only; ``wandb`` is never imported.
* ``"offline"``: also a wandb run written under ``run_dir/wandb/offline-run-*``
  (no network; sync later with ``wandb sync``).
* ``"online"``: also a live wandb run (needs ``WANDB_API_KEY`` or ``wandb login``).

The run id is part of the training state (``state_dict`` / ``load_state_dict``): the trainer
checkpoints it, and a resumed job restores it before ``start()`` so it continues the same
wandb run (``resume="allow"``).

Nothing secret is written: config keys containing "key", "token", "secret" or "password" are
redacted before they reach wandb or any file, and the API key is never read or printed here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .records import redact, to_jsonable
from .wandb_run import cfg_get, finish_run, new_run_id, start_run

METRICS_FILE = "metrics.jsonl"
_WANDB_MODES = ("online", "offline")


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
        start: open the file and the wandb run now; ``False`` defers that to ``start()``
            (after ``load_state_dict`` has restored the run id of a resumed job).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        wandb_cfg: Any,
        run_config: dict | None = None,
        resume_run_id: str | None = None,
        start: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.enabled = self.rank == 0
        self.mode = str(cfg_get(wandb_cfg, "mode", "disabled") or "disabled")
        if self.mode not in (*_WANDB_MODES, "disabled"):
            raise ValueError(f"wandb mode must be online|offline|disabled, got {self.mode!r}")
        self._wandb_cfg = wandb_cfg
        self._run_config = run_config
        self.run_id: str | None = resume_run_id
        self._run = None  # wandb Run
        self._fh = None
        self._started = self._closed = False
        if start:
            self.start()

    @property
    def resumed(self) -> bool:
        return self._resumed if self._started else self.run_id is not None

    def start(self) -> None:
        """Open metrics.jsonl (appending) and start or resume the wandb run; idempotent."""
        if self._started:
            return
        self._started = True
        self._resumed = self.run_id is not None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self._fh = open(self.metrics_path, "a", encoding="utf-8")
        if self.mode in _WANDB_MODES:
            self._run = start_run(self._wandb_cfg, self.run_dir, self.mode, redact(self._run_config or {}),
                                  self.run_id)
            self.run_id = self._run.id
        elif self.run_id is None:
            self.run_id = new_run_id()

    # ---- checkpointed state (DCP's Stateful protocol) ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"wandb_run_id": self.run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._started:
            raise RuntimeError("load the logger's state before start(): the run id picks the wandb run")
        self.run_id = state.get("wandb_run_id")

    # ---------------------------------------------------------------- writing
    def _write(self, record: dict) -> None:
        line = json.dumps(to_jsonable(record), allow_nan=False, sort_keys=False)
        self._fh.write(line + "\n")
        self._fh.flush()

    def _active(self) -> bool:
        return self.enabled and self._started and not self._closed

    def log(self, values: Mapping[str, Any], step: int, *, kind: str = "train") -> None:
        """Log scalar metrics for optimizer step ``step`` (must not decrease in wandb)."""
        if not self._active():
            return
        clean = {str(k): to_jsonable(v) for k, v in values.items()}
        self._write({"step": int(step), "kind": kind, "time": round(time.time(), 3), **clean})
        if self._run is not None:
            self._run.log(clean, step=int(step))

    def log_event(self, event: str, detail: str, step: int) -> None:
        """A fault the run handled (a refused checkpoint, a rebuilt cache, ...): a ``kind:
        "event"`` line in metrics.jsonl, and ``events/<event>`` counted in wandb."""
        if not self._active():
            return
        self._write({"step": int(step), "kind": "event", "time": round(time.time(), 3), "event": event,
                     "detail": detail})
        if self._run is not None:
            self._run.log({f"events/{event}": 1}, step=int(step))

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
        """Flush and close; idempotent. An offline wandb run is complete on disk afterwards
        (``finish_run`` waits for its exit record)."""
        if not self.enabled or self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        if self._run is not None:
            run, self._run = self._run, None
            finish_run(run, exit_code=exit_code, flush_timeout=flush_timeout)
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
