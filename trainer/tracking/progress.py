"""The progress bar: rank 0 only, and only on a terminal."""

from __future__ import annotations

import os
import sys
from typing import Any


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
