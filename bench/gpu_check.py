"""The GPU check: one command that verifies this project's CUDA paths and measures them.

    python -m bench.gpu_check --out OUTDIR [--cpu-selftest] [--only env,train,...]
    (normally through scripts/gpu-check.sh, which installs the carried wheels first)

Every part runs in a fresh interpreter of its own under a time budget (8 minutes in all on a GPU),
so a crash, a hang or a CUDA error in one part is reported and the next part still runs. Parts:

  env             torch / CUDA / device / package versions
  cuda_tests      pytest on every test marked cuda (flex fwd+bwd vs reference, no host sync in a
                  training step, compiled layers vs eager, bf16 vs fp32, flash-attn / TE when present)
  parity          flex vs reference attention at Gemma 2 2B widths on arena-length rows, fp32 and
                  bf16: logits and gradients, max relative error
  train           the real trainer (torchrun, 1 rank, NCCL, FSDP2): a 2B-shaped bf16 model from
                  scratch, 16,384-token packed micro-batches, AnyPrecisionAdamW + Kahan, activation
                  checkpointing, one async DCP save mid-run, then a second run reloads that
                  checkpoint and replays the following steps (their losses must match)
  train_compiled  the same run with model.compile=true: tokens/s and MFU, losses vs eager
  bench           bench.bench_gpu: ours vs transformers (sdpa or eager), 2B- and 9B-shaped
  lora            the 2B-shaped run with LoRA and with QLoRA (torchao NF4) adapters: tokens/s,
                  peak memory, trainable parameters, per-rank state
  planner         the planner on the train part's config: planned per-device memory and step time, and
                  the planned peak against the train part's measured peak

``--cpu-selftest`` runs the same parts and code paths on CPU with tiny shapes and gloo (what CI
runs, so the check cannot rot); CUDA-only tests skip there. Results: OUTDIR/gpu-check.json,
OUTDIR/gpu-check.md (printed at the end) and OUTDIR/gpu-check.log (every part's output).
Exit status 1 when a part failed or ran out of time, else 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# The 2B-shaped training runs: Gemma 2 2B (the gemma2_2b preset, from scratch), the recipe's
# token budget and optimizer, bf16 weights; a few steps only (the first ones compile and warm up).
GPU_TRAIN = [
    "model=gemma2_2b", "model.dtype=bfloat16", "model.activation_checkpointing=true",
    "parallel.param_dtype=bfloat16", "parallel.backend=nccl", "trainer.device=cuda",
    "data.max_length=4096", "data.max_tokens=16384", "data.global_batch_rows=16", "data.limit_train_rows=256",
    "data.num_workers=8", "data.loader_workers=2",
]
# The same code paths on CPU: tiny fp32 model, gloo.
CPU_TRAIN = [
    "+experiment=cpu_demo", "model.hidden_size=32", "model.intermediate_size=64", "model.head_dim=16",
    "model.query_pre_attn_scalar=16", "parallel.backend=gloo", "trainer.device=cpu", "trainer.num_threads=1",
    "data.max_length=256", "data.max_tokens=1024", "data.global_batch_rows=8", "data.limit_train_rows=64",
    "model.compile_backend=aot_eager",
]
# One checkpoint only (a 2B model's bf16 weights + AnyPrecision state are ~21 GB; the GPU machine
# has 64 GiB of disk): the async save at step SAVE_AT overlaps the steps after it.
COMMON_TRAIN = ["model.head_dropout=0.0", "trainer.eval_every=null", "data.eval_path=null",
                "logging.progress_bar=false", "checkpoint.keep_last=10", "checkpoint.async_save=true",
                "checkpoint.at_end=false"]
TRAIN_STEPS, SAVE_AT = 5, 3  # the reload replays steps 4..5


class Part:
    def __init__(self, name: str, gpu_s: int, cpu_s: int, what: str, fn: Callable[[argparse.Namespace], dict]):
        self.name, self.gpu_s, self.cpu_s, self.what, self.fn = name, gpu_s, cpu_s, what, fn


def _row(metric: str, value: Any, unit: str = "", note: str = "") -> dict:
    return {"metric": metric, "value": value, "unit": unit, "note": note}


def _device(selftest: bool):
    import torch

    if selftest:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False): run with --cpu-selftest on CPU")
    return torch.device("cuda", 0)


# ---- parts -------------------------------------------------------------------------------------
def part_env(a) -> dict:
    import torch

    rows = [_row("python", platform.python_version()), _row("torch", torch.__version__),
            _row("cuda (torch build)", torch.version.cuda or "none")]
    # versions from the installed metadata: importing each (peft pulls transformers, ...) is slow
    for dist in ("triton", "transformers", "peft", "safetensors", "tokenizers", "protobuf", "hydra-core", "omegaconf",
                 "submitit", "wandb", "torchao", "flash-attn", "transformer-engine"):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        rows.append(_row(dist, version))
    from trainer.model.attention import flash_attn_available, resolve_attn_impl
    from trainer.model.rope import te_available

    rows += [_row("flash-attn importable", flash_attn_available()),
             _row("transformer-engine importable", te_available())]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows += [_row("device", p.name), _row("device memory", round(p.total_memory / 2**30, 1), "GiB"),
                 _row("compute capability", f"{p.major}.{p.minor}"), _row("device count", torch.cuda.device_count())]
        from trainer.flops import detect_peak_key, peak_flops

        key = detect_peak_key(torch.device("cuda", 0))
        rows.append(_row("bf16 dense peak used for MFU", peak_flops(key), "FLOP/s", key))
    else:
        rows.append(_row("device", "cpu (no CUDA)"))
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    rows.append(_row("attention backend for bf16 training (auto)", resolve_attn_impl("auto", dev, torch.bfloat16)))
    return {"rows": rows}


def part_cuda_tests(a) -> dict:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text())
    xml = Path(a.work) / "cuda-tests.xml"
    cmd = [PYTHON, "-m", "pytest", "-v", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    proc = subprocess.run(cmd, cwd=REPO)  # output straight into the log: a timeout still shows what passed
    counts = _junit_counts(xml)
    failed = counts.pop("failed_names")
    status = "ok" if proc.returncode in (0, 5) and not failed else "fail"
    if counts["passed"] == 0 and counts["skipped"] and status == "ok":
        status = "skipped"
    rows = [_row("tests passed", counts["passed"]), _row("tests skipped", counts["skipped"]),
            _row("tests failed", counts["failed"], note="; ".join(failed)[:500]),
            _row("files", len(files), note=" ".join(files))]
    return {"status": status, "rows": rows}


def _junit_counts(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    out = {"passed": 0, "skipped": 0, "failed": 0, "failed_names": []}
    if not xml.is_file():
        return out
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            out["failed"] += 1
            out["failed_names"].append(case.get("name"))
        elif "skipped" in kinds:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def part_parity(a) -> dict:
    """flex vs reference on one model and one packed row of arena-like lengths."""
    import torch

    from bench.bench_gpu import SHAPES
    from trainer.model import Gemma2Classifier, ModelArgs
    from trainer.model.testing import pack, randomize_norms

    dev = _device(a.cpu_selftest)
    cuda = dev.type == "cuda"
    grad = cuda  # CPU flex is forward-only
    shape = dict(SHAPES["2b" if cuda else "tiny"], num_hidden_layers=2)
    lengths = [3000, 700, 1900, 128, 4096, 2500] if cuda else [150, 40, 256, 9, 90]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        args = ModelArgs(**shape, head="linear", rope_impl="torch", initializer_range=0.02,
                         last_layer_pooled_only=False)
        model = Gemma2Classifier(args)
        randomize_norms(model)
        model = model.to(dev, dtype)
        g = torch.Generator().manual_seed(0)
        batch = pack([torch.randint(1, args.vocab_size, (n,), generator=g) for n in lengths])
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        results = {}
        for impl in ("reference", "flex"):
            model.args.attn_impl = impl
            model.select_kernels()
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(grad):
                logits = model(**batch)
                if grad:
                    logits.float().square().sum().backward()
            grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
            results[impl] = (logits.detach().float(), grads)
        (ref, ref_g), (out, out_g) = results["reference"], results["flex"]
        name = str(dtype).replace("torch.", "")
        rows.append(_row(f"flex vs reference logits, {name}", _rel(out, ref), "max rel err",
                         f"{len(lengths)} rows, {sum(lengths)} tokens, 2 layers at {'2B' if cuda else 'tiny'} widths"))
        if ref_g:
            rows.append(_row(f"flex vs reference grads, {name}", max(_rel(out_g[n], ref_g[n]) for n in ref_g),
                             "max rel err over parameters"))
        del model
    limits = {"float32": 1e-3, "bfloat16": 5e-2}
    bad = [r for r in rows if not r["value"] <= limits[r["metric"].rsplit(", ", 1)[1]]]
    return {"status": "fail" if bad else "ok", "rows": rows,
            "note": f"limits: fp32 {limits['float32']}, bf16 {limits['bfloat16']}"}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _train(a, name: str, extra: list[str], steps: int, save_every: int | None, resume: str | None = None) -> dict:
    """One launch.train run under torchrun (1 rank): its run dir, logged step rows and output."""
    run_dir = Path(a.work) / name
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*(CPU_TRAIN if a.cpu_selftest else GPU_TRAIN), *COMMON_TRAIN, *extra, f"trainer.max_steps={steps}",
                 f"checkpoint.every_steps={save_every if save_every else 'null'}", f"trainer.run_dir={run_dir}",
                 f"trainer.resume={resume or 'never'}"]
    from trainer.distributed import free_port

    cmd = [PYTHON, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", "-m", "launch.train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if a.cpu_selftest else "8", "WANDB_MODE": "disabled"}
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True)
    print(proc.stdout[-20000:], proc.stderr[-20000:], sep="\n", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: launch.train exited {proc.returncode}: {_failure_line(proc.stdout + proc.stderr)}")
    from trainer.tracking import METRICS_FILE

    metrics = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    return {"run_dir": run_dir, "steps": [r for r in metrics if "loss_step" in r], "log": proc.stdout + proc.stderr}


def _failure_line(output: str) -> str:
    """The line that says why a run failed: our one-line `error: ...`, else the last exception line
    of a rank's traceback (torchrun's own ChildFailedError summary says nothing)."""
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line).strip() for line in output.splitlines()]
    for line in lines:
        if line.startswith("error: "):
            return line[:400]
    exc = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", line)
           and "ChildFailedError" not in line]
    return (exc[-1] if exc else next((x for x in reversed(lines) if x), "no output"))[:400]


def _throughput_rows(label: str, steps: list[dict], skip: int, cuda: bool) -> list[dict]:
    timed = steps[skip:] or steps[-1:]
    med = lambda k: statistics.median(r[k] for r in timed if r.get(k) is not None)  # noqa: E731
    rows = [_row(f"{label}: tokens/s/GPU", round(med("tokens_per_s_per_device"), 1), "real tok/s",
                 f"median of steps {timed[0]['step']}..{timed[-1]['step']}"),
            _row(f"{label}: step time", round(med("step_time"), 3), "s"),
            _row(f"{label}: first step (compile, warm-up)", round(steps[0]["step_time"], 2), "s")]
    if any(r.get("mfu") is not None for r in timed):
        rows.append(_row(f"{label}: MFU", round(med("mfu"), 4), "model FLOPs / bf16 peak"))
    rows.append(_row(f"{label}: peak memory", round(max(r.get("peak_mem_gb") or 0 for r in steps), 2), "GiB",
                     "torch.cuda.max_memory_allocated" if cuda else "CPU: the process's peak resident set"))
    return rows


def part_train(a) -> dict:
    run = _train(a, "train", [], TRAIN_STEPS, SAVE_AT)
    (Path(a.work) / "train-eager-losses.json").write_text(json.dumps([r["loss_step"] for r in run["steps"]]))
    rows = _throughput_rows("eager", run["steps"], skip=2, cuda=not a.cpu_selftest)
    rows.append(_row("eager: losses", [round(r["loss_step"], 6) for r in run["steps"]]))
    saved = sorted(p.name for p in (run["run_dir"] / "checkpoints").glob("step-*"))
    ckpt = run["run_dir"] / "checkpoints" / f"step-{SAVE_AT:08d}"
    rows.append(_row("async DCP checkpoints committed", saved))
    lines = [line for line in run["log"].splitlines() if "checkpoint" in line.lower() and "sav" in line.lower()]
    rows.append(_row("checkpoint log", lines[-1][-200:] if lines else "none"))
    # reload: a fresh process resumes from the mid-run checkpoint and replays the next steps
    again = _train(a, "train-resumed", [], TRAIN_STEPS, None, resume=str(ckpt))
    first = {r["step"]: r["loss_step"] for r in run["steps"]}
    replay = {r["step"]: r["loss_step"] for r in again["steps"]}
    diffs = [abs(replay[s] - first[s]) for s in replay if s in first]
    ok_resume = sorted(replay) == list(range(SAVE_AT + 1, TRAIN_STEPS + 1))
    rows.append(_row("reload: resumed steps", sorted(replay)))
    rows.append(_row("reload: max |loss diff| vs the uninterrupted run", max(diffs) if diffs else None, "",
                     "bitwise equal" if diffs and max(diffs) == 0 else "not bitwise"))
    finite = all(math.isfinite(r["loss_step"]) for r in run["steps"] + again["steps"])
    status = "ok" if ok_resume and finite and diffs and max(diffs) <= 1e-3 else "fail"
    return {"status": status, "rows": rows}


def part_train_compiled(a) -> dict:
    run = _train(a, "train-compiled", ["model.compile=true"], TRAIN_STEPS, None)
    rows = _throughput_rows("compiled", run["steps"], skip=2, cuda=not a.cpu_selftest)
    losses = [r["loss_step"] for r in run["steps"]]
    rows.append(_row("compiled: losses", [round(x, 6) for x in losses]))
    eager_file = Path(a.work) / "train-eager-losses.json"
    status = "ok" if all(map(math.isfinite, losses)) else "fail"
    if eager_file.is_file():
        eager = json.loads(eager_file.read_text())
        diff = max(abs(x - y) for x, y in zip(losses, eager))
        tol = 1e-5 if a.cpu_selftest else 5e-2  # fp32 on CPU; bf16 kernels fuse differently on GPU
        rows.append(_row("compiled vs eager: max |loss diff|", diff, "", f"limit {tol}"))
        status = status if diff <= tol else "fail"
    else:
        rows.append(_row("compiled vs eager", None, "", "the eager train part did not finish: no comparison"))
    return {"status": status, "rows": rows}


def _bench(shape: str) -> Callable[[argparse.Namespace], dict]:
    def part(a) -> dict:
        import torch

        from bench import bench_gpu

        if a.cpu_selftest:  # bench_gpu's own CPU dry run: the same code at tiny widths, 2 steps
            if shape != "2b":
                return {"status": "skipped", "rows": [], "note": "the CPU self-test runs one (tiny) shape"}
            out = bench_gpu.bench_shape("tiny", "smoke", "reference", torch.device("cpu"))
        else:
            out = bench_gpu.run(quick=True, configs=shape)
        return _bench_rows(out)

    return part


def _bench_rows(out: list[dict]) -> dict:
    rows = [_row(r["name"], r.get("ours"), r.get("unit", ""),
                 f"alternative {r.get('alternative')}, ratio {r.get('ratio')}; {r.get('note', '')}".strip("; "))
            for r in out]
    return {"status": "fail" if any(r.get("status") == "error" for r in out) else "ok", "rows": rows}


def part_lora(a) -> dict:
    """The trainer with LoRA and QLoRA adapters (rank 16, every decoder linear) on the same
    2B-shaped model: tokens/s, peak memory, per-rank state and finite losses. The CPU self-test
    runs QLoRA only (it covers the LoRA path too) on the tiny model."""
    rows, ok = [], True
    adapters = ["qlora"] if a.cpu_selftest else ["lora", "qlora"]
    for adapter in adapters:
        extra = [f"model/adapter={adapter}", "model.adapter.rank=16", "data.limit_train_rows=64"]
        if a.cpu_selftest and adapter == "qlora":
            extra.append("model.adapter.nf4_scaler_block_size=4")  # the tiny model's 32 x 16 weights
        run = _train(a, f"train-{adapter}", extra, 3, None)
        rows += _throughput_rows(adapter, run["steps"], skip=1, cuda=not a.cpu_selftest)
        losses = [r["loss_step"] for r in run["steps"]]
        rows.append(_row(f"{adapter}: losses", [round(x, 6) for x in losses]))
        for pattern, metric in ((r"adapter \w+ .*?: (\d+) trainable of (\d+) parameters", "trainable / total params"),
                                (r"memory per rank, MiB .*?: (.*)$",
                                 "per rank: params / grads / optim = state; peak, MiB")):
            m = re.search(pattern, run["log"], re.M)
            rows.append(_row(f"{adapter}: {metric}", " / ".join(m.groups()) if m else None))
        ok = ok and len(losses) == 3 and all(map(math.isfinite, losses))
    return {"status": "ok" if ok else "fail", "rows": rows}


def part_planner(a) -> dict:
    """The planner on the `train` part's config at one GPU: its per-device figures, and its peak
    against the peak the train part measured (torch.cuda.max_memory_allocated on a GPU; on CPU
    the process RSS, which is not comparable: reported only)."""
    from trainer.config import compose
    from trainer.planner import GB, plan, verdict

    overrides = [*(CPU_TRAIN if a.cpu_selftest else GPU_TRAIN), *COMMON_TRAIN, "plan.world_size=1"]
    import torch

    if not a.cpu_selftest and torch.cuda.is_available():
        overrides.append(f"plan.gpu_memory_gb={torch.cuda.get_device_properties(0).total_memory / GB:.1f}")
    p = plan(compose(overrides))
    d = p.per_device
    rows = [_row(f"planned {k.removesuffix('_bytes')}", round(v / GB, 3), "GB") for k, v in d.items()]
    rows += [_row("planned step time", round(p.step_time_s, 3), "s", f"{p.bound}-bound"), _row("verdict", verdict(p))]
    mem = Path(a.work) / "train" / "memory.json"
    if mem.is_file():  # the train part's first step, measured by the trainer (trainer/memory.py)
        record = json.loads(mem.read_text())
        measured = max(r["peak"] for r in record["per_rank"]) / GB
        planned = (d["peak_bytes"] - d["overhead_bytes"]) / GB
        rows.append(_row("measured peak (train part, first step)", round(measured, 3), "GB", record["peak_method"]))
        rows.append(_row("planned peak without overhead / measured", round(planned / measured, 3), "",
                         "target 0.85-1.15"))
    return {"status": "ok", "rows": rows}


PARTS = [
    # GPU budgets add up to 8 minutes; the parts run in this order, the most telling first.
    Part("env", 15, 20, "versions and device", part_env),
    Part("cuda_tests", 75, 25, "pytest -m cuda", part_cuda_tests),
    Part("parity", 30, 15, "flex vs reference, fp32 and bf16", part_parity),
    Part("train", 115, 40, "2B-shaped bf16, FSDP2 on 1-rank NCCL, async DCP save + reload", part_train),
    Part("train_compiled", 100, 45, "the same with model.compile=true", part_train_compiled),
    Part("bench_2b", 55, 20, "2B-shaped: ours vs transformers (bench.bench_gpu)", _bench("2b")),
    Part("bench_9b", 25, 5, "9B widths, 8 layers: ours vs transformers", _bench("9b")),
    Part("lora", 55, 20, "the 2B-shaped run with LoRA and QLoRA (NF4) adapters", part_lora),
    Part("planner", 10, 15, "planned vs measured peak memory (the train part's config)", part_planner),
]


# ---- driver ------------------------------------------------------------------------------------
def run_part(a) -> None:
    """In the child: run one part, write its result as JSON."""
    part = next(p for p in PARTS if p.name == a.part)
    try:
        res = part.fn(a)
        res.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001 - reported, the parent goes on
        traceback.print_exc()
        res = {"status": "fail", "rows": [], "note": f"{type(e).__name__}: {e}"[:600]}
    Path(a.result).write_text(json.dumps(res, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-check-out", help="folder for gpu-check.{json,md,log}")
    p.add_argument("--cpu-selftest", action="store_true", help="the same parts on CPU, tiny shapes, gloo")
    p.add_argument("--only", default="", help="comma-separated part names (default: all)")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                   help="another time budget for a part (repeatable), e.g. --budget train=200 for a rerun")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.part:
        run_part(a)
        return 0

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    unknown = only - {p.name for p in PARTS}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; parts: {[x.name for x in PARTS]}")
    budgets = {}
    for item in a.budget:
        name, _, seconds = item.partition("=")
        if name not in {x.name for x in PARTS} or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {[x.name for x in PARTS]}")
        budgets[name] = float(seconds)
    mode = "cpu-selftest" if a.cpu_selftest else "gpu"
    log_path = out / "gpu-check.log"
    results, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work, log_path.open("w") as log:
        for part in PARTS:
            if only and part.name not in only:
                continue
            budget = budgets.get(part.name, part.cpu_s if a.cpu_selftest else part.gpu_s)
            result_file = Path(work) / f"{part.name}.json"
            cmd = [PYTHON, "-m", "bench.gpu_check", "--part", part.name, "--result", str(result_file), "--work", work,
                   *(["--cpu-selftest"] if a.cpu_selftest else [])]
            log.write(f"\n===== {part.name} ({part.what}); budget {budget} s\n")
            log.flush()
            t0 = time.perf_counter()
            try:
                # its own session: a timeout kills the part and every process it started (torchrun)
                proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                proc.wait(timeout=budget)
                res = json.loads(result_file.read_text()) if result_file.is_file() else {
                    "status": "fail", "rows": [], "note": f"the part exited {proc.returncode} without a result"}
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                res = {"status": "timeout", "rows": [], "note": f"over its budget of {budget} s: killed"}
            res.update(part=part.name, what=part.what, budget_s=budget, elapsed_s=round(time.perf_counter() - t0, 1))
            results.append(res)
            print(f"[gpu-check] {part.name}: {res['status']} in {res['elapsed_s']} s (budget {budget} s)"
                  + (f" - {res['note']}" if res.get("note") else ""), flush=True)
    report = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "host": platform.node(), "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "elapsed_s": round(time.perf_counter() - t_all, 1), "parts": results}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    table = markdown(report)
    (out / "gpu-check.md").write_text(table)
    print(table)
    return 1 if any(r["status"] in ("fail", "timeout") for r in results) else 0


def markdown(report: dict) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [f"GPU check ({report['mode']}), {report['date']}, {report['elapsed_s']} s", "",
             "| part | status | metric | value | unit | note |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["parts"]:
        head = f"| {r['part']} | {r['status']} ({r['elapsed_s']} s) "
        if not r["rows"]:
            lines.append(head + f"| | | | {cell(r.get('note', ''))} |")
        for i, row in enumerate(r["rows"]):
            lines.append((head if i == 0 else "| | ") + f"| {cell(row['metric'])} | {cell(row['value'])} | "
                         f"{cell(row['unit'])} | {cell(row['note'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
