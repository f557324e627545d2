"""Count aborts at exit ("terminate called without an active exception", SIGABRT) over many
short jobs. Prints one line per job and a summary; exit status 1 if any job aborted.

Local (default): 2-rank torchrun jobs of the tests' tiny model, 2 steps, a checkpoint at the
end, one preempted job (SIGUSR1) per ten. About 10-15 s per job on 2 cores.

--slurm: the path the abort was seen on. Brings up the local two-node Slurm cluster
(slurm/local-cluster/up.sh, needs root), submits each job with `sbatch -N2 slurm/train.sh`
(world size 4: 2 nodes x 1 torchrun agent x 2 gloo ranks, the tiny model, 4 steps, a
checkpoint at the end); every third job gets `scancel --batch --signal=USR1` once training
runs, so it checkpoints, requeues itself and resumes; with --term every third other job gets
`scancel --batch --signal=TERM` (stop, no requeue: a non-zero exit is expected there). Counts
abort markers in the job's output file (train.sh, srun, both torchrun agents and all ranks) and
the run's logs, SIGABRT exit codes of any allocation's srun, and non-zero exits. The cluster is
always torn down. About 35-40 s per job (a preempted job, with its requeue, about 60 s).

--submitit: the same cluster, each job submitted with `python -m launch.submit` (submitit, 2
nodes x 1 task running a torchrun agent x 2 gloo ranks, the tiny model); all but every fourth
job get `scancel <job> --signal USR2` (what submitit's `job._interrupt(timeout=True)` runs)
after step 1: task 0's TorchrunJob.checkpoint stops the run, submitit requeues, the job resumes
to the end. Counts abort markers in submitit's logs of every task (`<folder>/<job>/*_log.*`,
both allocations) and the run's logs, non-zero exits, and whether the node-1 task / agent saw
the requeue's SIGTERM ("Bypassing signal SIGTERM", torchrun's "death signal").

    .venv/bin/python scripts/count_exit_aborts.py [--jobs 30] [--async-save] [--slurm [--term] | --submitit]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import dist_helpers as h  # noqa: E402

ABORT_MARKERS = ("terminate called", "Aborted", "core dumped", "SIGABRT")
ABORT_CODES = (134, -6)
REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=30)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--slurm", action="store_true", help="submit the jobs to the local two-node Slurm cluster")
    p.add_argument("--submitit", action="store_true",
                   help="submit the jobs with launch.submit to the local two-node Slurm cluster, preempt with USR2")
    p.add_argument("--term", action="store_true", help="(--slurm) also stop every third job with SIGTERM")
    p.add_argument("--keep", action="store_true", help="(--slurm) keep the cluster state and job outputs")
    a = p.parse_args()
    return count_slurm(a) if a.slurm or a.submitit else count_local(a)


def count_local(a) -> int:
    extra = ["trainer.max_steps=2", f"checkpoint.async_save={str(a.async_save).lower()}"]
    aborts = failures = 0
    with tempfile.TemporaryDirectory(prefix="exit-aborts-") as root:
        for i in range(a.jobs):
            run_dir = Path(root) / f"run{i}"
            t0 = time.perf_counter()
            preempt = i % 10 == 9
            proc = h.start(run_dir, 2, [*extra, "trainer.max_steps=6"] if preempt else extra)
            if preempt:  # SIGUSR1 to both ranks once training runs
                h.wait_for(lambda: h.read_metrics(run_dir), proc=proc, timeout=120)
                for pid in h.rank_pids(proc):
                    os.kill(pid, signal.SIGUSR1)
            rc = h.wait(proc, 300)
            text = h.log_text(proc) + "".join(f.read_text(errors="replace")
                                              for f in (run_dir / "logs").glob("*.log"))
            aborted = any(m in text for m in ABORT_MARKERS) or rc in ABORT_CODES
            aborts += aborted
            failures += rc != 0
            print(f"job {i + 1:3d}/{a.jobs}: exit {rc}{' (preempted)' if preempt else ''}"
                  f"{'  ABORT' if aborted else ''}  {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"{aborts} abort(s) and {failures} non-zero exit(s) in {a.jobs} 2-rank jobs")
    return 1 if aborts else 0


# ---- --slurm ----------------------------------------------------------------------------------
# tests/test_slurm_training.py's tiny model at world size 4, cut to a few steps.
SLURM_TINY = ["+experiment=cpu_demo", "model.hidden_size=32", "model.intermediate_size=64", "model.head_dim=16",
              "model.query_pre_attn_scalar=16", "data.max_length=256", "data.max_tokens=1024",
              "data.global_batch_rows=8", "data.limit_train_rows=192", "data.limit_eval_rows=16",
              "trainer.eval_every=null", "trainer.num_threads=1", "logging.progress_bar=false"]
SBATCH_ARGS = ["-N2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
STEPS, PREEMPT_STEPS = 4, 12  # a preempted job runs longer so that the signal lands mid-training
JOB_TIMEOUT = 300


def _cluster_up(state_dir: Path):
    from slurm_cluster import SlurmCluster

    for script, args in (("up.sh", [state_dir]), ("make-wrappers.sh", [state_dir, state_dir / "bin"])):
        proc = subprocess.run([str(LOCAL_CLUSTER / script), *map(str, args)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return SlurmCluster(state_dir, state_dir / "bin")


def _cluster_down(state_dir: Path) -> None:
    if (state_dir / "slurm.conf").exists():
        subprocess.run([str(LOCAL_CLUSTER / "down.sh"), str(state_dir)], capture_output=True, text=True,
                       timeout=180)


def _max_step(run_dir: Path) -> int:
    step = 0
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("kind") == "train" and isinstance(row.get("step"), int):
                step = max(step, row["step"])
    return step


def _signal_after_step_1(cluster, job: str, run_dir: Path, scancel: list[str]) -> bool:
    """Run `scancel` (a signal) once the job has logged step 1; False if it ended before that."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline and cluster.state(job) in {"PENDING", "CONFIGURING", "RUNNING"}:
        if _max_step(run_dir) >= 1:
            return cluster.run(scancel).returncode == 0
        time.sleep(0.2)
    return False


def _wait_job(cluster, job: str) -> str:
    try:
        return cluster.wait(job, timeout=JOB_TIMEOUT)  # lifts the 120 s hold on a requeued job
    except TimeoutError:
        cluster.cancel(job)
        return "TIMEOUT(count_exit_aborts)"


def _run_logs(run_dir: Path) -> str:
    logs = "".join(f.read_text(errors="replace") for f in sorted((run_dir / "logs").glob("*.log")))
    return logs + ((run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").exists() else "")


def _slurm_job(cluster, root: Path, i: int, signal_name: str | None, async_save: bool) -> dict:
    """Submit one train.sh job, send its batch shell ``signal_name`` (USR1: preempt, TERM: stop)
    once training runs, wait for it; what it left behind."""
    name = f"abort{i}"
    run_dir = root / "runs" / name
    steps = PREEMPT_STEPS if signal_name else STEPS
    overrides = [*SLURM_TINY, f"trainer.max_steps={steps}", f"checkpoint.every_steps={steps}",
                 f"checkpoint.async_save={str(async_save).lower()}"]
    env = {"PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "GPUS_PER_NODE": "2",
           "TORCHRUN": f"{sys.executable} -m torch.distributed.run", "RUN_DIR": str(run_dir)}
    job = cluster.sbatch(REPO / "slurm" / "train.sh", overrides, env,
                         sbatch_args=[*SBATCH_ARGS, f"--job-name={name}"], cwd=root)
    out = root / "logs" / f"{name}-{job}.out"
    signalled = bool(signal_name) and _signal_after_step_1(
        cluster, job, run_dir, ["scancel", "--batch", f"--signal={signal_name}", job])
    state = _wait_job(cluster, job)
    info = cluster.job_info(job)
    text = out.read_text(errors="replace") if out.exists() else ""
    logs = _run_logs(run_dir)
    # Every allocation's srun status (a requeued job's first one is hidden behind its exit 0).
    srun_rcs = [int(x) for x in re.findall(r"srun exited with (-?\d+)", text)]
    markers = sorted({m for m in ABORT_MARKERS if m in text or m in logs})
    exit_code = info.get("ExitCode", "?")
    aborted = bool(markers) or any(rc in ABORT_CODES for rc in srun_rcs) or exit_code.endswith(":6")
    bad_exit = state != "COMPLETED" or exit_code != "0:0" or any(rc != 0 for rc in srun_rcs)
    return {"job": job, "state": state, "exit_code": exit_code, "srun_rcs": srun_rcs, "markers": markers,
            "aborted": aborted, "bad_exit": bad_exit, "restarts": info.get("Restarts", "?"), "signalled": signalled,
            "steps": _max_step(run_dir), "out": out}


SUBMIT_ARGS = ["launcher.nodes=2", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2",
               "launcher.cpus_per_task=1", "launcher.timeout_min=30"]


def _submitit_job(cluster, root: Path, i: int, preempt: bool, async_save: bool) -> dict:
    """Submit one job with launch.submit; if `preempt`, USR2 to its steps after step 1 (submitit's
    `job._interrupt(timeout=True)`): checkpoint, submitit requeue, resume. What it left behind."""
    name = f"abort{i}"
    folder, run_dir = root / "submitit" / name, root / "runs" / name
    steps = PREEMPT_STEPS if preempt else STEPS
    cmd = [sys.executable, "-m", "launch.submit", "--no-plan", *SLURM_TINY, *SUBMIT_ARGS,
           f"launcher.folder={folder}", f"launcher.job_name={name}", f"trainer.run_dir={run_dir}",
           f"trainer.max_steps={steps}", f"checkpoint.every_steps={steps}",
           f"checkpoint.async_save={str(async_save).lower()}"]
    env = {"PYTHONPATH": os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x),
           "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env(env), capture_output=True, text=True, timeout=120)
    m = re.search(r"submitted job (\d+) \(slurm\)", proc.stdout)
    if not m:
        raise SystemExit(f"launch.submit failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    job = m.group(1)
    # submitit.SlurmJob._interrupt(timeout=True): USR2 to every process of the job's steps
    signalled = preempt and _signal_after_step_1(cluster, job, run_dir, ["scancel", job, "--signal", "USR2"])
    state = _wait_job(cluster, job)
    info = cluster.job_info(job)
    task_logs = {p.name: p.read_text(errors="replace") for p in sorted((folder / job).glob("*_log.*"))}
    text = "".join(task_logs.values())
    logs = _run_logs(run_dir)
    markers = sorted({m for m in ABORT_MARKERS if m in text or m in logs})
    exit_code = info.get("ExitCode", "?")
    node1 = task_logs.get(f"{job}_1_log.out", "") + task_logs.get(f"{job}_1_log.err", "")
    node1_sigterm = [what for what, needle in (("submitit:SIGTERM", "Bypassing signal SIGTERM"),
                                               ("agent:SIGTERM", "SIGTERM death signal"),
                                               ("torchrun-failed", "torchrun exited with"))
                     if needle in node1]
    aborted = bool(markers) or exit_code.endswith(":6")
    bad_exit = state != "COMPLETED" or exit_code != "0:0"
    return {"job": job, "state": state, "exit_code": exit_code, "markers": markers, "aborted": aborted,
            "bad_exit": bad_exit, "restarts": info.get("Restarts", "?"), "signalled": signalled,
            "steps": _max_step(run_dir), "folder": folder / job, "node1_sigterm": node1_sigterm,
            "node1": ",".join(node1_sigterm) or "clean"}


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(signal.Signals(signum).name)


def count_slurm(a) -> int:
    if os.geteuid() != 0:
        raise SystemExit("--slurm needs root (the local cluster's network namespace, munged, slurmd)")
    root = Path(tempfile.mkdtemp(prefix="exit-aborts-slurm-"))
    # A state dir of its own, as tests/slurm_cluster.py makes it: munged (user munge) must reach its logs.
    state_dir = Path(tempfile.mkdtemp(prefix="slurm-cluster-"))
    (root / "logs").mkdir(parents=True)  # train.sh's --output=logs/%x-%j.out, relative to the submit dir
    aborts = failures = expected = sigterm_seen = 0
    t_all = time.perf_counter()
    # A SIGTERM (e.g. a timeout around this script) tears the cluster down like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        t0 = time.perf_counter()
        cluster = _cluster_up(state_dir)
        print(f"cluster up in {time.perf_counter() - t0:.1f} s ({state_dir})", flush=True)
        for i in range(a.jobs):
            t0 = time.perf_counter()
            if a.submitit:
                r = _submitit_job(cluster, root, i, preempt=i % 4 != 3, async_save=a.async_save)
                aborts += r["aborted"]
                failures += r["bad_exit"]
                print(f"job {i + 1:3d}/{a.jobs}: slurm job {r['job']} {r['state']} exit {r['exit_code']} "
                      f"steps {r['steps']} requeued {r['restarts']}x"
                      f"{' (USR2 sent)' if r['signalled'] else ''} node-1 task {r['node1']}"
                      f"{'  ABORT ' + ','.join(r['markers']) if r['aborted'] else ''}"
                      f"  {time.perf_counter() - t0:.1f} s", flush=True)
                sigterm_seen += bool(r["node1_sigterm"])
                if r["aborted"] or r["bad_exit"]:
                    print(f"    see {r['folder']}", flush=True)
                    a.keep = True
                continue
            sig = "USR1" if i % 3 == 2 else "TERM" if a.term and i % 3 == 1 else None
            r = _slurm_job(cluster, root, i, sig, a.async_save)
            aborts += r["aborted"]
            failures += r["bad_exit"]
            expected += r["bad_exit"] and sig == "TERM" and r["signalled"]
            what = ""
            if sig == "USR1":
                what = f" preempted, requeued {r['restarts']}x" if r["signalled"] else " (USR1 not sent)"
            elif sig == "TERM":
                what = " stopped by SIGTERM" if r["signalled"] else " (TERM not sent)"
            print(f"job {i + 1:3d}/{a.jobs}: slurm job {r['job']} {r['state']} exit {r['exit_code']} srun "
                  f"{','.join(map(str, r['srun_rcs'])) or '?'} steps {r['steps']}{what}"
                  f"{'  ABORT ' + ','.join(r['markers']) if r['aborted'] else ''}"
                  f"  {time.perf_counter() - t0:.1f} s", flush=True)
            if r["aborted"] or (r["bad_exit"] and sig != "TERM"):
                print(f"    see {r['out']}", flush=True)
                a.keep = True
    finally:
        _cluster_down(state_dir)
        if a.keep:
            print(f"job outputs kept in {root}, cluster state and daemon logs in {state_dir}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(state_dir, ignore_errors=True)
    if a.submitit:
        print(f"node-1 task saw the requeue's SIGTERM in {sigterm_seen} job(s)")
    print(f"{aborts} abort(s) and {failures} non-zero exit(s) in {a.jobs} {'submitit' if a.submitit else 'Slurm'} jobs "
          f"{f'({expected} of them stopped by SIGTERM) ' if a.term else ''}"
          f"({(time.perf_counter() - t_all) / max(a.jobs, 1):.1f} s per job, cluster start included)")
    return 1 if aborts else 0


if __name__ == "__main__":
    sys.exit(main())
