"""The Arena judge prompt: an ArenaRow as Gemma 2 token ids, truncated to max_length.

Tokenizer notice: the Gemma 2 tokenizer used here is subject to the Gemma Terms of Use
(https://ai.google.dev/gemma/terms).

Every piece (template literal or text field) is tokenized on its own and the final ids are
the concatenation of those token lists (see trainer/data/render.py).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Sequence

import numpy as np

from trainer.data.render import BOS_ID, fair_split
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.tasks.arena import ArenaRow

TEMPLATE_VERSION = 1  # bump when any literal below changes meaning (it is in the cache key)
LAYOUTS = ("interleaved", "sequential")
MIN_PIECE_TOKENS = 16  # a kept turn must be able to show this much of each field

INSTRUCTION = (
    "Please act as an impartial judge. Compare the answers of two AI assistants, A and B, "
    "to the user's conversation below and decide which assistant answered better, or "
    "whether it is a tie."
)
QUESTION = "Which assistant answered better? Reply with [[A]], [[B]] or [[tie]]."
VERDICT = "My verdict is: [["
_SLOT = "\x00BODY\x00"


def segments(layout: str, k: int) -> list:
    """Body between prefix and suffix for k turns: str literals and (field, turn) slots."""
    seg: list = []
    if layout == "interleaved":
        for t in range(k):
            n = t + 1
            seg += [f"\n\n[User Question {n}]\n", ("prompt", t),
                    f"\n\n[Assistant A's Answer {n}]\n", ("response_a", t),
                    f"\n\n[Assistant B's Answer {n}]\n", ("response_b", t)]
    else:
        for who, field in (("A", "response_a"), ("B", "response_b")):
            seg.append(f"\n\n<|The Start of Assistant {who}'s Conversation with User|>")
            for t in range(k):
                seg += ["\n\n### User:\n", ("prompt", t), f"\n\n### Assistant {who}:\n", (field, t)]
            seg.append(f"\n\n<|The End of Assistant {who}'s Conversation with User|>")
    return seg


def template_key(layout: str) -> str:
    """Identifies the judge template for the cache key without loading a tokenizer (the chat
    template itself is covered by the tokenizer files' hash)."""
    lit = "\x01".join([str(TEMPLATE_VERSION), layout, INSTRUCTION, QUESTION, VERDICT,
                       repr(segments(layout, 2))])
    return hashlib.sha256(lit.encode()).hexdigest()[:16]


class PromptBuilder:
    """Builds token ids for rows. Picklable (workers get a copy); holds a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer, max_length: int, layout: str = "interleaved"):
        if layout not in LAYOUTS:
            raise ConfigError(f"data.prompt_layout={layout!r}: expected one of {list(LAYOUTS)}")
        self.max_length, self.layout = int(max_length), layout
        # Gemma has no system role: the instruction opens the first user turn, and the
        # generation prompt plus a fixed verdict opener ends it, so the last token (the one
        # pooled by the classifier) is the same for every row.
        chat = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], tokenize=False,
                                             add_generation_prompt=True)
        head, tail = chat.split(_SLOT)
        self.prefix_text = head + INSTRUCTION
        self.suffix_text = "\n\n" + QUESTION + tail + VERDICT
        self._tok = tokenizer.backend_tokenizer
        self._tok.encode_special_tokens = False  # template: parse <bos>, <start_of_turn>, ...
        self.prefix = self._tok.encode(self.prefix_text, add_special_tokens=False).ids
        self.suffix = self._tok.encode(self.suffix_text, add_special_tokens=False).ids
        self._tok.encode_special_tokens = True  # from now on: text, specials stay plain text
        if self.prefix[:1] != [BOS_ID] or BOS_ID in self.prefix[1:] + self.suffix:
            raise ValueError("chat template must start with <bos> exactly once")
        self._literal_cache: dict[str, list[int]] = {}
        fixed = len(self.prefix) + len(self.suffix) + self._overhead(1)
        if self.max_length < fixed + 3 * MIN_PIECE_TOKENS:
            raise ConfigError(f"data.max_length={max_length} cannot hold the judge template "
                              f"({fixed} tokens) plus {MIN_PIECE_TOKENS} tokens per field")

    # -- layout ---------------------------------------------------------------------
    def _segments(self, k: int) -> list:
        return segments(self.layout, k)

    def _literal(self, s: str) -> list[int]:
        ids = self._literal_cache.get(s)
        if ids is None:
            ids = self._literal_cache[s] = self._tok.encode(s, add_special_tokens=False).ids
        return ids

    def _overhead(self, k: int) -> int:
        return sum(len(self._literal(s)) for s in self._segments(k) if isinstance(s, str))

    # -- build ----------------------------------------------------------------------
    def encode_texts(self, rows: Sequence[ArenaRow]) -> list[dict[str, list[list[int]]]]:
        """Token lists per field per turn for many rows in one batched tokenizer call."""
        texts, spans = [], []
        for r in rows:
            start = len(texts)
            for f in ("prompt", "response_a", "response_b"):
                texts += [t.strip() for t in getattr(r, f)]
            spans.append((start, len(r.prompt)))
        enc = self._tok.encode_batch(texts, add_special_tokens=False)
        out = []
        for start, n in spans:
            out.append({f: [enc[start + j * n + t].ids for t in range(n)]
                        for j, f in enumerate(("prompt", "response_a", "response_b"))})
        return out

    def build(self, row: ArenaRow) -> np.ndarray:
        return self.build_many([row])[0]

    def build_many(self, rows: Sequence[ArenaRow]) -> list[np.ndarray]:
        return [self.assemble(tok) for tok in self.encode_texts(rows)]

    def assemble(self, toks: dict[str, list[list[int]]]) -> np.ndarray:
        """Concatenate template and (truncated) text token lists; len <= max_length."""
        n = len(toks["prompt"])
        copies = {"prompt": 2 if self.layout == "sequential" else 1,
                  "response_a": 1, "response_b": 1}
        fixed = len(self.prefix) + len(self.suffix)
        # Keep the earliest turns: drop the latest turn while the kept turns could not each
        # show MIN_PIECE_TOKENS of every field.
        k = n
        while k > 1:
            need = sum(copies[f] * min(len(p), MIN_PIECE_TOKENS)
                       for f in copies for p in toks[f][:k])
            if fixed + self._overhead(k) + need <= self.max_length:
                break
            k -= 1
        budget = self.max_length - fixed - self._overhead(k)
        fields = list(copies)
        # Fair split of the budget between prompt / response_a / response_b, then within a
        # field between its turns; each piece keeps its first tokens.
        field_alloc = fair_split([copies[f] * sum(len(p) for p in toks[f][:k]) for f in fields],
                                 budget)
        cut: dict[str, list[list[int]]] = {}
        for f, a in zip(fields, field_alloc):
            per_turn = fair_split([len(p) for p in toks[f][:k]], a // copies[f])
            cut[f] = [p[:m] for p, m in zip(toks[f][:k], per_turn)]
        ids = list(self.prefix)
        for s in self._segments(k):
            ids += self._literal(s) if isinstance(s, str) else cut[s[0]][s[1]]
        ids += self.suffix
        assert len(ids) <= self.max_length
        return np.asarray(ids, dtype=np.int32)

    def render(self, ids: Sequence[int]) -> str:
        """Decoded text of built ids (debugging; shows the special tokens)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)
