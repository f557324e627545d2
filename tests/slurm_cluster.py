"""A throwaway two-node Slurm cluster for tests (pytest fixture ``slurm_cluster``).

The cluster is the one from ``slurm/local-cluster/`` (``up.sh`` / ``down.sh``): munged,
slurmctld and two slurmd (nodes ``n1``, ``n2``, both at 127.0.0.1) inside a private
network namespace, state and logs in a pytest tmp dir. It is started once per session
and always torn down (pid files only) at the end.

Use it from a test module::

    from slurm_cluster import slurm_cluster  # noqa: F401  (tests/ is on sys.path)

or make it global in ``tests/conftest.py`` with ``pytest_plugins = ["slurm_cluster"]``.

Skips (with the reason) when the machine cannot run it: not Linux, not root, Slurm not
installed and apt-get unavailable. Set KEEP_SLURM_STATE=1 to keep the state dir (daemon
logs) after the session. When the environment variable ``CI`` is ``true`` (or
``1``), any failure to bring the cluster up FAILS the tests instead of skipping them.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO_ROOT / "slurm" / "local-cluster"

#: Job states after which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
    }
)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


class SlurmCluster:
    """Handle on a running local cluster. All Slurm commands run inside its namespace."""

    def __init__(self, state_dir: Path, bin_dir: Path):
        self.state_dir = Path(state_dir)
        self.conf = self.state_dir / "slurm.conf"
        #: Directory of sbatch/squeue/scontrol/scancel/srun/sacct/sinfo wrappers that enter
        #: the namespace: put it first on PATH for code that shells out (e.g. submitit).
        self.bin_dir = Path(bin_dir)
        self.nodes = ("n1", "n2")
        #: Address of every node (all simulated nodes share the loopback address).
        self.node_addr = "127.0.0.1"

    # -- running commands ----------------------------------------------------------------
    def run(self, cmd: list[str], *, check: bool = False, timeout: float | None = 60, **kw):
        """Run ``cmd`` inside the cluster's namespace with SLURM_CONF set.

        Returns the ``subprocess.CompletedProcess`` (text mode, output captured unless
        ``stdout``/``stderr``/``capture_output`` are given in ``kw``).
        """
        kw.setdefault("text", True)
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        argv = [str(LOCAL_CLUSTER / "run-in.sh"), str(self.state_dir), *map(str, cmd)]
        proc = subprocess.run(argv, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(map(str, cmd))} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self.run(["scontrol", *args], check=check).stdout

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """os.environ plus SLURM_CONF and the wrapper dir first on PATH (plus ``extra``)."""
        env = dict(os.environ)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    # -- jobs ------------------------------------------------------------------------------
    def sbatch(
        self,
        script: str | os.PathLike,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        *,
        sbatch_args: list[str] | tuple[str, ...] = (),
        cwd: str | os.PathLike | None = None,
    ) -> str:
        """Submit ``script`` (a path) with script ``args``; returns the job id.

        ``env`` entries are added to the submitting environment, which sbatch exports to
        the job (``--export=ALL``). ``sbatch_args`` go before the script (e.g. ``-N2``).
        ``cwd`` is the submit directory (the job's working directory).
        """
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *map(str, args)]
        proc = self.run(cmd, env=self.env(env), cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (empty once the job has been purged)."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        info: dict[str, str] = {}
        for tok in shlex.split(proc.stdout.strip().splitlines()[0]):
            key, sep, val = tok.partition("=")
            if sep and key not in info:
                info[key] = val
        return info

    def state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait(
        self,
        job_id: str,
        timeout: float = 120,
        *,
        states: frozenset[str] | set[str] = TERMINAL_STATES,
        fast_requeue: bool = True,
        poll: float = 0.5,
    ) -> str:
        """Poll until the job reaches one of ``states``; returns that state.

        Accounting is off, so this polls ``scontrol show job`` (jobs stay visible for
        MinJobAge=120 s after they end). Slurm holds a requeued job for 120 s (reason
        BeginTime); with ``fast_requeue`` the hold is lifted after 3 s (StartTime=now).
        Raises TimeoutError with the job's last record on timeout.
        """
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        held_since: float | None = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            st = info.get("JobState", "UNKNOWN")
            if st in states:
                return st
            held = (
                fast_requeue
                and st == "PENDING"
                and info.get("Reason") == "BeginTime"
                and info.get("Restarts", "0") != "0"
            )
            if not held:
                held_since = None
            elif held_since is None:
                held_since = time.monotonic()
            elif time.monotonic() - held_since >= 3:
                # Not at once: slurmd refuses a relaunch whose credential is from the same
                # second as the requeue ("Job credential revoked"), the reason for the hold.
                self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
                held_since = None
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}")

    def cancel(self, job_id: str) -> None:
        self.run(["scancel", str(job_id)])

    def logs(self, lines: int = 30) -> str:
        """Tail of every daemon log (for assertion messages)."""
        out = []
        for f in sorted((self.state_dir / "log").glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"---- {f.name}\n" + "\n".join(text))
        return "\n".join(out)


# -- bring-up / teardown ----------------------------------------------------------------------


def _unavailable(reason: str):
    if _ci():
        pytest.fail(f"Slurm test cluster unavailable under CI=true: {reason}", pytrace=False)
    pytest.skip(f"Slurm test cluster unavailable: {reason}")


def _ensure_installed() -> None:
    need = [b for b in ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter", "unshare")
            if shutil.which(b, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            is None]
    if not need:
        return
    if shutil.which("apt-get") is None:
        _unavailable(f"missing {need} and apt-get is not available to install them")
    proc = subprocess.run(
        [str(LOCAL_CLUSTER / "install.sh")], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        _unavailable(f"install.sh failed: {proc.stderr.strip()[-2000:]}")


_SINGLETON: dict = {"cluster": None, "users": 0}


def _down(state_dir: Path) -> None:
    if not (state_dir / "slurm.conf").exists():
        return  # never started, or already torn down and removed
    subprocess.run(
        [str(LOCAL_CLUSTER / "down.sh"), str(state_dir)],
        capture_output=True, text=True, timeout=120,
    )


def _start_cluster() -> SlurmCluster:
    if not sys.platform.startswith("linux"):
        _unavailable("needs Linux (network namespaces)")
    if os.geteuid() != 0:
        _unavailable("needs root (network namespace, munged as user munge, slurmd)")
    _ensure_installed()
    # A short path of our own (mkdtemp, 0700) keeps Slurm's paths short and readable.
    state_dir = Path(tempfile.mkdtemp(prefix="slurm-cluster-"))
    bin_dir = state_dir / "bin"
    atexit.register(_down, state_dir)  # belt and braces if the session dies early
    proc = subprocess.run(
        [str(LOCAL_CLUSTER / "up.sh"), str(state_dir)],
        capture_output=True, text=True, timeout=180,
    )
    if proc.returncode != 0:
        _unavailable(f"up.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    subprocess.run(
        [str(LOCAL_CLUSTER / "make-wrappers.sh"), str(state_dir), str(bin_dir)], check=True
    )
    return SlurmCluster(state_dir, bin_dir)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node local Slurm cluster (see module docstring); torn down at exit."""
    # Shared across every place the fixture is registered (conftest + test module imports),
    # so a session never runs two clusters.
    if _SINGLETON["cluster"] is None:
        _SINGLETON["cluster"] = _start_cluster()
    _SINGLETON["users"] += 1
    cluster = _SINGLETON["cluster"]
    try:
        yield cluster
    finally:
        _SINGLETON["users"] -= 1
        if _SINGLETON["users"] == 0:
            _SINGLETON["cluster"] = None
            _down(cluster.state_dir)
            if os.environ.get("KEEP_SLURM_STATE", "") in {"", "0"}:
                shutil.rmtree(cluster.state_dir, ignore_errors=True)
            else:
                print(f"slurm_cluster: state and logs kept in {cluster.state_dir}")
