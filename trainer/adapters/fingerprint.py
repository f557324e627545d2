"""Which base model an adapter belongs to: a fingerprint recorded in every adapter checkpoint.

An adapter checkpoint holds only what trained (adapters, head, optimizer state); the frozen
base is re-read from where it came from. Resuming, exporting or scoring on another base would
silently compute something else, so the base is fingerprinted when the run builds it and again
whenever it is rebuilt, and a mismatch is refused.

- A transformers directory: sha256 over each weight/config file's name, size, safetensors header
  and 32 evenly spread 64 KiB samples of its bytes (2 MiB read per file, however large; two
  fine-tunes of one architecture differ in every sample, while a copy or a move of the same files
  keeps the fingerprint).
- From scratch (seeded init): sha256 over every base tensor's name, shape, dtype and 4,096
  evenly strided values, taken before the adapters exist (every rank holds full tensors then).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

SAMPLES = 32
SAMPLE_BYTES = 64 * 1024
TENSOR_SAMPLES = 4096
FILE_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        start = 0
        if path.suffix == ".safetensors" and size >= 8:
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(n, size - 8)))  # names, dtypes, shapes, offsets
            start = 8 + n
        if size - start <= SAMPLES * SAMPLE_BYTES:
            f.seek(start)
            h.update(f.read())
            return
        stride = (size - start - SAMPLE_BYTES) // (SAMPLES - 1)
        for i in range(SAMPLES):
            f.seek(start + i * stride)
            h.update(f.read(SAMPLE_BYTES))


def files_fingerprint(path: str | Path) -> str:
    path = Path(path)
    files = sorted({f for pattern in FILE_PATTERNS for f in path.glob(pattern) if f.is_file()})
    h = hashlib.sha256()
    for f in files:
        _file_digest(f, h)
    return "files:" + h.hexdigest()


@torch.no_grad()
def tensors_fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // TENSOR_SAMPLES)
        sample = flat[::step][:TENSOR_SAMPLES].float().cpu()
        h.update(f"{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode())
        h.update(sample.numpy().tobytes())
    return "init:" + h.hexdigest()


def base_record(name_or_path: str | None, model: nn.Module | None = None, seed: int | None = None) -> dict[str, Any]:
    """What an adapter checkpoint says about its base. ``model``: the freshly initialised base
    (from scratch only; a directory is fingerprinted from its files)."""
    if name_or_path:
        return {"name_or_path": str(name_or_path), "fingerprint": files_fingerprint(name_or_path)}
    assert model is not None, "a from-scratch base is fingerprinted from its tensors"
    return {"name_or_path": None, "seed": seed, "fingerprint": tensors_fingerprint(model)}


def describe(record: dict[str, Any]) -> str:
    where = record.get("name_or_path") or f"from scratch (seed {record.get('seed')})"
    return f"{where} [{record['fingerprint'][:20]}...]"
