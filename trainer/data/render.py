"""What every task's renderer shares: the tokenizer, its fingerprint, and budget truncation.

Tokenizer notice: the Gemma 2 tokenizer used here is subject to the Gemma Terms of Use
(https://ai.google.dev/gemma/terms).

Renderers tokenize every piece (template literal or text field) on its own and concatenate
the token lists, so truncation cuts token lists, never characters, and never splits a token.
Text is tokenized with special-token parsing OFF, so a user typing "<bos>" or
"<start_of_turn>" gets ordinary tokens: only templates place special tokens.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Sequence

from trainer.errors import DataError

BOS_ID = 2


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The transformers Gemma tokenizer (built from tokenizer.model in ~3 s), cached per process.

    Private to the data pipeline: renderers switch its backend to encode_special_tokens.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir() or not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise DataError(f"data.tokenizer_path={path}: no tokenizer.json or tokenizer.model there (point it at "
                        "a Gemma 2 tokenizer directory, e.g. ../shared/fixtures/gemma2-tokenizer)")
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over every file of the tokenizer directory (names and bytes)."""
    h = hashlib.sha256()
    p = Path(path)
    if not p.exists():
        raise DataError(f"data.tokenizer_path={path}: no such directory")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def text_backend(tokenizer):
    """The fast tokenizer's backend, set to treat special-token strings in text as plain text."""
    tok = tokenizer.backend_tokenizer
    tok.encode_special_tokens = True
    return tok


def fair_split(demands: Sequence[int], budget: int) -> list[int]:
    """Water-filling: each item gets min(demand, level), the level as high as the budget allows.

    Short items keep everything; long items share what is left equally. Integer remainder
    goes to the earliest unfilled items.
    """
    alloc = [0] * len(demands)
    remaining = max(budget, 0)
    order = sorted(range(len(demands)), key=lambda i: (demands[i], i))
    for rank, i in enumerate(order):
        share = remaining // (len(order) - rank)
        alloc[i] = min(demands[i], share)
        remaining -= alloc[i]
    for i in range(len(demands)):  # spend the floor() remainder, earliest first
        if remaining <= 0:
            break
        extra = min(demands[i] - alloc[i], remaining)
        alloc[i] += extra
        remaining -= extra
    return alloc
