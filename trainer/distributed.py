"""Process-group setup from torchrun or Slurm environment variables, and small collectives."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A currently free TCP port on loopback (for tests and benchmarks that spawn ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """One task per GPU under plain `srun python -m launch.train`: map Slurm's variables.

    torchrun (the documented launcher) sets RANK/WORLD_SIZE itself, so this only fills gaps.
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if int(os.environ["SLURM_NTASKS"]) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if "MASTER_ADDR" not in os.environ:
        import subprocess

        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the default process group; a lone process gets a world of one.

    The single-process case still builds a real (gloo/nccl) group so FSDP2, DCP and the
    collectives run the same code at every scale.
    """
    _env_from_slurm()
    store = None
    if "RANK" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    else:
        # A lone process: an in-memory store, so no TCP port is needed (or raced for), and
        # the environment is left alone (a later run in the same process is lone again).
        rank, world_size, local_rank, local_world_size = 0, 1, 0, 1
        store = dist.HashStore()

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but CUDA is not available on this machine")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        kwargs = dict(store=store, rank=rank, world_size=world_size) if store is not None else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if use_cuda else None, **kwargs)
    return DistInfo(rank, local_rank, world_size, local_world_size, dev, backend)


def destroy_distributed(graceful: bool = True) -> None:
    """Tear the process group (and its subgroups) down. ``graceful=False`` after a failure:
    the peers may be anywhere, so no barrier is attempted. The groups are destroyed even when
    the barrier fails (a peer failed and left): its error is raised after that, so that no
    live group is left to interpreter teardown."""
    if not dist.is_initialized():
        return
    try:
        if graceful:
            # Every rank leaves its last collective before any rank tears its group down: a
            # peer still talking to a destroyed gloo group was seen to abort at interpreter exit.
            barrier()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank0_result(fn: Callable[[], T], info: DistInfo | None = None) -> T:
    """``fn()`` computed by rank 0 alone and broadcast to every rank. An exception on rank 0 is
    raised on every rank: a UserError with rank 0's message, marked collective (rank 0 alone
    reports it); anything else as a RuntimeError naming rank 0's error."""
    single = info is None or info.world_size == 1 or not dist.is_initialized()
    if single:
        return fn()
    result, failure = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure = e
    outcome = broadcast_object((result, None) if failure is None else
                               (None, (isinstance(failure, UserError), type(failure), str(failure))))
    if failure is not None:
        if isinstance(failure, UserError):
            failure.collective = True
        raise failure
    if outcome[1] is not None:
        user_error, kind, message = outcome[1]
        if user_error:
            err = kind(message)
            err.collective = True
            raise err
        raise RuntimeError(f"rank 0 failed: {kind.__name__}: {message}")
    return outcome[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few float64 scalars across ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
