"""Training throughput: the packed trainer's step vs transformers on the same rows padded into batches.

Ours: TokenBudgetSampler (world size 1) -> VarlenCollator -> Gemma2Classifier (reference attention, pooled
last layer) -> weighted soft cross-entropy summed / step rows, one backward per micro-batch ->
AnyPrecisionAdamW (fp32 states, the cpu_demo recipe).
Alternative (HF Trainer-style): the same rows of each optimizer step, in the same order, cut into
micro-batches of a fixed number of rows, right-padded to the longest row of the micro-batch
(DataCollatorWithPadding), Gemma2ForSequenceClassification (eager) with the same weights, mean loss scaled
for gradient accumulation, torch.optim.AdamW (the Trainer's default adamw_torch).

Same tiny config as bench_model. Lengths: real arena rows as the trainer sees them (judge prompt, Gemma 2
tokenizer, max_length 4096), scaled by max_len/4096 so a CPU step keeps the padding ratio of the real
length distribution; token ids are random. Ours gets a token budget of ROWS_PER_MICRO x max_len per
micro-batch, HF micro-batches hold ROWS_PER_MICRO rows (at most the same padded tokens).
Timing: every optimizer step of ours and of HF is timed back to back (A, B, A, B, ...), the epoch time is
the sum, repeated; medians. Throughput counts real (unpadded) tokens only. The limit is padded / real
tokens of the HF batches: the gain from dropping padding alone if cost were linear in tokens (the pooled
last layer and per-sequence attention can beat it).

    python -m bench.bench_train [--quick | --smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

ROWS_PER_MICRO = 4
# mode: (max_len, rows, global_batch_rows, reps)
MODES = {"smoke": (256, 16, 8, 1), "quick": (512, 48, 16, 5), "full": (1024, 96, 16, 5)}
_LENGTH_CACHE: dict[int, np.ndarray] = {}


def arena_prompt_lengths(max_length: int = 4096) -> np.ndarray:
    """Token counts of every train.csv row as the trainer tokenizes it (judge prompt, truncated to
    max_length); cached on disk by trainer.data (a hit costs ~10 ms)."""
    if max_length not in _LENGTH_CACHE:
        from bench.bench_data import TOK, TRAIN
        from trainer.data.tokenize import load_tokenized
        from trainer.tasks import ArenaTask

        _LENGTH_CACHE[max_length] = load_tokenized(TRAIN, ArenaTask(), TOK, max_length,
                                                   num_workers=2).lengths.astype(np.int64)
    return _LENGTH_CACHE[max_length]


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against soft labels [B, 3]."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def run(quick: bool = True, smoke: bool = False, threads: int = 1) -> list[dict]:
    from trainer.data.collate import Item, VarlenCollator
    from trainer.data.sampler import TokenBudgetSampler
    from trainer.model import Gemma2Classifier
    from trainer.model.testing import tiny_args, to_transformers
    from trainer.optim import AnyPrecisionAdamW

    mode = "smoke" if smoke else "quick" if quick else "full"
    max_len, n_rows, G, reps = MODES[mode]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # intra-op threads spin-wait badly on a shared CPU
    try:
        rng = np.random.default_rng(0)
        real = arena_prompt_lengths(4096)
        sample = rng.choice(real, size=n_rows, replace=False)
        lengths = np.maximum(2, np.round(sample * max_len / 4096)).astype(np.int64)
        vocab = 4096
        seqs = [rng.integers(1, vocab, size=int(n)).astype(np.int64) for n in lengths]
        labels = rng.dirichlet(np.ones(3), size=n_rows).astype(np.float32)
        sampler = TokenBudgetSampler(lengths, global_batch_rows=G, max_tokens=ROWS_PER_MICRO * max_len,
                                     world_size=1, rank=0, seed=0)
        collate = VarlenCollator(3)

        torch.manual_seed(0)
        args = tiny_args(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                         sliding_window=max_len // 4, initializer_range=0.02, head="linear")
        ours = Gemma2Classifier(args).train()
        hf = to_transformers(ours).train()  # same weights
        ours_opt = AnyPrecisionAdamW(ours.parameters(), lr=1e-5)
        hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)

        steps = []  # per optimizer step: (ours micro-batches, hf micro-batches, num_rows)
        real_tokens = padded_tokens = n_micro_ours = n_micro_hf = 0
        for s in range(sampler.steps_per_epoch):
            mbs = [collate([Item(seqs[i], labels[i], int(i), float(w)) for i, w in zip(mb.indices, mb.weights)])
                   for mb in sampler.plan_step(0, s)]
            rows = sampler.step_rows(0, s)
            hf_mbs = []
            for c in range(0, len(rows), ROWS_PER_MICRO):
                chunk = rows[c:c + ROWS_PER_MICRO]
                width = int(lengths[chunk].max())
                ids = torch.zeros(len(chunk), width, dtype=torch.long)  # pad id 0, right padding
                mask = torch.zeros_like(ids)
                for b, i in enumerate(chunk):
                    ids[b, :lengths[i]] = torch.from_numpy(seqs[i])
                    mask[b, :lengths[i]] = 1
                hf_mbs.append((ids, mask, torch.from_numpy(labels[chunk])))
                padded_tokens += ids.numel()
            real_tokens += int(lengths[rows].sum())
            n_micro_ours += len(mbs)
            n_micro_hf += len(hf_mbs)
            steps.append((mbs, hf_mbs, len(rows)))

        def ours_step(k):
            mbs, _, num_rows = steps[k]
            for mb in mbs:
                loss = (soft_ce(ours(**mb.inputs), mb.labels) * mb.weights).sum() / num_rows
                loss.backward()
            ours_opt.step()
            ours_opt.zero_grad(set_to_none=True)

        def hf_step(k):
            _, hf_mbs, num_rows = steps[k]
            for ids, mask, lab in hf_mbs:
                logits = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
                loss = soft_ce(logits, lab).mean() * (len(lab) / num_rows)  # grad accumulation scaling
                loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)

        ours_step(0)  # warm-up
        hf_step(0)
        t_ours, t_hf = [], []
        for _ in range(reps):
            a = b = 0.0
            for k in range(len(steps)):  # interleaved step by step: machine noise hits both alike
                t0 = time.perf_counter()
                ours_step(k)
                t1 = time.perf_counter()
                hf_step(k)
                b += time.perf_counter() - t1
                a += t1 - t0
            t_ours.append(a)
            t_hf.append(b)
    finally:
        torch.set_num_threads(old_threads)

    tps_ours = real_tokens / statistics.median(t_ours)
    tps_hf = real_tokens / statistics.median(t_hf)
    pad_ratio = padded_tokens / real_tokens
    print(f"[bench_train] {mode}: {n_rows} arena rows scaled to max_len {max_len}, {len(steps)} steps of {G} rows; "
          f"real {real_tokens} tok, HF padded {padded_tokens} ({pad_ratio:.2f}x); micro-batches ours {n_micro_ours}, "
          f"hf {n_micro_hf}; epoch s ours {statistics.median(t_ours):.2f}, hf {statistics.median(t_hf):.2f}")
    return [{
        "name": f"train step real tokens/s: packed trainer vs HF padded eager ({n_rows} rows, cap {max_len})",
        "ours": round(tps_ours, 1), "alternative": round(tps_hf, 1), "ratio": round(tps_ours / tps_hf, 3),
        "limit": round(pad_ratio, 3),
        "unit": "real tok/s (fwd+bwd+opt); limit = HF padded/real tokens",
    }]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    for row in run(quick=a.quick, smoke=a.smoke, threads=a.threads):
        print(json.dumps(row))
