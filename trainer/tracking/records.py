"""Values on their way to metrics.jsonl and wandb: plain JSON, secrets redacted."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
_SECRET_MARKERS = ("key", "token", "secret", "password")


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
