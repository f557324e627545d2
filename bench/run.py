"""Run every benchmark and print one table: our figure, the alternative's on the same work, ratio, limit.

    python -m bench.run [--smoke | --quick] [--only train,data,...] [--json PATH]

Modes: --smoke (seconds per benchmark; what tests/test_bench.py runs), --quick (minutes in all on a 2-core
CPU), default full. Each benchmark module exposes run(quick: bool[, smoke: bool]) -> list[dict] with rows
{name, ours, alternative, ratio, limit, unit} (optional: status, note). A module that is not there yet
gives a "not available" row; one that raises gives an "error" row and the exit status 1.
Method and latest figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

# name -> (module, what it measures; the number is the item of issue 9)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "train": ("bench.bench_train", "1. packed trainer step vs HF padded batches, real tokens/s"),
    "model": ("bench.bench_model", "1. packed model fwd+bwd+AdamW vs HF eager, one padded batch"),
    "data": ("bench.bench_data", "2./3. sampler budget fill, rank imbalance; tokenization cold vs cached"),
    "memory": ("bench.bench_memory", "4. per-rank param+grad+optimizer bytes at 1/2/4 processes"),
    "checkpoint": ("bench.bench_checkpoint", "5. checkpoint save/load time and size, sync vs async"),
    "adapters": ("bench.bench_adapters", "full vs LoRA vs QLoRA: per-rank state bytes and tokens/s at 2 ranks"),
    "gpu": ("bench.bench_gpu", "GPU: 2B / 9B-shaped bf16 tokens/s/GPU and MFU vs transformers"),
}
MODES = ("smoke", "quick", "full")


def _blank(name: str, status: str, note: str) -> dict:
    return {"name": name, "ours": None, "alternative": None, "ratio": None, "limit": None, "unit": "",
            "status": status, "note": note}


def call_run(fn, mode: str) -> list[dict]:
    """Call a module's run() in `mode`: smoke=True where it has that parameter, else quick=True."""
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "quick" in params:
        kwargs["quick"] = mode != "full"
    if "smoke" in params:
        kwargs["smoke"] = mode == "smoke"
    return list(fn(**kwargs))


def run_one(name: str, mode: str) -> dict:
    module, _ = BENCHMARKS[name]
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # the module is there but one of its imports is missing: a real error
            raise
        return {"status": "not available", "elapsed_s": 0.0,
                "rows": [_blank(name, "not available", f"{module} is not in this checkout")]}
    try:
        rows = call_run(mod.run, mode)
        status = "ok"
    except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
        traceback.print_exc()
        rows = [_blank(name, "error", f"{type(e).__name__}: {e}"[:300])]
        status = "error"
    finally:
        torch.set_num_threads(threads)  # benchmarks may pin intra-op threads
    for r in rows:
        r.setdefault("status", "ok")
    return {"status": status, "elapsed_s": round(time.perf_counter() - t0, 2), "rows": rows}


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def table(results: dict[str, dict]) -> str:
    """One markdown table: benchmark, name, ours, alternative, ratio (ours/alternative), limit, unit."""
    head = ["bench", "name", "ours", "alternative", "ratio", "limit", "unit / note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bench, res in results.items():
        for r in res["rows"]:
            unit = r.get("unit") or ""
            if r.get("status", "ok") != "ok":
                unit = f"**{r['status']}**: {r.get('note', '')}"
            cells = [bench, r["name"], fmt(r.get("ours")), fmt(r.get("alternative")), fmt(r.get("ratio")),
                     fmt(r.get("limit")), unit]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def parse_only(value: str | None) -> list[str]:
    if not value:
        return list(BENCHMARKS)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--smoke", action="store_true", help="smallest mode: a few seconds per benchmark")
    g.add_argument("--quick", action="store_true", help="minutes in all on a 2-core CPU")
    ap.add_argument("--only", type=parse_only, default=parse_only(None), metavar="NAME[,NAME]",
                    help="subset of: " + ", ".join(BENCHMARKS))
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    results = {}
    for name in args.only:
        print(f"== {name} ({BENCHMARKS[name][1]}) [{mode}]", file=sys.stderr, flush=True)
        results[name] = run_one(name, mode)
        print(f"== {name}: {results[name]['status']} in {results[name]['elapsed_s']:.1f} s", file=sys.stderr,
              flush=True)
    elapsed = time.perf_counter() - t0
    info = machine()
    print(f"\n# bench.run --{mode}  {started:%Y-%m-%d %H:%M} UTC  {elapsed:.0f} s  "
          + "  ".join(f"{k}={v}" for k, v in info.items()))
    print("ratio = ours / alternative; limit = the theoretical bound or target where one exists.\n")
    print(table(results), flush=True)
    if args.json:
        out = {"mode": mode, "date": started.isoformat(timespec="seconds"), "elapsed_s": round(elapsed, 1),
               "machine": info, "benchmarks": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 1 if any(r["status"] == "error" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
