"""Packed varlen Gemma2Classifier vs transformers' Gemma2ForSequenceClassification (eager, padded batch).

Same tiny config and weights, same sequences; each step = forward + backward + AdamW step.
A and B runs are interleaved and repeated; medians.
Reported throughput counts real (unpadded) tokens only.

Lengths: token counts of real arena rows (Gemma 2 tokenizer), capped at the recipe's max_length 4096,
then scaled by max_len/4096 so a CPU run keeps the padding ratio of the real length distribution.

    python -m bench.bench_model [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.model import Gemma2Classifier
from trainer.model.testing import pack, tiny_args, to_transformers

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def arena_lengths(n_rows: int = 400) -> list[int]:
    """Token counts of the first rows of train.csv (prompt + both responses, Gemma 2 tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURES / "gemma2-tokenizer")
    texts = []
    with open(FIXTURES / "arena" / "train.csv", newline="") as f:
        for row in csv.DictReader(f):
            parts = json.loads(row["prompt"]) + json.loads(row["response_a"]) + json.loads(row["response_b"])
            texts.append("\n".join(p or "" for p in parts))
            if len(texts) == n_rows:
                break
    return [len(ids) for ids in tok(texts)["input_ids"]]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(quick: bool = True, threads: int = 1) -> list[dict]:
    """threads=1 by default: intra-op threads spin-wait badly on a shared, oversubscribed CPU."""
    torch.set_num_threads(threads)
    max_len, batch_size, reps = (256, 8, 3) if quick else (512, 8, 7)
    rng = random.Random(0)
    lengths = [max(2, round(min(n, 4096) * max_len / 4096)) for n in rng.sample(arena_lengths(), batch_size)]
    vocab = 4096
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    labels = torch.tensor([i % 3 for i in range(batch_size)])

    torch.manual_seed(0)
    args = tiny_args(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                     sliding_window=128, initializer_range=0.02, head="linear")
    ours = Gemma2Classifier(args).train()
    hf = to_transformers(ours).train()  # same weights
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-5)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    packed = pack(seqs)
    padded = torch.zeros(batch_size, max(lengths), dtype=torch.long)  # right padding with pad id 0
    mask = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, : len(s)], mask[i, : len(s)] = s, 1

    def step(model, opt, **batch):
        logits = model(**batch)
        logits = logits if torch.is_tensor(logits) else logits.logits
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_step(pooled=True):
        ours.args.last_layer_pooled_only = pooled
        step(ours, ours_opt, **packed)

    runs = {
        "ours": ours_step,
        "ours_full_last_layer": lambda: ours_step(pooled=False),
        "hf": lambda: step(hf, hf_opt, input_ids=padded, attention_mask=mask, use_cache=False),
    }
    for fn in runs.values():  # warm-up
        fn()
    times = {k: [] for k in runs}
    for _ in range(reps):  # interleave so machine noise hits every variant alike
        for k, fn in runs.items():
            times[k].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    real, padded_tokens = sum(lengths), padded.numel()
    tps = {k: real / v for k, v in med.items()}
    print(f"threads {threads}; lengths {lengths} real {real} padded {padded_tokens} ({padded_tokens / real:.2f}x)")
    for k in runs:
        print(f"{k:>22}: {med[k] * 1e3:8.1f} ms/step  {tps[k]:9.0f} real tok/s")
    print(f"packed / transformers eager: {tps['ours'] / tps['hf']:.2f}x")
    return [
        {"name": "train_step_real_tokens_per_s_packed_vs_hf_eager", "ours": tps["ours"], "alternative": tps["hf"],
         "ratio": tps["ours"] / tps["hf"], "limit": padded_tokens / real,
         "unit": "tokens/s (limit = padded / real tokens: the gain from dropping padding alone)"},
        {"name": "train_step_real_tokens_per_s_pooled_last_layer_vs_full", "ours": tps["ours"],
         "alternative": tps["ours_full_last_layer"], "ratio": tps["ours"] / tps["ours_full_last_layer"],
         "limit": None, "unit": "tokens/s"},
        {"name": "padded_over_real_tokens", "ours": 1.0, "alternative": padded_tokens / real,
         "ratio": real / padded_tokens, "limit": None, "unit": "tokens/token"},
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    for row in run(quick=a.quick, threads=a.threads):
        print(json.dumps(row))
