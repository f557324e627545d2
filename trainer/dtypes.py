"""The one map from config dtype names to torch dtypes."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def to_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``, ``"bf16"``, ``"torch.bfloat16"`` or a torch.dtype -> torch.dtype."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).lower().removeprefix("torch.")
    try:
        return DTYPES[_ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
