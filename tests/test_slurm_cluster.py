"""End-to-end checks against a real (throwaway, local) two-node Slurm cluster.

Covers: multi-node torchrun over srun (c10d rendezvous, gloo), submitit, requeue with
SLURM_RESTART_COUNT, and slurm/train.sh's preemption contract (SIGUSR1 -> checkpoint ->
.preempted -> self-requeue -> resume) with a stand-in for launch.train.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (fixture; tests/ is on sys.path)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = f"{PY} -m torch.distributed.run"


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(mode)
    return path


def _wait_files(pattern_dir: Path, glob: str, n: int, timeout: float, cluster, job_id: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(pattern_dir.glob(glob))
        if len(found) >= n:
            return found
        state = cluster.state(job_id)
        if state not in {"PENDING", "RUNNING", "CONFIGURING"}:
            break
        time.sleep(0.5)
    raise AssertionError(
        f"expected {n} files {glob} in {pattern_dir}, got {sorted(pattern_dir.glob(glob))}; "
        f"job {job_id}: {cluster.job_info(job_id)}"
    )


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def test_cluster_has_two_idle_nodes(slurm_cluster):  # noqa: F811
    out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=True).stdout
    assert sorted(set(out.split("\n")) - {""}) == ["n1 idle", "n2 idle"], out


def test_up_is_idempotent(slurm_cluster):  # noqa: F811
    import subprocess

    up = REPO_ROOT / "slurm" / "local-cluster" / "up.sh"
    proc = subprocess.run([str(up), str(slurm_cluster.state_dir)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "already up" in proc.stdout, proc


def test_torchrun_two_nodes_world_size_4(slurm_cluster, tmp_path):  # noqa: F811
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    _write(
        tmp_path / "allreduce.py",
        """
        import json, os, sys
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "world": world, "sum": t.item(),
                       "node": os.environ.get("SLURM_NODEID"),
                       "local_rank": int(os.environ["LOCAL_RANK"]),
                       "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}, f)
        dist.destroy_process_group()
        """,
    )
    script = _write(
        tmp_path / "job.sh",
        f"""
        #!/bin/bash
        #SBATCH -N2 --ntasks-per-node=1 --cpus-per-task=1
        #SBATCH -o {tmp_path}/job-%j.out
        head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        addr=$(scontrol show node -o "$head" | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')
        srun {TORCHRUN} --nnodes=2 --nproc_per_node=2 --rdzv-backend=c10d \\
          --rdzv-endpoint=$addr:29531 --rdzv-id=$SLURM_JOB_ID {tmp_path}/allreduce.py {out_dir}
        """,
        0o755,
    )
    job = slurm_cluster.sbatch(script, cwd=tmp_path)
    state = slurm_cluster.wait(job, timeout=120)
    log = _read(tmp_path / f"job-{job}.out")
    assert state == "COMPLETED", f"{state}\n{log}\n{slurm_cluster.logs()}"
    results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3], log
    assert {r["world"] for r in results} == {4}
    assert {r["sum"] for r in results} == {6.0}  # 0 + 1 + 2 + 3
    assert {r["node"] for r in results} == {"0", "1"}  # two ranks on each node
    assert {r["run_id"] for r in results} == {job}


def test_submitit_job_returns_42(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    submitit = pytest.importorskip("submitit")
    # submitit shells out to sbatch/squeue/sacct/scancel; the wrappers enter the namespace.
    monkeypatch.setenv("PATH", slurm_cluster.env()["PATH"])
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(timeout_min=5, nodes=1, tasks_per_node=1, cpus_per_task=1)

    def answer():  # nested: pickled by value, the job need not import this test module
        return 42

    job = executor.submit(answer)
    assert job.job_id.isdigit()
    assert job.result() == 42


def test_requeue_increments_restart_count(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    script = _write(
        tmp_path / "requeue.sh",
        f"""
        #!/bin/bash
        #SBATCH --requeue --open-mode=append -o {tmp_path}/requeue-%j.out
        n=${{SLURM_RESTART_COUNT:-0}}
        echo "run $n" >> {out}/runs
        trap 'echo "signal restart=$n" >> {out}/signals; exit 0' TERM USR1
        if [ "$n" = 0 ]; then
          touch {out}/started
          sleep 300 & wait     # `wait` lets the trap run as soon as the signal arrives
        fi
        echo "done $n" >> {out}/runs
        """,
        0o755,
    )
    job = slurm_cluster.sbatch(script, cwd=tmp_path)
    _wait_files(out, "started", 1, 60, slurm_cluster, job)
    slurm_cluster.scontrol("requeue", job)
    state = slurm_cluster.wait(job, timeout=60)  # lifts Slurm's 120 s BeginTime hold
    assert state == "COMPLETED", _read(tmp_path / f"requeue-{job}.out")
    runs = _read(out / "runs").split("\n")
    assert runs[:3] == ["run 0", "run 1", "done 1"], runs
    assert "signal restart=0" in _read(out / "signals")
    assert slurm_cluster.job_info(job)["Restarts"] == "1"


# A stand-in for launch.train that follows train.sh's preemption contract: it loops over
# "steps"; on SIGUSR1 all ranks agree (all_reduce) to stop after the current step, save a
# "checkpoint", rank 0 writes <run_dir>/.preempted, barrier, exit 0. With a checkpoint in
# run_dir it resumes and finishes.
FAKE_TRAIN = """
import json, os, signal, sys, time
import torch, torch.distributed as dist

stop = False
def on_usr1(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGUSR1, on_usr1)

overrides = sys.argv[1:]
run_dir = next(a.split("=", 1)[1] for a in overrides if a.startswith("trainer.run_dir="))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
ckpt = os.path.join(run_dir, "ckpt")
info = {"rank": rank, "world": world, "restart": restart, "overrides": overrides,
        "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "resumed": os.path.isdir(ckpt)}
if os.path.isdir(ckpt):  # resume and finish
    with open(os.path.join(run_dir, f"resumed-rank{rank}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0)
with open(os.path.join(run_dir, f"ready-rank{rank}.json"), "w") as f:
    json.dump(info, f)
for step in range(100000):
    time.sleep(0.2)
    flag = torch.tensor([1.0 if stop else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        break
os.makedirs(ckpt, exist_ok=True)
with open(os.path.join(ckpt, f"rank{rank}"), "w") as f:
    f.write(str(step))
dist.barrier()
if rank == 0:
    open(os.path.join(run_dir, ".preempted"), "w").close()
dist.barrier()
dist.destroy_process_group()
sys.exit(0)
"""


def test_train_sh_preempt_requeue_resume(slurm_cluster, tmp_path):  # noqa: F811
    stub = tmp_path / "stub"
    _write(stub / "launch" / "__init__.py", "")
    _write(stub / "launch" / "train.py", FAKE_TRAIN)
    (tmp_path / "logs").mkdir()
    env = {
        "PYTHONPATH": str(stub),  # the stand-in launch.train shadows the real one
        "GPUS_PER_NODE": "2",
        "TORCHRUN": TORCHRUN,
        "MASTER_PORT": "29541",
    }
    job = slurm_cluster.sbatch(
        REPO_ROOT / "slurm" / "train.sh",
        ["+experiment=tiny", "optim.lr=0.1"],
        env,
        sbatch_args=["-N2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                     "--job-name=t"],
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / f"t-{job}"
    log_path = tmp_path / "logs" / f"t-{job}.out"
    ready = _wait_files(run_dir, "ready-rank*.json", 4, 120, slurm_cluster, job)
    # What Slurm does 300 s before the time limit (--signal=B:USR1@300):
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state = slurm_cluster.wait(job, timeout=120)
    log = _read(log_path)
    assert state == "COMPLETED", f"{state}\n{log}\n{slurm_cluster.logs()}"

    first = [json.loads(p.read_text()) for p in ready]
    assert sorted(r["rank"] for r in first) == [0, 1, 2, 3]
    assert {r["world"] for r in first} == {4}
    assert {r["restart"] for r in first} == {0}
    assert {r["run_id"] for r in first} == {job}
    assert {r["omp"] for r in first} == {"1"}
    assert first[0]["overrides"] == ["+experiment=tiny", "optim.lr=0.1",
                                     f"trainer.run_dir={run_dir}"]
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == [f"rank{i}" for i in range(4)]

    resumed = [json.loads(p.read_text()) for p in sorted(run_dir.glob("resumed-rank*.json"))]
    assert sorted(r["rank"] for r in resumed) == [0, 1, 2, 3], log
    assert {r["restart"] for r in resumed} == {1}  # same job id, same run_dir, next allocation
    assert not (run_dir / ".preempted").exists()  # consumed by the second allocation
    assert "requeueing job" in log and "SIGUSR1" in log, log
    assert slurm_cluster.job_info(job)["Restarts"] == "1"
