"""Helpers for the multi-process tests and benchmarks: launch `launch.train` alone or under
torchrun with a tiny fp32 config in a run directory of its own, read metrics.jsonl back, and
load a checkpoint's weights on one process (DCP, no process group, nothing unpickled).

A run is an ordinary subprocess (its own interpreter, its own process group), so tests never
initialise torch.distributed themselves. Workers run with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# A tiny deterministic fp32 model on the real tokenizer (vocab must stay 256000: real ids).
# 64 train rows / 8 per step = 8 steps per epoch; checkpoints every 2 steps; no eval split
# (eval costs time and is tested elsewhere); every checkpoint kept so tests can pick one.
TINY = [
    "+experiment=cpu_demo",
    "model.head_dropout=0.0",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.head_dim=16",
    "model.query_pre_attn_scalar=16",
    "model.vocab_size=256000",
    "data.max_length=256",
    "data.max_tokens=1024",
    "data.global_batch_rows=8",
    "data.limit_train_rows=64",
    "data.limit_eval_rows=16",
    "data.eval_path=null",
    "optim.lr=1e-3",
    "trainer.eval_every=null",
    "trainer.num_threads=1",
    "checkpoint.every_steps=2",
    "checkpoint.keep_last=100",
    "logging.progress_bar=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run_dir: Path, nproc: int, overrides: list[str] = ()) -> list[str]:
    """The command line: plain python for one process, torchrun (loopback rendezvous on a
    free port) for several."""
    args = ["-m", "launch.train", *TINY, *overrides, f"trainer.run_dir={run_dir}"]
    if nproc == 1:
        return [PYTHON, *args]
    return [TORCHRUN, f"--nproc_per_node={nproc}", "--nnodes=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id=t{os.getpid()}-{time.monotonic_ns()}",
            "--max-restarts=0", "--monitor-interval=0.2", *args]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return env


def start(run_dir: Path, nproc: int, overrides: list[str] = (), env: dict[str, str] | None = None
          ) -> subprocess.Popen:
    """Start a run in a new session (its own process group: os.killpg reaches every rank).
    Output goes to <run_dir>/../<name>.launch-<n>.log (read it with launch_log)."""
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    n = len(list(run_dir.parent.glob(f"{run_dir.name}.launch-*.log")))
    log_path = run_dir.parent / f"{run_dir.name}.launch-{n}.log"
    out = open(log_path, "w")  # noqa: SIM115 - closed by the child exit; the fd is inherited
    proc = subprocess.Popen(command(run_dir, nproc, overrides), cwd=REPO, env={**worker_env(), **(env or {})},
                            stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path  # type: ignore[attr-defined]
    out.close()
    return proc


def wait(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"run timed out after {timeout}s:\n{log_text(proc)[-4000:]}") from None


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal every process of a run started by start(): torchrun's process group *and* the
    ranks' own groups (torchrun starts each worker in a new session, so killpg on torchrun
    alone would leave the ranks running). Simulates a node dying with SIGKILL."""
    pids = [proc.pid, *descendants(proc.pid)]
    groups = []
    for pid in pids:
        try:
            groups.append(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for pid in pids:  # freeze everything first so no rank gets further than another
        try:
            os.kill(pid, signal.SIGSTOP if sig == signal.SIGKILL else sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGKILL:
        for g in dict.fromkeys(groups):
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
        _wait_gone(pids)


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and "State:\tZ" not in _read(f"/proc/{p}/status")]
        if not alive:
            return
        time.sleep(0.01)
    raise AssertionError(f"processes {alive} survived SIGKILL")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    out = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        for line in _read(str(status)).splitlines():
            if line.startswith("PPid:"):
                out[int(status.parent.name)] = int(line.split()[1])
                break
    return out


def descendants(pid: int) -> list[int]:
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def log_text(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def run(run_dir: Path, nproc: int, overrides: list[str] = (), *, check: bool = True,
        timeout: float = 240) -> subprocess.Popen:
    """Run to completion. check=True asserts exit code 0 (the log is in the message)."""
    proc = start(run_dir, nproc, overrides)
    rc = wait(proc, timeout)
    if check and rc != 0:
        raise AssertionError(f"run in {run_dir} exited {rc}:\n{log_text(proc)[-6000:]}")
    return proc


def rank_pids(proc: subprocess.Popen) -> list[int]:
    """PIDs of the training processes of a run: torchrun's children, or the process itself."""
    if Path(proc.args[0]).name != "torchrun":
        return [proc.pid]
    parents = _parents()
    return sorted(c for c, p in parents.items() if p == proc.pid)


# ---- reading runs back ------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Training rows of metrics.jsonl by step. After a resume the file is appended to, so a
    step trained twice appears twice: the last row wins (the one of the run that went on)."""
    rows: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss_step" in row and row.get("step") is not None:
            rows[int(row["step"])] = row
    return dict(sorted(rows.items()))


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss_step"] for s, r in read_metrics(run_dir).items()}


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {s: r["grad_norm"] for s, r in read_metrics(run_dir).items()}


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def latest_checkpoint(run_dir: Path) -> Path:
    root = Path(run_dir) / "checkpoints"
    return root / (root / "latest").read_text().strip()


def load_weights(ckpt: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors under `prefix` from a DCP checkpoint, on this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state


def trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "trainer_state.json").read_text())


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ (max abs diff {max_abs_diff(a, b):.3g}), e.g. {bad[:3]}"


def wait_for(predicate, timeout: float = 120, interval: float = 0.02, proc: subprocess.Popen | None = None):
    """Poll until predicate() is truthy (returns it); fail if proc exits first or on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before the condition held:\n"
                                 f"{log_text(proc)[-4000:]}")
        time.sleep(interval)
    raise AssertionError(f"condition not reached in {timeout}s")


# ---- runs shared between tests of one pytest session ------------------------------------------
_SHARED: dict[tuple, Path] = {}
_BASE: Path | None = None


def shared_run(nproc: int, overrides: list[str] = ()) -> Path:
    """Run once per session and return its run_dir (read-only for callers: copy to modify).
    Reference runs are keyed by (nproc, overrides), so both test modules reuse them."""
    global _BASE
    key = (nproc, tuple(overrides))
    if key not in _SHARED:
        if _BASE is None:
            import atexit
            import shutil
            import tempfile

            _BASE = Path(tempfile.mkdtemp(prefix="arena-dist-"))
            atexit.register(shutil.rmtree, _BASE, True)
        run_dir = _BASE / f"run{len(_SHARED)}-n{nproc}"
        run(run_dir, nproc, list(overrides))
        _SHARED[key] = run_dir
    return _SHARED[key]


def copy_run(src: Path, dst: Path, *, checkpoints_upto: int | None = None) -> Path:
    """Copy a run directory; with checkpoints_upto, keep only checkpoints at or before that
    step, point `latest` at the newest kept one and cut metrics.jsonl to match."""
    import shutil

    shutil.copytree(src, dst)
    if checkpoints_upto is not None:
        kept = []
        for ckpt in checkpoints(dst):
            if int(ckpt.name.split("-")[1]) > checkpoints_upto:
                shutil.rmtree(ckpt)
            else:
                kept.append(ckpt)
        (dst / "checkpoints" / "latest").write_text(kept[-1].name + "\n")
        lines = [ln for ln in (dst / "metrics.jsonl").read_text().splitlines()
                 if (json.loads(ln).get("step") or 0) <= checkpoints_upto and "loss_step" in json.loads(ln)]
        (dst / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
        for marker in (".done", "result.json"):
            (dst / marker).unlink(missing_ok=True)
    return dst
