"""Weights & Biases runs: start (or resume) one, and finish it only once it is on disk."""

from __future__ import annotations

import logging
import secrets
import string
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from .wandb_log import has_exit_record

_ID_CHARS = string.ascii_lowercase + string.digits
_log = logging.getLogger(__name__)


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    """``name`` of a mapping, an object, or None (then ``default``)."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def new_run_id(length: int = 8) -> str:
    # Same alphabet/length as wandb.util.generate_id, without importing wandb.
    return "".join(secrets.choice(_ID_CHARS) for _ in range(length))


def _wandb_generate_id() -> str:
    # wandb 0.31 no longer exposes wandb.util.generate_id; it lives in sdk.lib.runid.
    try:
        from wandb.sdk.lib.runid import generate_id
    except ImportError:  # pragma: no cover - older/newer layouts
        import wandb

        generate_id = getattr(wandb.util, "generate_id", new_run_id)
    return generate_id()


def start_run(wandb_cfg: Any, run_dir: Path, mode: str, config: dict, resume_run_id: str | None):
    """A wandb run writing under ``run_dir/wandb`` (``mode`` online or offline), continuing
    ``resume_run_id`` when given (``resume="allow"``). Nothing beyond the metrics is collected."""
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
    tags = cfg_get(wandb_cfg, "tags") or None
    run = wandb.init(
        project=cfg_get(wandb_cfg, "project"),
        entity=cfg_get(wandb_cfg, "entity"),
        name=cfg_get(wandb_cfg, "name"),
        tags=list(tags) if tags else None,
        group=cfg_get(wandb_cfg, "group"),
        notes=cfg_get(wandb_cfg, "notes"),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        config=config,
        mode=mode,
        settings=settings,
        reinit="create_new",
    )
    return run


def finish_run(run, exit_code: int = 0, flush_timeout: float = 30.0) -> None:
    """Finish a run and wait, up to ``flush_timeout`` s, until its transaction log ends with
    the exit record: wandb 0.31's ``run.finish()`` returns before wandb-core has written its
    buffered log to disk (seen here: right after finish the file sometimes holds only its
    7-byte header), so only then is an offline run complete."""
    sync_file = None
    try:
        sync_file = Path(run.settings.sync_file)
    except Exception:  # pragma: no cover - settings layout changed
        pass
    run.finish(exit_code=exit_code)
    if sync_file is None or flush_timeout <= 0:
        return
    deadline = time.monotonic() + flush_timeout
    while not has_exit_record(sync_file):
        if time.monotonic() >= deadline:
            _log.warning("wandb transaction log %s not complete after %.0fs", sync_file, flush_timeout)
            return
        time.sleep(0.05)
