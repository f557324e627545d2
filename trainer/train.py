"""The training loop: config in, checkpoint and eval metrics out.

One optimizer step = the micro-batches the token-budget sampler cut for this rank (every rank
gets the same number). Each micro-batch's summed loss is scaled by world_size / rows-in-step so
that, after FSDP averages gradients over ranks, the gradient is that of the mean loss over the
whole global batch however the rows were cut. Losses are reduced across ranks once per step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import flops as flops_lib
from . import memory
from .build import architecture_record, build_model, check_same_base
from .checkpoint import Checkpointer, Stateful, step_dir_name, verify_checkpoint
from .config import to_container
from .data.collate import PackedBatch, Step, VarlenCollator, make_step_loader
from .datasets import has_split, load_split, resolve_task, train_sampler
from .distributed import (DistInfo, all_gather_objects, all_reduce_sum, broadcast_object, destroy_distributed,
                          init_distributed)
from .errors import CheckpointError, DataError
from .evaluate import evaluate
from .loss import build_loss
from .metrics import LossBuffer
from .optim import build_optimizer, build_scheduler_from_cfg
from .parallel import build_mesh, local_state_bytes
from .runlock import RunDirInUse, RunLock
from .runtime import (DONE_MARKER, PREEMPTED_MARKER, STOP_FILE, PreemptionWatcher, pause_point, resolve_run_dir,
                      restore_logging, seed_everything, setup_logging)
from .tracking import MetricsLogger, progress

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    preempted: bool = False


@dataclass
class TrainProgress:
    """Optimizer steps taken and what they consumed (checkpointed: Stateful)."""

    step: int = 0
    tokens_seen: int = 0
    rows_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rows_seen": self.rows_seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step, self.tokens_seen, self.rows_seen = (int(state[k]) for k in ("step", "tokens_seen", "rows_seen"))


def _grad_norm_and_clip(model: torch.nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor: already the global norm across shards
        norm = norm.full_tensor()
    return float(norm)


class Trainer:
    """Sets up a run from a config (process group, run directory, data, model, optimizer,
    resume) and trains it with ``fit()``. ``close()`` releases what it holds (async save,
    wandb run); ``run()`` below does both and tears the process group down."""

    def __init__(self, cfg: DictConfig, command: str | None = None):
        self.cfg = cfg
        self.command = command  # the launch command, recorded in checkpoints (model cards show it)
        try:
            self._setup(cfg)
        except BaseException:
            self.close(failed=True)
            raise

    def _setup(self, cfg: DictConfig) -> None:
        tcfg, dcfg = cfg.trainer, cfg.data
        if tcfg.num_threads:
            torch.set_num_threads(int(tcfg.num_threads))
        self.info: DistInfo = init_distributed(tcfg.device, cfg.parallel.backend)
        self.run_dir = resolve_run_dir(tcfg.run_dir, cfg.experiment, self.info)
        setup_logging(self.run_dir, self.info.rank, cfg.logging.level)
        log.info("run directory: %s (world size %d, %s, backend %s)", self.run_dir, self.info.world_size,
                 self.info.device, self.info.backend)
        self._hold_run_dir()
        if self.info.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            for marker in (STOP_FILE, PREEMPTED_MARKER):
                (self.run_dir / marker).unlink(missing_ok=True)
        # Before the slow setup below: a SIGTERM/SIGUSR1 arriving during data loading or the
        # checkpoint load must be recorded (stop after the first step), not kill the rank.
        self.watcher = PreemptionWatcher(self.run_dir, self.info)
        seed_everything(tcfg.seed)

        self.task = resolve_task(dcfg, self.info)
        log.info("task: %s", self.task.describe())
        pause_point("load")
        self.train_ds = load_split(dcfg, self.task, "train", self.info, seed=tcfg.seed)
        self.eval_ds = load_split(dcfg, self.task, "eval", self.info, seed=tcfg.seed) \
            if has_split(dcfg, "eval") else None
        self.loss = build_loss(cfg.loss)
        if self.loss.needs_teacher and self.train_ds.teacher is None:
            raise DataError(f"data.train_path={dcfg.train_path}: loss.kind=distill needs the teachers' probabilities "
                            f"in columns {list(self.task.teacher_columns)} (write them with launch.predict "
                            "out_format=teacher), or set loss.kind=ce")
        log.info("loss: %s", self.loss.describe())
        self.sampler = train_sampler(self.train_ds, dcfg, world_size=self.info.world_size, rank=self.info.rank,
                                     seed=tcfg.seed)
        steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = steps_per_epoch * tcfg.epochs
        if tcfg.max_steps:
            self.total_steps = min(self.total_steps, tcfg.max_steps)
        log.info("train rows %d, steps/epoch %d, total steps %d", len(self.train_ds), steps_per_epoch,
                 self.total_steps)

        torch.manual_seed(tcfg.seed)  # identical init on every rank, whatever happened above
        self.mesh = build_mesh(self.info, cfg.parallel.dp_replicate)
        self._memory_baseline = memory.current_bytes(self.info.device)  # what training adds is measured above it
        self.model, self.model_args, self.base = build_model(cfg, self.task, self.info, self.mesh)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler_from_cfg(self.optimizer, cfg.optim, self.total_steps)
        # Dropout streams differ per rank; restored exactly from checkpoints on resume.
        torch.manual_seed(tcfg.seed * 1_000_003 + self.info.rank + 1)

        self.progress = TrainProgress()
        self._memory_steps = 0  # steps of this process measured into memory.json (the first two)
        self.loss_buffer = LossBuffer(tcfg.loss_buffer_size)
        # Started after a resume has restored its run id: the job continues the same wandb run.
        self.logger = MetricsLogger(self.run_dir, rank=self.info.rank, wandb_cfg=cfg.logging.wandb,
                                    run_config=to_container(cfg), start=False)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", rank=self.info.rank,
                                         keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save,
                                         device=self.info.device)
        self.resumed_from = self.checkpointer.resolve(tcfg.resume)
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        self.logger.start()
        for event, detail in self.train_ds.events + (self.eval_ds.events if self.eval_ds is not None else []):
            self.logger.log_event(event, detail, self.step)  # e.g. a rebuilt tokenization cache
        for problem in self.checkpointer.refused:  # resume fell back past these (logged at WARNING)
            self.logger.log_event("checkpoint_refused", problem, self.step)
        if self.run_lock is not None and self.run_lock.took_over:
            self.logger.log_event("run_lock_taken_over", self.run_lock.took_over, self.step)
        memory.reset_peak(self.info.device)  # the first step's peak, not the build's transients
        peak = tcfg.peak_flops_per_device
        self.peak_flops = flops_lib.peak_flops(flops_lib.detect_peak_key(self.info.device), peak)

    # ---- state --------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def states(self) -> dict[str, Stateful]:
        """Every piece of non-tensor training state, as the checkpoint holds it."""
        return {"progress": self.progress, "sampler": self.sampler, "loss_buffer": self.loss_buffer,
                "scheduler": self.scheduler, "logger": self.logger}

    def _metadata(self) -> dict[str, Any]:
        return {"seed": self.cfg.trainer.seed, "world_size": self.info.world_size, "config": to_container(self.cfg),
                "command": self.command,
                "model": architecture_record(self.model_args, self.cfg.model, self.base), "task": self.task.record()}

    def _load(self, path: Path) -> None:
        _refuse_other_run(path, verify_checkpoint(path), self._metadata())  # before DCP meets other shapes
        state = self.checkpointer.load(path, self.model, self.optimizer, self.states)
        log.info("resumed from %s at step %d (saved with world size %d, now %d)", path, self.step,
                 state.get("world_size", -1), self.info.world_size)

    def save_checkpoint(self) -> Path | None:
        if not self.cfg.checkpoint.enabled:
            return None
        self.checkpointer.save(self.step, self.model, self.optimizer, self.states, self._metadata())
        return self.checkpointer.root / step_dir_name(self.step)

    def _hold_run_dir(self) -> None:
        """One job per run directory (trainer/runlock.py): rank 0 takes the lock, every rank
        raises the same error when another live job holds it."""
        self.run_lock = RunLock(self.run_dir) if self.info.is_main else None
        refusal = None
        if self.run_lock is not None:
            try:
                self.run_lock.acquire()
            except RunDirInUse as e:
                self.run_lock, refusal = None, str(e)
        refusal = broadcast_object(refusal)
        if refusal:
            raise RunDirInUse(refusal)

    def close(self, failed: bool = False) -> None:
        """Commit (or, after a failure, abandon) an in-flight async save, finish the wandb run
        and release the run directory; idempotent, and safe on a partly set-up trainer."""
        checkpointer = getattr(self, "checkpointer", None)
        logger = getattr(self, "logger", None)
        try:
            if checkpointer is not None:
                checkpointer.close(failed=failed)
        finally:
            try:
                if logger is not None:
                    logger.finish(exit_code=1 if failed else 0)
            finally:
                if getattr(self, "run_lock", None) is not None:
                    self.run_lock.release()

    # ---- steps --------------------------------------------------------------------------
    def _steps(self) -> Iterator[Step]:
        """This rank's collated micro-batches, one Step per optimizer step, from the sampler's
        saved position (the sampler moves past a Step when it is handed out)."""
        if self.step >= self.total_steps:
            return iter(())
        loader = make_step_loader(self.train_ds, self.sampler, VarlenCollator(self.task.num_classes),
                                  num_workers=self.cfg.data.loader_workers, max_epochs=self.cfg.trainer.epochs)
        return _rng_untouched(loader)

    def train_step(self, micro_batches: list[PackedBatch], rows_in_step: int) -> dict[str, float]:
        model, dev, world = self.model, self.info.device, self.info.world_size
        model.train()
        # Nothing in the micro-batch loop waits on the device: losses and non-finite counts stay
        # device tensors until the one read after the last backward.
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        n_bad = torch.zeros((), dtype=torch.float64, device=dev)
        tokens = rows = 0
        per_rows: list[torch.Tensor] = []
        seq_lens: list[int] = []
        for mb in micro_batches:
            batch = mb.to(dev, non_blocking=True)
            logits = model(**batch.inputs)
            per_row = self.loss(logits, batch.labels, batch.teacher) * batch.weights
            (per_row.sum() * (world / rows_in_step)).backward()
            per_row = per_row.detach()
            loss_sum += per_row.double().sum()
            n_bad += (~torch.isfinite(per_row)).sum()
            per_rows.append(per_row)
            lens = [n for n, w in zip(mb.seq_lens, mb.weights.tolist()) if w > 0]  # host copies: no sync
            rows += len(lens)
            tokens += sum(lens)
            seq_lens += lens
        local_loss, local_bad = torch.stack([loss_sum, n_bad]).tolist()
        bad_rows: list[Any] = []
        if local_bad:
            for mb, per_row in zip(micro_batches, per_rows):
                bad_rows += [rid for rid, v in zip(mb.row_ids, per_row.tolist()) if not math.isfinite(v)]
        grad_norm = _grad_norm_and_clip(model, self.cfg.optim.grad_clip)
        # Model FLOPs are additive over sequences (attention depends on each real length), so
        # each rank counts its own and they ride along in the step's single reduction.
        flops = flops_lib.flops_per_step(self.model_args, seq_lens, training=True,
                                         last_layer_pooled_only=self.model_args.last_layer_pooled_only)
        g_loss, g_rows, g_tokens, g_bad, g_flops = all_reduce_sum(
            [local_loss, rows, tokens, float(len(bad_rows)), float(flops)], dev)
        if g_bad > 0 or not math.isfinite(g_loss) or not math.isfinite(grad_norm):
            ids = [i for part in all_gather_objects(bad_rows) for i in part]
            self.optimizer.zero_grad(set_to_none=True)
            self.checkpointer.wait()  # every rank is here: commit an in-flight async save of a good step
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {self.step + 1}: loss={g_loss}, grad_norm={grad_norm}, "
                f"rows with non-finite loss: {ids[:50]}; stopped before the optimizer update (no checkpoint written)")
        self.optimizer.step()
        self.scheduler.step()
        if self._memory_steps < 2:  # optimizer state is lazy: the steady peak is the second step's
            self._memory_steps += 1
            self._record_memory()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": g_loss / max(g_rows, 1.0), "rows": g_rows, "tokens": g_tokens, "grad_norm": grad_norm,
                "flops": g_flops}

    def _record_memory(self) -> None:
        """What each rank holds (parameters, gradients, optimizer state) and its peak since the
        build above what it held before it, after this process's first and second steps (the
        first backward runs before the optimizer state exists): a log line and ``memory.json`` on
        rank 0, the measured counterpart of ``launch.plan``'s per-GPU figures (trainer/memory.py)."""
        dev = self.info.device
        mine = {**local_state_bytes(self.model, self.optimizer),
                "peak": memory.peak_bytes(dev) - self._memory_baseline, "baseline": self._memory_baseline}
        per_rank = all_gather_objects(mine)
        if self.info.is_main:
            mib = 2**20
            log.info("memory per rank, MiB (params / grads / optimizer = state; peak over %d step(s)): %s",
                     self._memory_steps, "; ".join(
                f"rank {r}: {b['params'] / mib:.1f} / {b['grads'] / mib:.1f} / {b['optimizer'] / mib:.1f} = "
                f"{b['total'] / mib:.1f}; peak {b['peak'] / mib:.1f}" for r, b in enumerate(per_rank)))
            record = {"step": self.step + 1, "steps_measured": self._memory_steps,
                      "world_size": self.info.world_size, "device": str(dev), "peak_method": memory.method(dev),
                      "per_rank": per_rank}
            (self.run_dir / "memory.json").write_text(json.dumps(record, indent=1))

    # ---- main loop ----------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, tcfg = self.cfg, self.cfg.trainer
        result = TrainResult(self.run_dir, self.resumed_from, steps=self.step)
        eval_every = tcfg.eval_every
        ckpt_every = cfg.checkpoint.every_steps
        bar = progress(self.total_steps, "train", self.info.rank, initial=self.step,
                       force=None if cfg.logging.progress_bar else False)
        n_dev = self.info.world_size
        if self.step >= self.total_steps:
            log.info("checkpoint is already at step %d of %d: nothing left to train", self.step, self.total_steps)
        t_wait0 = time.perf_counter()
        for batch in self._steps():
            t_start = time.perf_counter()
            data_wait = t_start - t_wait0
            epoch = batch.epoch
            out = self.train_step(batch.micro_batches, batch.num_rows)
            self.progress.step += 1
            self.progress.tokens_seen += int(out["tokens"])
            self.progress.rows_seen += int(out["rows"])
            self.loss_buffer.push(out["loss"])
            step_time = time.perf_counter() - t_start + data_wait
            if self.step % tcfg.log_every == 0 or self.step == self.total_steps:
                tok_s = out["tokens"] / step_time
                row = {
                    "loss": self.loss_buffer.mean(), "loss_step": out["loss"],
                    "lr": self.scheduler.get_last_lr()[0], "grad_norm": out["grad_norm"],
                    "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / n_dev,
                    "mfu": flops_lib.mfu(out["flops"] / step_time / n_dev, self.peak_flops),
                    "step_time": step_time, "data_wait_frac": data_wait / step_time,
                    "peak_mem_gb": _peak_memory_gb(self.info.device), "epoch": epoch,
                    "tokens_seen": self.progress.tokens_seen, "rows_seen": self.progress.rows_seen,
                }
                self.logger.log({k: v for k, v in row.items() if v is not None}, step=self.step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                log.info("step %d/%d loss %.4f (step %.4f) lr %.3e gnorm %.3f tok/s %.0f", self.step,
                         self.total_steps, row["loss"], out["loss"], row["lr"], out["grad_norm"], tok_s)
            bar.update(1)
            last = self.step >= self.total_steps
            if eval_every and self.step % eval_every == 0 and not last and self.eval_ds is not None:
                self.run_eval()
            stop = self.watcher.should_stop()
            periodic = bool(ckpt_every) and self.step % ckpt_every == 0
            if stop or periodic or (last and cfg.checkpoint.at_end):
                result.checkpoint = self.save_checkpoint() or result.checkpoint
            if stop and not last:
                log.warning("stop requested (%s): checkpointed at step %d, exiting for requeue",
                            self.watcher.requested_by, self.step)
                self.checkpointer.wait()
                if self.info.is_main:
                    (self.run_dir / PREEMPTED_MARKER).write_text(f"{self.step}\n")
                result.preempted = True
                break
            if last:
                break
            t_wait0 = time.perf_counter()
        bar.close()
        result.steps = self.step
        if not result.preempted:
            self.checkpointer.wait()
            if self.eval_ds is not None:
                result.eval_metrics = self.run_eval()
            if self.info.is_main:
                (self.run_dir / DONE_MARKER).write_text(f"{self.step}\n")
                self.logger.summary({"final_step": self.step, **{f"eval/{k}": v for k, v in
                                     result.eval_metrics.items() if not isinstance(v, list)}})
        self.logger.finish()
        return result

    def run_eval(self) -> dict[str, Any]:
        out_path = None
        if self.cfg.trainer.write_eval_predictions:
            out_path = self.run_dir / "eval" / f"predictions-step-{self.step:08d}.csv"
        pause_point("eval")
        metrics = evaluate(self.model, self.eval_ds, self.info, self.task,
                           max_tokens=self.cfg.data.eval_max_tokens or self.cfg.data.max_tokens,
                           predictions_path=out_path)
        if self.info.is_main:
            scalars = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
            self.logger.log_eval(scalars, step=self.step)
            self.logger.log_confusion_matrix(metrics["confusion_matrix"], self.task.class_names, step=self.step)
            log.info("eval step %d: log_loss %.4f accuracy %.4f macro_f1 %.4f (n=%d)", self.step,
                     metrics["log_loss"], metrics["accuracy"], metrics["macro_f1"], metrics["n"])
        return metrics


def _rng_untouched(steps: Iterator[Step]) -> Iterator[Step]:
    """Yield from `steps` without letting it move the global CPU RNG.

    torch's DataLoader draws a base seed from the global generator whenever an iterator is
    created. A resumed run creates it right after restoring the checkpoint's RNG state, an
    uninterrupted one at step 0, so that draw would shift the dropout stream of every resumed
    run by one and break bitwise resume.
    """
    it = iter(steps)
    while True:
        state = torch.get_rng_state()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield item


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # CPU: the process's peak resident set
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:  # pragma: no cover
        return float("nan")


def _refuse_other_run(path: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """A checkpoint resumes only the run that wrote it: same task (classes), architecture,
    adapter and (adapter runs) base model."""
    check_same_base(path, saved.get("model"), now["model"])
    for key, what in (("task", "task"), ("model", "model")):
        if key not in saved:  # written before these were recorded
            continue
        a, b = saved[key], now[key]
        if key == "model":
            a = {**a["architecture"], "adapter": a.get("adapter")}
            b = {**b["architecture"], "adapter": b.get("adapter")}
        if a != b:
            diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            raise CheckpointError(f"{path} was trained with another {what}: (checkpoint, this run) {diff}; "
                                  "use a new trainer.run_dir, or trainer.resume=never to start over")


def run(cfg: DictConfig, command: str | None = None) -> TrainResult:
    """Train ``cfg`` to the end (or a stop request); the process group, an in-flight async
    save and the wandb run are closed whatever happens. ``command``: how it was launched."""
    trainer: Trainer | None = None
    ok = False
    try:
        trainer = Trainer(cfg, command)
        result = trainer.fit()
        if trainer.info.is_main:
            summary = {"run_dir": str(result.run_dir),
                       "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                       "steps": result.steps, "preempted": result.preempted,
                       **{f"eval_{k}": v for k, v in result.eval_metrics.items()}}
            (result.run_dir / "result.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
        ok = True
        return result
    finally:
        try:
            if trainer is not None:
                trainer.close(failed=not ok)
        finally:
            try:
                destroy_distributed(graceful=ok)
            finally:
                restore_logging()  # last: the teardown above still logs into the run directory


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
