"""The real trainer on a real (throwaway, local) two-node Slurm cluster (issue 7).

Every job trains the same tiny Gemma 2 classifier (real tokenizer, 256k vocabulary) with
world size 4 (2 nodes x 2 ranks, gloo on CPU):

1. `sbatch -N2 slurm/train.sh ...` runs to the end in the job-id keyed run directory
   (4 DCP shards, complete metrics, result.json). It is the *reference* for the others.
2. `python -m launch.submit ... launcher.nodes=2 ...` (submitit) submits the same training
   to the same cluster; its final weights equal the reference's bitwise.
3. train.sh's pre-timeout path: `scancel --batch --signal=USR1` (what `--signal=B:USR1@300`
   delivers) mid-training -> checkpoint -> self-requeue (SLURM_RESTART_COUNT=1) -> resume
   in the given RUN_DIR -> final weights and every step's loss equal the reference's.
4. submitit's path: SIGUSR2 to the job's steps (what submitit's `--signal=USR2@delay` and
   `job._interrupt(timeout=True)` deliver) -> TorchrunJob.checkpoint -> submitit requeues
   -> resume -> bitwise the same result.

Dropout is on (cpu_demo's head_dropout 0.1), so bitwise equality after a resume also
checks that every rank's RNG stream is restored.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import scratch
from slurm_cluster import slurm_cluster  # noqa: F401  (fixture; tests/ is on sys.path)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SH = REPO_ROOT / "slurm" / "train.sh"
PY = sys.executable
TORCHRUN = f"{PY} -m torch.distributed.run"

ROWS, ROWS_PER_STEP = 192, 8
STEPS = ROWS // ROWS_PER_STEP  # 24 optimizer steps, about 0.5 s each at world size 4
TINY = [
    "+experiment=cpu_demo",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.head_dim=16",
    "model.query_pre_attn_scalar=16",
    "data.max_length=256",
    "data.max_tokens=1024",
    f"data.global_batch_rows={ROWS_PER_STEP}",
    f"data.limit_train_rows={ROWS}",
    "data.limit_eval_rows=16",
    "trainer.eval_every=null",
    "trainer.num_threads=1",
    "checkpoint.every_steps=4",
    "logging.progress_bar=false",
]
# 2 nodes x 1 torchrun agent, 2 gloo ranks each; the test cluster's nodes have 2 CPUs.
SBATCH_ARGS = ["-N2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
SUBMIT_ARGS = ["launcher.nodes=2", "launcher.gpus_per_node=0", "launcher.nproc_per_node=2",
               "launcher.cpus_per_task=1", "launcher.timeout_min=30"]
SHARDS = [f"__{r}_0.distcp" for r in range(4)]
JOB_TIMEOUT = 180


# ---- helpers ------------------------------------------------------------------------------
def _job_env(**extra: str) -> dict[str, str]:
    """Environment added at submission (sbatch exports it to the job)."""
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": pythonpath, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **extra}


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


def _tail(path: Path, n: int = 60) -> str:
    return f"---- {path}\n" + "\n".join(_read(path).splitlines()[-n:])


def _train_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl training rows in file order (a resumed run appends)."""
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if row.get("kind") == "train" and row.get("step") is not None:
                rows.append(row)
    return rows


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss of every step; for a step trained twice the last row (the run that went on) wins."""
    return {r["step"]: r["loss_step"] for r in _train_rows(run_dir)}


def _wait_step(cluster, job_id: str, run_dir: Path, step: int, diag, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(_losses(run_dir), default=0) >= step:
            return
        state = cluster.state(job_id)
        if state not in {"PENDING", "RUNNING", "CONFIGURING"}:
            break
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached step {step} ({cluster.job_info(job_id)})\n{diag()}")


def _sbatch_train(cluster, submit_dir: Path, name: str, env: dict[str, str] | None = None) -> str:
    (submit_dir / "logs").mkdir(parents=True, exist_ok=True)  # train.sh's --output=logs/%x-%j.out
    return cluster.sbatch(TRAIN_SH, TINY, _job_env(GPUS_PER_NODE="2", TORCHRUN=TORCHRUN, **(env or {})),
                          sbatch_args=[*SBATCH_ARGS, f"--job-name={name}"], cwd=submit_dir)


def _submit(cluster, folder: Path, run_dir: Path, name: str, *extra: str, timeout: float = 60):
    """`python -m launch.submit` from the repo root, Slurm commands through the wrappers."""
    cmd = [PY, "-m", "launch.submit", *TINY, *SUBMIT_ARGS, f"launcher.folder={folder}",
           f"launcher.job_name={name}", f"trainer.run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=cluster.env(_job_env()), capture_output=True, text=True,
                          timeout=timeout)
    m = re.search(r"submitted job (\d+) \(slurm\)", proc.stdout)
    return proc, (m.group(1) if m else None)


def _final_checkpoint(run_dir: Path) -> Path:
    result = json.loads((run_dir / "result.json").read_text())
    return Path(result["checkpoint"])


def _model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The consolidated model of a sharded checkpoint, loaded with DCP on this one process."""
    import warnings

    from trainer.consolidate import checkpoint_config, load_model_from_checkpoint

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        return load_model_from_checkpoint(ckpt, checkpoint_config(ckpt)).state_dict()


def _assert_same_weights(ckpt: Path, ref_ckpt: Path) -> None:
    got, ref = _model_tensors(ckpt), _model_tensors(ref_ckpt)
    assert got.keys() == ref.keys()
    differ = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not differ, f"{len(differ)}/{len(ref)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"


def _assert_finished(run_dir: Path, diag) -> Path:
    """Trained to the end with world size 4: result.json, metrics, 4-shard final checkpoint."""
    assert (run_dir / "result.json").is_file(), diag()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == STEPS and result["preempted"] is False, result
    assert sorted(_losses(run_dir)) == list(range(1, STEPS + 1)), diag()
    ckpt = Path(result["checkpoint"])
    assert ckpt.parent == run_dir / "checkpoints" and ckpt.name == f"step-{STEPS:08d}", result
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == SHARDS
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 4 and state["step"] == STEPS
    assert (run_dir / ".done").is_file() and not (run_dir / ".preempted").exists()
    assert sorted(p.name for p in (run_dir / "logs").glob("rank-*.log")) == [f"rank-{r}.log" for r in range(4)]
    assert "(world size 4," in _read(run_dir / "train.log")
    return ckpt


def _resumed_at(run_dir: Path) -> int:
    m = re.findall(r"resumed from \S+ at step (\d+) \(saved with world size 4, now 4\)", _read(run_dir / "train.log"))
    assert len(m) == 1, _tail(run_dir / "train.log")
    return int(m[0])


def _assert_exact_resume(run_dir: Path, reference_run_dir: Path, signals: set[str], diag) -> None:
    """One stop (by one of `signals`) mid-run, one resume at that step, and every step's loss and
    the final weights bitwise equal to the uninterrupted reference run."""
    stopped = re.findall(r"stop requested \((\w+)\): checkpointed at step (\d+)", _read(run_dir / "train.log"))
    assert len(stopped) == 1 and stopped[0][0] in signals, diag()
    stop_step = int(stopped[0][1])
    assert 3 <= stop_step < STEPS, stopped
    assert _resumed_at(run_dir) == stop_step
    ckpt = _assert_finished(run_dir, diag)
    assert _losses(run_dir) == _losses(reference_run_dir)
    _assert_same_weights(ckpt, _final_checkpoint(reference_run_dir))


# ---- 1. sbatch slurm/train.sh: the uninterrupted reference --------------------------------------
@pytest.fixture(scope="module")
def reference(request, slurm_cluster, tmp_path_factory):  # noqa: F811
    submit_dir = scratch.module_dir(request, tmp_path_factory, "train-sh")
    name = "arena-ref"
    job = _sbatch_train(slurm_cluster, submit_dir, name)
    run_dir = submit_dir / "runs" / f"{name}-{job}"  # train.sh's default: job-id keyed, under the submit dir
    log = submit_dir / "logs" / f"{name}-{job}.out"
    state = slurm_cluster.wait(job, timeout=JOB_TIMEOUT)
    return {"job": job, "state": state, "run_dir": run_dir, "log": log, "submit_dir": submit_dir,
            "diag": lambda: f"{_tail(log)}\n{_tail(run_dir / 'train.log')}\n{slurm_cluster.logs()}"}


def test_train_sh_two_nodes_world_size_4(reference, slurm_cluster):  # noqa: F811
    diag = reference["diag"]
    assert reference["state"] == "COMPLETED", diag()
    run_dir = reference["run_dir"]
    _assert_finished(run_dir, diag)
    assert sorted((reference["submit_dir"] / "runs").iterdir()) == [run_dir]
    log = _read(reference["log"])
    assert "nodes=2 ranks/node=2" in log and f"run_dir={run_dir}" in log, diag()
    assert "restart=0]" in log and "requeueing job" not in log, diag()
    assert slurm_cluster.job_info(reference["job"]).get("Restarts") == "0"


# ---- 2. python -m launch.submit (submitit) --------------------------------------------------------
def test_launch_submit_two_nodes_matches_train_sh(reference, slurm_cluster, tmp_path):  # noqa: F811
    folder, run_dir = tmp_path / "submitit", tmp_path / "run"
    proc, job = _submit(slurm_cluster, folder, run_dir, "arena-submitit", "--wait", timeout=JOB_TIMEOUT)
    logs = "\n".join(_tail(p) for p in sorted(folder.glob("*/*.out")) + sorted(folder.glob("*/*.err")))

    def diag():
        return f"{proc.stdout}\n{proc.stderr}\n{logs}\n{_tail(run_dir / 'train.log')}\n{slurm_cluster.logs()}"

    assert proc.returncode == 0 and job is not None, diag()
    assert f"job {job} finished: " in proc.stdout, diag()  # --wait: job.result() returned
    assert slurm_cluster.state(job) == "COMPLETED", diag()
    ckpt = _assert_finished(run_dir, diag)
    # One job, two nodes, one torchrun per node: the task logs of both nodes exist.
    assert sorted(p.name for p in (folder / job).glob("*.out")) == [f"{job}_0_log.out", f"{job}_1_log.out"], diag()
    # Same training as train.sh's: same final weights, bit for bit.
    assert _losses(run_dir) == _losses(reference["run_dir"])
    _assert_same_weights(ckpt, _final_checkpoint(reference["run_dir"]))


# ---- 3. train.sh preemption: pre-timeout SIGUSR1 -> checkpoint -> requeue -> resume ------------------
def test_train_sh_preempt_requeue_resume_is_exact(reference, slurm_cluster, tmp_path):  # noqa: F811
    assert reference["state"] == "COMPLETED", reference["diag"]()
    run_dir = tmp_path / "given-run-dir"  # RUN_DIR wins over the job-id keyed default
    name = "arena-preempt"
    job = _sbatch_train(slurm_cluster, tmp_path, name, {"RUN_DIR": str(run_dir)})
    log = tmp_path / "logs" / f"{name}-{job}.out"

    def diag():
        return f"{_tail(log)}\n{_tail(run_dir / 'train.log')}\n{slurm_cluster.logs()}"

    _wait_step(slurm_cluster, job, run_dir, 3, diag)
    # What Slurm sends 300 s before the time limit (#SBATCH --signal=B:USR1@300):
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state = slurm_cluster.wait(job, timeout=JOB_TIMEOUT)  # lifts the 120 s hold on the requeued job
    assert state == "COMPLETED", diag()

    text = _read(log)
    assert "SIGUSR1: asking the ranks to checkpoint and stop" in text, diag()
    assert "requeueing job" in text and "restart=1]" in text, diag()  # SLURM_RESTART_COUNT=1
    assert slurm_cluster.job_info(job).get("Restarts") == "1"
    assert not (tmp_path / "runs").exists()  # RUN_DIR was used, not runs/<name>-<id>
    _assert_exact_resume(run_dir, reference["run_dir"], {"SIGUSR1"}, diag)


# ---- 4. submitit preemption: SIGUSR2 -> TorchrunJob.checkpoint -> submitit requeue -> resume ------------
def test_launch_submit_preempt_requeue_resume_is_exact(reference, slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    submitit = pytest.importorskip("submitit")
    assert reference["state"] == "COMPLETED", reference["diag"]()
    folder, run_dir = tmp_path / "submitit", tmp_path / "run"
    proc, job_id = _submit(slurm_cluster, folder, run_dir, "arena-submitit-preempt")
    assert proc.returncode == 0 and job_id, f"{proc.stdout}\n{proc.stderr}"
    # submitit's own client calls (scancel, squeue, sacct) go through the wrappers.
    monkeypatch.setenv("PATH", slurm_cluster.env()["PATH"])
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    job = submitit.SlurmJob(folder=folder / "%j", job_id=job_id)

    def diag():
        logs = "\n".join(_tail(p) for p in sorted(folder.glob("*/*.out")) + sorted(folder.glob("*/*.err")))
        return f"{logs}\n{_tail(run_dir / 'train.log')}\n{slurm_cluster.logs()}"

    _wait_step(slurm_cluster, job_id, run_dir, 3, diag)
    # What Slurm sends submitit jobs ahead of the time limit (--signal=USR2@delay): USR2 to
    # every process of the job's steps. `timeout=True`: no SIGTERM first (that is the
    # preemption variant, which Slurm follows with a kill).
    job._interrupt(timeout=True)
    state = slurm_cluster.wait(job_id, timeout=JOB_TIMEOUT)
    assert state == "COMPLETED", diag()
    result = job.result()
    assert result["steps"] == STEPS and result["preempted"] is False, result
    assert slurm_cluster.job_info(job_id).get("Restarts") == "1"
    task0 = _read(folder / job_id / f"{job_id}_0_log.out")  # submitit's log, both allocations
    assert "Caught signal SIGUSR2" in task0 and "Calling checkpoint method" in task0, diag()
    assert f"Requeued job {job_id}" in task0, diag()

    _assert_exact_resume(run_dir, reference["run_dir"], {"SIGUSR2", "STOP"}, diag)
