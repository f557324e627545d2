"""Data pipeline benchmark: token-budget packing quality and tokenization throughput.

python -m bench.bench_data [--quick]   (quick: 5,000 replicated rows instead of 55,000)
Each row: name, ours, alternative, ratio (ours / alternative), limit (what ours must meet), unit.
Uses the Gemma 2 tokenizer fixture (Gemma Terms of Use: ai.google.dev/gemma/terms).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trainer.data.sampler import TokenBudgetSampler
from trainer.data.tokenize import load_tokenized
from trainer.tasks import ArenaTask

ARENA = ArenaTask()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TRAIN = SHARED / "fixtures" / "arena" / "train.csv"
TOK = SHARED / "fixtures" / "gemma2-tokenizer"
G, MAX_TOKENS, MAX_LENGTH = 80, 16384, 4096  # the recipe's 9B settings


def _row(name, ours, alt, limit, unit):
    return {"name": name, "ours": round(float(ours), 4), "alternative": round(float(alt), 4),
            "ratio": round(float(ours) / float(alt), 4) if alt else float("inf"), "limit": limit,
            "unit": unit}


def naive_plan(rows, lengths, world_size, max_tokens):
    """Alternative: deal the step's rows to ranks in order, cut each rank's list greedily,
    then pad every rank to the largest micro-batch count (empty micro-batches)."""
    per_rank = [rows[r::world_size] for r in range(world_size)]
    plans = []
    for rr in per_rank:
        mbs, cur, load = [], [], 0
        for i in rr:
            if cur and load + lengths[i] > max_tokens:
                mbs.append(cur)
                cur, load = [], 0
            cur.append(i)
            load += lengths[i]
        mbs.append(cur)
        plans.append(mbs)
    k = max(len(p) for p in plans)
    return [p + [[]] * (k - len(p)) for p in plans]


def packing_rows(lengths, world_size, budget=MAX_TOKENS):
    s = TokenBudgetSampler(lengths, global_batch_rows=G, max_tokens=budget,
                           world_size=world_size, seed=0)
    fill, imb, fill_n, imb_n, bound = [], [], [], [], []
    real_total = padded_total = 0
    for st in range(s.steps_per_epoch):
        plan = [[mb.indices for mb in mbs] for mbs in s.plan_global(0, st)]
        naive = naive_plan(s.step_rows(0, st), lengths, world_size, budget)
        # best possible fill: the fewest micro-batches per rank that could hold the step
        step_tokens = int(lengths[s.step_rows(0, st)].sum())
        bound.append(step_tokens / (max(1, -(-step_tokens // (world_size * budget))) * world_size * budget))
        for p, f, im in ((plan, fill, imb), (naive, fill_n, imb_n)):
            loads = [sum(int(lengths[i]) for mb in mbs for i in mb) for mbs in p]
            f.append(sum(loads) / (len(p[0]) * world_size * budget))
            im.append(max(loads) / np.mean(loads))
        # the same micro-batches as padded [B, longest] batches instead of packed rows
        for mbs in plan:
            for mb in mbs:
                ls = lengths[mb]
                real_total += int(ls.sum())
                padded_total += len(ls) * int(ls.max())
    w = f" (W={world_size}, G={G}, budget {budget})"
    return [_row("budget fill" + w, np.mean(fill), np.mean(fill_n), f">= {0.95 * np.mean(bound):.3f}",
                 "real/(micro x budget); limit: 95% of the k=ceil(tokens/(W x budget)) bound"),
            _row("rank imbalance" + w, np.mean(imb), np.mean(imb_n), "<= 1.05", "max/mean tokens per rank"),
            _row("padding overhead" + w, 0.0, (padded_total - real_total) / real_total, "== 0",
                 "padded/real tokens (alt: pad each micro-batch to its longest)")]


def replicate(src: Path, dst: Path, n_rows: int) -> None:
    with open(src, newline="", encoding="utf-8") as f:
        csv.field_size_limit(2**31 - 1)
        reader = csv.DictReader(f)
        rows, header = list(reader), reader.fieldnames
    with open(dst, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for i in range(n_rows):
            w.writerow(dict(rows[i % len(rows)], id=str(10_000_000 + i)))  # ids stay unique


def throughput_rows(n_rows: int, num_workers: int = 2) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"train_x{n_rows}.csv"
        replicate(TRAIN, path, n_rows)
        t0 = time.perf_counter()
        ds = load_tokenized(path, ARENA, TOK, MAX_LENGTH, cache_dir=Path(tmp) / "cache", num_workers=num_workers)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds2 = load_tokenized(path, ARENA, TOK, MAX_LENGTH, cache_dir=Path(tmp) / "cache")
        warm = time.perf_counter() - t0
        assert len(ds) == len(ds2) == n_rows
    return [_row(f"tokenize {n_rows} rows: cached vs cold ({num_workers} workers)", n_rows / warm,
                 n_rows / cold, "cached >= 20x cold", "rows/s")]


def run(quick: bool = False, smoke: bool = False) -> list[dict]:
    """smoke: the aggregator's smallest mode (bench.run --smoke): quick, but 500 rows tokenized."""
    quick = quick or smoke
    lengths = load_tokenized(TRAIN, ARENA, TOK, MAX_LENGTH, num_workers=2).lengths.astype(np.int64)
    rows = []
    for ws in ((4,) if quick else (1, 4, 8)):
        rows += packing_rows(lengths, ws)
    # the 27B setting: 2,048-token budget, rows truncated to 2,048
    short = load_tokenized(TRAIN, ARENA, TOK, 2048, num_workers=2).lengths.astype(np.int64)
    rows += packing_rows(short, 4, budget=2048)
    rows += throughput_rows(500 if smoke else 5_000 if quick else 55_000)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = ap.parse_args(argv)
    rows = run(args.quick)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    w = max(len(r["name"]) for r in rows)
    print(f"{'name':<{w}}  {'ours':>10} {'alternative':>12} {'ratio':>8}  limit / unit")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['ours']:>10} {r['alternative']:>12} {r['ratio']:>8}  "
              f"{r['limit']} / {r['unit']}")


if __name__ == "__main__":
    main(sys.argv[1:])
