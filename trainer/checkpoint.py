"""Sharded checkpoints with torch.distributed.checkpoint (DCP) and atomic commits.

Layout of ``<run_dir>/checkpoints``::

    step-00000010/          a committed checkpoint
        .metadata           DCP metadata (written last by DCP's coordinator)
        __0_0.distcp ...    one file per rank: its shards of the trainable model tensors
                            (all of them, or an adapter run's adapters + head) + optimizer + RNG
        trainer_state.json  step and the caller's metadata (config, architecture, task), the
                            ``state_dict()`` of every non-tensor Stateful handed to save()
                            under "state" (sampler, loss buffer, scheduler, counters, logger),
                            the byte size and SHA-256 of every file above, and a SHA-256 of
                            its own contents ("seal")
    step-00000020.tmp/      being written, or left behind by a crash: never loaded
    latest                  text file naming the last committed checkpoint

A checkpoint is written under ``.tmp`` and renamed by rank 0 only once every rank's shards
and DCP's metadata are on disk, so a directory without ``.tmp`` is complete by construction.
No rank gathers the full model. Nothing is ever unpickled on load: tensors come from DCP,
DCP's rare non-tensor leaves go through a weights-only unpickler, the rest is JSON.

Checksums: each rank hashes the shard files it wrote (in parallel; for an async save in DCP's
background thread, as soon as its write is done), rank 0 records them with the sizes. Resume
verifies every file before loading, the ranks sharing the files, and falls back to the newest
checkpoint that verifies, saying which file failed; export and predict verify too. A cheap
structural check (files present, sizes, DCP metadata, the seal) runs wherever a checkpoint is
only listed.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from .distributed import all_gather_objects, barrier, broadcast_object
from .errors import CheckpointError
from .runtime import pause_point

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Only what trains is saved: an adapter run's frozen base is re-read from its source (and its
# fingerprint checked); a full fine-tune has nothing frozen, so this changes nothing there.
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
STATE_FILE = "trainer_state.json"
FORMAT = 3  # 3: per-file SHA-256 and the seal
CHECKSUM = "sha256"


class Stateful(Protocol):
    """DCP's Stateful protocol; here for non-tensor state saved as JSON."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor leaves with weights_only=False; we don't."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:  # noqa: D401
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _rng_key(rank: int) -> str:
    return f"rng.rank{rank}"


def _rng_state(device: torch.device) -> torch.Tensor:
    cpu = torch.get_rng_state()
    if device.type == "cuda":
        # One byte tensor: CPU state then this device's CUDA state.
        return torch.cat([cpu, torch.cuda.get_rng_state(device)])
    return cpu


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    n_cpu = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n_cpu].clone())
    if device.type == "cuda" and state.numel() > n_cpu:
        torch.cuda.set_rng_state(state[n_cpu:].clone(), device)


def _json_value(o: Any) -> Any:
    # Tensors and numpy values in a state_dict (e.g. the loss buffer) become lists and
    # numbers; Python floats round-trip through JSON exactly.
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable in a checkpoint's state: {type(o).__name__}")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def file_digest(path: Path, block: int = 8 << 20) -> str:
    """SHA-256 of a file, read in 8 MiB blocks (hashlib releases the GIL on large updates)."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _seal(state: Mapping[str, Any]) -> str:
    """SHA-256 of the trainer state's canonical JSON (everything but the seal itself)."""
    body = {k: v for k, v in state.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=_json_value).encode()).hexdigest()


def _local_bytes(state: Any) -> int:
    """Bytes of the tensors (a DTensor's local shard) in a nested state dict."""
    if isinstance(state, Mapping):
        return sum(_local_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_local_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        t = state.to_local() if hasattr(state, "to_local") else state
        return t.numel() * t.element_size()
    return 0


def _disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT / EFBIG behind a failed save (DCP wraps each rank's error)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return x
        failures = getattr(x, "failures", None)  # torch's CheckpointException: {rank: exception}
        if isinstance(failures, Mapping):
            todo += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
        todo += [x.__cause__, x.__context__]
    return None


def _collective(e: CheckpointError) -> CheckpointError:
    e.collective = True  # every rank raises it for the same reason: rank 0 reports it
    return e


def verify_checkpoint(path: Path, *, contents: bool = False) -> dict[str, Any]:
    """Return the trainer state of a complete checkpoint, or raise CheckpointError saying why.

    Always: files present with their recorded sizes, DCP metadata readable, the trainer state
    sealed. ``contents=True`` also checks every file's SHA-256 (reads the whole checkpoint; the
    resume path shares that work across ranks with ``verify_files``)."""
    path = Path(path)
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path}: a partial checkpoint (never committed)")
    state_file = path / STATE_FILE
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: DCP .metadata is missing (incomplete checkpoint)")
    if not state_file.is_file():
        raise CheckpointError(f"{path}: {STATE_FILE} is missing (incomplete checkpoint)")
    try:
        raw = json.loads(state_file.read_text())
        state = _upgrade(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: {STATE_FILE} is corrupt: {e}") from e
    if "seal" in raw and _seal(raw) != raw["seal"]:
        raise CheckpointError(f"{path}: {STATE_FILE} does not match its seal (changed or corrupted after the save)")
    for name, size in state.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: file {name} has {f.stat().st_size} bytes, expected {size} (truncated or overwritten)")
    try:
        dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to parse means unusable
        raise CheckpointError(f"{path}: DCP metadata unreadable: {e}") from e
    if contents:
        bad = verify_files(path, state, sorted(state.get("checksums", {})))
        if bad:
            raise CheckpointError(bad[0])
    return state


def verify_files(path: Path, state: Mapping[str, Any], names: list[str]) -> list[str]:
    """Problems with ``names`` of a checkpoint: each file's SHA-256 against the recorded one."""
    recorded = state.get("checksums", {})
    problems = []
    for name in names:
        if file_digest(Path(path) / name) != recorded[name]:
            problems.append(f"{path}: file {name} does not match its recorded {CHECKSUM} (corrupted on disk)")
    return problems


def _upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (wave 1) listed each piece of state at the top level."""
    if state.get("format", 1) >= 2:
        return state
    return {**state, "format": FORMAT, "state": {
        "progress": {k: state.get(k, 0) for k in ("step", "tokens_seen", "rows_seen")},
        "sampler": state["sampler"], "loss_buffer": state["loss_buffer"], "scheduler": state["scheduler"],
        "logger": {"wandb_run_id": state.get("wandb_run_id")}}}


def find_latest(root: Path, *, contents: bool = False) -> tuple[Path | None, list[str]]:
    """Newest checkpoint that verifies (``contents``: checksums too), and the reasons the newer
    ones were refused."""
    problems = []
    if root.is_dir():
        problems += [f"{p}: a partial checkpoint (never committed), ignored" for p in sorted(root.glob("step-*.tmp"))]
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path, contents=contents)
            return path, problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems


class Checkpointer:
    def __init__(self, root: Path, *, rank: int, keep_last: int = 2, async_save: bool = False,
                 device: torch.device = torch.device("cpu")):
        self.root = Path(root)
        self.rank = rank
        self.keep_last = keep_last
        self.async_save = async_save
        self.device = device
        self._pending: tuple[Future, Path, Path, dict[str, Any]] | None = None  # digests future, ...
        self._group = None
        if async_save and dist.is_initialized():
            # DCP's background thread must not share the training group: interleaved
            # collectives from two threads on one gloo group mismatch (platform-facts.md).
            self._group = dist.new_group(backend="gloo")
        self.last_blocking_s = 0.0
        self.preflight = True  # refuse a save the filesystem cannot hold before writing (tests turn it off)

    # ---- save -------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             states: Mapping[str, Stateful], metadata: Mapping[str, Any] | None = None) -> None:
        """Collective: every rank calls it. Model and optimizer shards go to DCP; rank 0's
        ``states`` (each one's ``state_dict()``, taken now) and ``metadata`` go into JSON."""
        trainer_state = {**(metadata or {}), "format": FORMAT, "step": step,
                         "state": {name: s.state_dict() for name, s in states.items()},
                         "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # JSON now, not at commit: an async save must hold this step's state, not a later one's.
        trainer_state = json.loads(json.dumps(trainer_state, default=_json_value))
        t0 = time.perf_counter()
        self.wait()  # one checkpoint in flight at a time
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        barrier()
        msd, osd = get_state_dict(model, optimizer, options=TRAINABLE)
        state = {"model": msd, "optim": osd, _rng_key(self.rank): _rng_state(self.device)}
        # what the save writes over all ranks, with DCP's metadata and framing
        self._last_need = int(sum(all_gather_objects(_local_bytes(state))) * 1.02) + (1 << 20)
        if self.preflight:
            self._check_space(tmp)
        try:
            if self.async_save:
                from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

                fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group,
                                     async_checkpointer_type=AsyncCheckpointerType.THREAD)
                self._pending = (self._digest_when_written(fut, tmp), tmp, final, trainer_state)
                pause_point("save")  # (tests) a signal while the background write runs
            else:
                dcp.save(state, checkpoint_id=str(tmp))
                pause_point("save")  # (tests) a signal between the write and the commit
                self._commit(tmp, final, trainer_state, self._own_digests(tmp))
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - classified, cleaned up, re-raised
            self._failed_save(tmp, e)
        self.last_blocking_s = time.perf_counter() - t0

    def _check_space(self, tmp: Path) -> None:
        """Collective: refuse a save the filesystem cannot hold, before writing a byte."""
        problem = None
        need = self._last_need
        if self.rank == 0:
            free = shutil.disk_usage(self.root).free
            if free < need:
                problem = (f"checkpoint {tmp.with_suffix('')} not saved: it needs ~{need / 1e9:.2f} GB and "
                           f"{self.root} has {free / 1e9:.2f} GB free; {self._previous()}. Free space (or lower "
                           "checkpoint.keep_last), or set trainer.run_dir on a larger filesystem")
        problem = broadcast_object(problem)
        if problem:
            raise _collective(CheckpointError(problem))

    def _previous(self) -> str:
        latest = list_checkpoints(self.root)
        return f"the previous checkpoint {latest[-1][1]} is intact" if latest else "no earlier checkpoint exists"

    def _failed_save(self, tmp: Path, e: BaseException) -> None:
        """A save failed (DCP raises it on every rank): remove its partial directory, keep the
        previous checkpoint and ``latest`` as they are, and say why. A full disk or quota is a
        CheckpointError naming the path and the space; anything else is re-raised. (torch.save's
        zip writer turns ENOSPC into a RuntimeError, so a filesystem left without free space
        counts as full too.)"""
        free = shutil.disk_usage(self.root).free
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(e)
        if full is None and free >= max(1 << 20, self._last_need // 100):
            raise e
        why = os.strerror(full.errno) if full is not None else f"the filesystem filled up ({free / 1e6:.1f} MB left)"
        raise _collective(CheckpointError(
            f"checkpoint {tmp.with_suffix('')} not saved: {why} on {self.root} (it needs ~{self._last_need / 1e9:.2f} "
            f"GB, {shutil.disk_usage(self.root).free / 1e9:.2f} GB free once its partial files were removed); "
            f"{self._previous()}. Free space or raise the quota, then restart the job (it resumes)")) from e

    def wait(self) -> None:
        """Finish an in-flight async save (collective when one is pending)."""
        if self._pending is None:
            return
        fut, tmp, final, trainer_state = self._pending
        self._pending = None
        try:
            digests = fut.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - classified, cleaned up, re-raised
            self._failed_save(tmp, e)
        self._commit(tmp, final, trainer_state, digests)

    def close(self, *, failed: bool = False, timeout_s: float = 300.0) -> None:
        """Release the checkpointer. Normally: commit an in-flight async save (collective).
        After a failure the other ranks may be anywhere, so no collective is attempted: the
        background write is given ``timeout_s`` to finish and stays an uncommitted ``.tmp``
        (never loaded), and the previous checkpoint remains the latest."""
        if not failed:
            self.wait()
            return
        if self._pending is None:
            return
        fut, tmp, _, _ = self._pending
        self._pending = None
        try:
            fut.result(timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - a failure is being handled already
            log.warning("async checkpoint %s did not finish (%s): left uncommitted", tmp, e or type(e).__name__)
        else:
            log.warning("async checkpoint %s written but not committed (the run failed)", tmp)

    def _own_digests(self, tmp: Path) -> dict[str, str]:
        """SHA-256 of the shard files this rank wrote (DCP names them ``__<rank>_<n>.distcp``)."""
        return {p.name: file_digest(p) for p in sorted(tmp.glob(f"__{self.rank}_*.distcp"))}

    def _digest_when_written(self, fut: Future, tmp: Path) -> Future:
        """A future of this rank's digests, hashed in DCP's writer thread once its write is done."""
        out: Future = Future()

        def done(f: Future) -> None:
            try:
                f.result()
                out.set_result(self._own_digests(tmp))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                out.set_exception(e)

        fut.add_done_callback(done)
        return out

    def _commit(self, tmp: Path, final: Path, trainer_state: dict[str, Any], digests: dict[str, str]) -> None:
        # DCP's coordinator writes .metadata only after every rank reported its writes done,
        # and dcp.save returns on all ranks after that; gathering the digests is the barrier.
        gathered = all_gather_objects(digests)
        if self.rank == 0:
            checksums = {name: d for part in gathered for name, d in part.items()}
            files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
            for name in files.keys() - checksums.keys():  # .metadata, and anything DCP named otherwise
                checksums[name] = file_digest(tmp / name)
            record = {**trainer_state, "files": files, "checksums": {k: checksums[k] for k in sorted(files)}}
            record["seal"] = _seal(record)
            _write_json_atomic(tmp / STATE_FILE, record)
            _fsync_dir(tmp)
            old = final.with_name(final.name + ".old")
            if final.exists():  # re-saving a step (the end right after a periodic save): swap, then drop
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
            (self.root / "latest.tmp").write_text(final.name + "\n")
            os.replace(self.root / "latest.tmp", self.root / "latest")
            self._prune()
            log.info("checkpoint saved: %s", final)
        barrier()

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.root)[: -self.keep_last or None]:
            shutil.rmtree(path, ignore_errors=True)

    # ---- load -------------------------------------------------------------------------
    def resolve(self, resume: str) -> Path | None:
        """Pick the checkpoint to resume from ('auto', 'never' or a path), same on all ranks.

        Collective. Every file's SHA-256 is checked before use, the ranks sharing the files.
        'auto' takes the newest checkpoint that verifies; what it refused on the way (and why) is
        logged at WARNING and kept in ``self.refused`` for the run's event log. An explicit path
        that does not verify is an error."""
        self.refused: list[str] = []
        if resume == "never":
            return None
        if resume == "auto":
            listed = None
            if self.rank == 0:
                listed = [(None, f"{p}: a partial checkpoint (never committed), ignored")
                          for p in sorted(self.root.glob("step-*.tmp"))] if self.root.is_dir() else []
                for _, path in reversed(list_checkpoints(self.root)):
                    try:
                        verify_checkpoint(path)
                        listed.append((str(path), None))
                    except CheckpointError as e:
                        listed.append((None, str(e)))
            choice = None
            for path, problem in broadcast_object(listed):
                if problem is None:
                    problems = self._verify_contents(Path(path))
                    if not problems:
                        choice = Path(path)
                        break
                    problem = "; ".join(problems)
                self.refused.append(problem)
                if self.rank == 0:
                    log.warning("checkpoint refused: %s", problem)
            if choice is not None and self.refused and self.rank == 0 and list_checkpoints(self.root)[-1][1] != choice:
                log.warning("resuming from %s, not the newest checkpoint: the newer ones were refused above", choice)
            return choice
        if not Path(resume).is_dir():
            raise CheckpointError(f"trainer.resume={resume}: no such checkpoint directory (use auto, never, "
                                  "or a checkpoints/step-N directory)")
        problem = None
        if self.rank == 0:
            try:
                verify_checkpoint(Path(resume))
            except CheckpointError as e:
                problem = str(e)
        problem = broadcast_object(problem)
        problems = [problem] if problem else self._verify_contents(Path(resume))
        if problems:  # an explicit choice must be valid
            raise CheckpointError(f"trainer.resume={resume}: {problems[0]}")
        return Path(resume)

    def _verify_contents(self, path: Path) -> list[str]:
        """Collective: every file's checksum, file i checked by rank i mod world size."""
        state = verify_checkpoint(path)
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = verify_files(path, state, sorted(state.get("checksums", {}))[self.rank::world])
        return [p for part in all_gather_objects(mine) for p in part]

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             states: Mapping[str, Stateful]) -> dict[str, Any]:
        """Collective. Restores model, optimizer, this rank's RNG and every one of ``states``;
        returns the checkpoint's JSON (its metadata)."""
        path = Path(path)
        trainer_state = verify_checkpoint(path)
        missing = [name for name in states if name not in trainer_state["state"]]
        if missing:
            raise CheckpointError(f"{path}: {STATE_FILE} has no state for {missing}")
        msd, osd = get_state_dict(model, optimizer, options=TRAINABLE)
        state: dict[str, Any] = {"model": msd, "optim": osd}
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        has_rng = _rng_key(self.rank) in saved
        if has_rng:
            # Sized as saved: a CUDA run's entry (CPU + CUDA state) is longer than a CPU run's.
            meta = saved[_rng_key(self.rank)]
            state[_rng_key(self.rank)] = torch.empty(meta.size, dtype=meta.properties.dtype)
        dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
        # strict=False only lets the frozen tensors (not saved) be absent; anything else is checked
        result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                                options=StateDictOptions(strict=False, ignore_frozen_params=True))
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        missing = sorted(set(getattr(result, "missing_keys", ())) - frozen)
        if missing or getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{path}: the checkpoint does not match the model: missing {missing[:5]}, "
                                  f"unexpected {list(result.unexpected_keys)[:5]}")
        if has_rng:
            _set_rng_state(state[_rng_key(self.rank)], self.device)
        else:
            # Resharded onto more ranks than were saved: a fresh, reproducible stream.
            torch.manual_seed(int(trainer_state.get("seed", 0)) * 1_000_003 + self.rank * 7919 + int(trainer_state["step"]))
            log.warning("rank %d has no saved RNG state in %s (world size changed); reseeded", self.rank, path)
        for name, stateful in states.items():
            stateful.load_state_dict(trainer_state["state"][name])
        return trainer_state
