"""Submit a training job to Slurm with submitit (or run it locally for debugging).

    python -m launch.submit +experiment=gemma2_9b launcher.nodes=4 [hydra overrides]
    python -m launch.submit +experiment=gemma2_9b --dry-run     # print config + Slurm parameters
    python -m launch.submit +experiment=cpu_demo --local launcher.nproc_per_node=2

Before submitting it prints the planner's one-line verdict (trainer/planner.py: will it fit,
step time, budget fill; `python -m launch.plan` gives the whole plan); --no-plan skips it.

One Slurm task per node runs a torchrun agent that starts the node's ranks (the same shape as
slurm/train.sh). Why one task per node rather than one per GPU: torchrun gives every rank
LOCAL_RANK/LOCAL_WORLD_SIZE and a c10d rendezvous without Slurm-specific code in the trainer,
watches its ranks and tears the node down together when one fails, and the trainer sees the
same environment under sbatch, submitit and a workstation.

Preemption: submitit asks Slurm for SIGUSR2 ahead of the time limit (launcher.signal_delay_s).
The torchrun agents ignore it (SIG_IGN is inherited through exec), the training ranks treat it
as a stop request; on task 0 submitit calls `TorchrunJob.checkpoint`, which also drops a STOP
file in the run directory, waits for the ranks to checkpoint and exit, and hands submitit the
same job to requeue. It hands it back only once every node's torchrun agent has exited: the
requeue makes Slurm SIGTERM what is left of the job, and an agent still in its exit barrier or
rendezvous shutdown (the other nodes' tasks get no checkpoint call) would take torch's SIGTERM
path, which skips the rendezvous cleanup. Each node's task writes
<run_dir>/.agents/<SLURM_NODEID>.exited when its torchrun exits; task 0 waits for all of them
(bounded by stop_timeout_s, a WARNING if one is missing). The requeued job resumes from that
checkpoint, in the same run directory (fixed at submission) and the same wandb run (its id is
in the checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from launch.cli import entry_point, split_options
from trainer.config import PROJECT_ROOT, compose, to_container
from trainer.runtime import PREEMPTED_MARKER, STOP_FILE

log = logging.getLogger(__name__)
AGENTS_DIR = ".agents"  # <run_dir>/.agents/<SLURM_NODEID>.exited: that node's torchrun has exited


def _ignore_user_signals() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _head_address() -> str:
    """First node of the allocation, by its NodeAddr (node names need not resolve)."""
    nodelist = os.environ["SLURM_JOB_NODELIST"]
    head = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    info = subprocess.run(["scontrol", "show", "node", "-o", head], capture_output=True, text=True).stdout
    for field in info.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return head


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for child `pid` to exit, without reaping it.

    Not Popen.wait(timeout): this runs in submitit's signal handler, which interrupts the
    Popen.wait() in TorchrunJob.__call__ while that holds the Popen's waitpid lock, so a
    nested wait could never take the lock and would always sleep out the full timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:  # already reaped
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _exited_marker(run_dir: str | Path, node: int | str | None = None) -> Path:
    """Node `node`'s marker; this node's (SLURM_NODEID) by default."""
    node = os.environ.get("SLURM_NODEID", "0") if node is None else node
    return Path(run_dir) / AGENTS_DIR / f"{node}.exited"


def wait_for_agents(run_dir: str | Path, deadline: float) -> list[int]:
    """Wait until every node's (SLURM_NNODES) `.exited` marker exists or time.monotonic() passes
    `deadline`; the nodes still missing (empty: all exited). Logs a WARNING when it gives up."""
    nnodes = int(os.environ.get("SLURM_NNODES", "1"))
    while True:
        missing = [n for n in range(nnodes) if not _exited_marker(run_dir, n).exists()]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if missing:
        log.warning("torchrun agent(s) of node(s) %s had not exited when the stop timeout ran out; "
                    "requeueing anyway (Slurm will SIGTERM them)", ",".join(map(str, missing)))
    return missing


class TorchrunJob:
    """The submitted callable: one per node, runs torchrun -m launch.train and waits."""

    def __init__(self, overrides: list[str], run_dir: str, nproc_per_node: int, rdzv_port: int | None,
                 stop_timeout_s: float = 600.0):
        self.overrides = list(overrides)
        self.run_dir = run_dir
        self.nproc_per_node = nproc_per_node
        self.rdzv_port = rdzv_port
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={self.nproc_per_node}"]
        if "SLURM_JOB_ID" in os.environ:
            job_id = os.environ["SLURM_JOB_ID"]
            port = self.rdzv_port or 20000 + int(job_id) % 20000
            torchrun += [f"--nnodes={os.environ.get('SLURM_NNODES', '1')}", "--rdzv-backend=c10d",
                         f"--rdzv-endpoint={_head_address()}:{port}", f"--rdzv-id={job_id}", "--max-restarts=0"]
        else:
            torchrun += ["--standalone"]
        return torchrun + ["-m", "launch.train", *self.overrides, f"trainer.run_dir={self.run_dir}"]

    def __call__(self) -> dict[str, Any]:
        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("SLURM_PROCID", "0") == "0":
            (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        marker = _exited_marker(run_dir)
        marker.parent.mkdir(exist_ok=True)
        marker.unlink(missing_ok=True)  # a previous allocation's
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("RANK", None)  # torchrun sets the ranks' variables itself
        self._proc = subprocess.Popen(self.command(), cwd=str(PROJECT_ROOT), env=env,
                                      preexec_fn=_ignore_user_signals)
        try:
            rc = self._proc.wait()
        finally:
            if self._proc.poll() is not None:  # not when interrupted (task 0's checkpoint writes it then)
                marker.touch()
        if rc != 0:
            raise RuntimeError(f"torchrun exited with {rc}; see the job log and {run_dir}/logs/")
        result_file = run_dir / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if (run_dir / PREEMPTED_MARKER).exists() and os.environ.get("SLURM_PROCID", "0") == "0" \
                and "SLURM_JOB_ID" in os.environ:
            # Stopped by a SIGTERM preemption (submitit does not requeue on TERM): requeue ourselves,
            # once the other nodes' agents are out (the requeue SIGTERMs what is left).
            wait_for_agents(run_dir, time.monotonic() + self.stop_timeout_s)
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's hook on the pre-timeout/preemption signal (task 0 only)."""
        import submitit

        deadline = time.monotonic() + self.stop_timeout_s
        (Path(self.run_dir) / STOP_FILE).touch()
        if self._proc is not None and _wait_exited(self._proc.pid, self.stop_timeout_s):
            marker = _exited_marker(self.run_dir)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            # submitit requeues when this returns, and Slurm then SIGTERMs the job's remaining
            # processes: let the other nodes' agents finish their shutdown first.
            wait_for_agents(self.run_dir, deadline)
        fresh = TorchrunJob(self.overrides, self.run_dir, self.nproc_per_node, self.rdzv_port, self.stop_timeout_s)
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:  # the Popen handle does not travel
        state = dict(self.__dict__)
        state["_proc"] = None
        return state


def slurm_parameters(lc) -> dict[str, Any]:
    """executor.update_parameters(...) for Slurm. (launcher.max_requeues is not one of them: it
    is submitit's slurm_max_num_timeout, an AutoExecutor constructor argument.)"""
    params: dict[str, Any] = {
        "nodes": lc.nodes, "tasks_per_node": 1, "cpus_per_task": lc.cpus_per_task, "timeout_min": lc.timeout_min,
        "name": lc.job_name, "slurm_signal_delay_s": lc.signal_delay_s,
        # As in slurm/train.sh: when one node's torchrun fails, end the step instead of leaving
        # the other nodes' agents waiting (in a collective, or torchrun's 300 s exit barrier).
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    if lc.gpus_per_node:
        params["gpus_per_node"] = lc.gpus_per_node
    if lc.mem_gb:
        params["mem_gb"] = lc.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if lc[key]:
            params[f"slurm_{key}"] = lc[key]
    if lc.setup:
        params["slurm_setup"] = list(lc.setup)
    return params


def build_executor(lc, executor_kind: str):
    """A submitit executor writing its files under <launcher.folder>/<job id>/."""
    import submitit

    folder = Path(lc.folder)
    if not folder.is_absolute():
        folder = PROJECT_ROOT / folder
    if executor_kind == "local":
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="local")
        executor.update_parameters(timeout_min=lc.timeout_min, name=lc.job_name)
    else:
        # slurm_max_num_timeout: how often a timed-out job is requeued (preemptions: always).
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm",
                                         slurm_max_num_timeout=lc.max_requeues)
        executor.update_parameters(**slurm_parameters(lc))
    return executor


def _main(args: list[str]) -> dict[str, Any]:
    options, overrides = split_options(args, {"--dry-run": 0, "--local": 0, "--wait": 0, "--no-plan": 0})
    dry_run, local, wait = "--dry-run" in options, "--local" in options, "--wait" in options
    cfg = compose(overrides)  # validates: a typo fails here, before anything is submitted
    verdict = None if "--no-plan" in options else _plan_verdict(cfg)
    lc = cfg.launcher
    executor_kind = "local" if local else lc.executor
    if executor_kind == "auto":
        executor_kind = "slurm" if shutil.which("sbatch") else "local"
    nproc = lc.nproc_per_node or lc.gpus_per_node or 1
    run_dir = cfg.trainer.run_dir or str(PROJECT_ROOT / "runs" / f"{cfg.experiment}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = str(Path(run_dir).expanduser().resolve())
    train_overrides = [o for o in overrides if not o.lstrip("+").startswith(("launcher.", "trainer.run_dir="))]
    params = slurm_parameters(lc)

    if dry_run:
        print("# resolved training config")
        print(OmegaConf.to_yaml(to_container(cfg)))
        print("# submission")
        print(json.dumps({"executor": executor_kind, "run_dir": run_dir, "nproc_per_node": nproc,
                          "slurm": params, "max_requeues": lc.max_requeues, "overrides": train_overrides}, indent=1))
        return {"dry_run": True, "slurm": params, "run_dir": run_dir, "executor": executor_kind, "plan": verdict}

    executor = build_executor(lc, executor_kind)
    job = executor.submit(TorchrunJob(train_overrides, run_dir, nproc, lc.rdzv_port))
    print(f"submitted job {job.job_id} ({executor_kind})")
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")
    print(f"  run directory: {run_dir}")
    out: dict[str, Any] = {"job_id": job.job_id, "run_dir": run_dir, "executor": executor_kind,
                           "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr), "plan": verdict}
    if wait:
        # One task per node; each returns result.json of the shared run dir: take task 0's.
        out["result"] = job.results()[0]
        print(f"job {job.job_id} finished: {out['result']}")
    return out


def _plan_verdict(cfg) -> str | None:
    """The planner's one line, printed before submitting; a planner failure never blocks a job."""
    from trainer.planner import plan, verdict

    try:
        line = verdict(plan(cfg))
    except Exception as e:  # noqa: BLE001 - advice, not a gate
        line = f"plan: not available ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    print(line, flush=True)
    return line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
