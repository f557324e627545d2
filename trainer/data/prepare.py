"""Build the tokenized caches for an experiment ahead of a (multi-GPU) job."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from trainer.data.tokenize import DEFAULT_CACHE_DIR, TokenizedDataset, load_tokenized

log = logging.getLogger(__name__)


def load_split(data_cfg: Mapping[str, Any], split: str, swap_ab: bool = False,
               num_workers: int | None = None) -> TokenizedDataset | None:
    """load_tokenized() for data.<split>_path with the data config's settings (None if unset)."""
    path = data_cfg.get(f"{split}_path")
    if not path:
        return None
    return load_tokenized(
        path, data_cfg["tokenizer_path"], int(data_cfg["max_length"]),
        prompt_layout=data_cfg.get("prompt_layout", "interleaved"), swap_ab=swap_ab,
        on_bad_row=data_cfg.get("on_bad_row", "error"),
        max_tokens=data_cfg.get("max_tokens"),
        cache_dir=data_cfg.get("cache_dir") or DEFAULT_CACHE_DIR,
        num_workers=int(data_cfg.get("num_workers", 0) if num_workers is None else num_workers))


def prepare_from_config(data_cfg: Mapping[str, Any]) -> dict[str, TokenizedDataset]:
    """Tokenize train/eval/test (and their A/B-swapped copies when data.swap_ab) into the cache."""
    out = {}
    variants = (False, True) if data_cfg.get("swap_ab", False) else (False,)
    for split in ("train", "eval", "test"):
        for swap in variants:
            ds = load_split(data_cfg, split, swap_ab=swap)
            if ds is None:
                continue
            name = split + ("_swapped" if swap else "")
            out[name] = ds
            log.info("%s: %d rows, %d tokens (median %d, max %d)", name, len(ds),
                     ds.offsets[-1], int(sorted(ds.lengths)[len(ds) // 2]) if len(ds) else 0,
                     int(ds.lengths.max()) if len(ds) else 0)
    return out
