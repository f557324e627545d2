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
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from . import flops as flops_lib
from .checkpoint import Checkpointer, step_dir_name
from .config import to_container
from .data.collate import Step, make_step_loader
from .data.sampler import TokenBudgetSampler
from .datasets import load_split
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, destroy_distributed, init_distributed
from .evaluate import evaluate
from .metrics import LossBuffer
from .model import Gemma2Classifier, ModelArgs
from .optim import build_optimizer, build_scheduler_from_cfg
from .parallel import DTYPES, build_mesh, shard_model
from .runtime import (DONE_MARKER, PREEMPTED_MARKER, STOP_FILE, PreemptionWatcher, resolve_run_dir,
                      seed_everything, setup_logging)
from .tracking import MetricsLogger, progress

log = logging.getLogger(__name__)

ARCH_FIELDS = [f for f in ModelArgs.__dataclass_fields__]


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    preempted: bool = False


def model_args_from_config(mcfg: DictConfig) -> ModelArgs:
    values = {k: v for k, v in OmegaConf.to_container(mcfg, resolve=True).items() if k in ARCH_FIELDS}
    return ModelArgs(**values)


def _pretrained_overrides(mcfg: DictConfig) -> dict[str, Any]:
    overrides = dict(head=mcfg.head, head_dropout=mcfg.head_dropout, attn_impl=mcfg.attn_impl,
                     rope_impl=mcfg.rope_impl, last_layer_pooled_only=mcfg.last_layer_pooled_only,
                     activation_checkpointing=mcfg.activation_checkpointing, num_labels=mcfg.num_labels)
    if mcfg.query_pre_attn_scalar is not None:  # the 9B release changed 224 -> 256
        overrides["query_pre_attn_scalar"] = mcfg.query_pre_attn_scalar
    return overrides


def _pretrained_dir(mcfg: DictConfig) -> Path:
    path = Path(mcfg.name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path={path}: no config.json there (a transformers Gemma 2 "
                                "directory is expected; set model.name_or_path=null to train from scratch)")
    return path


def build_model(mcfg: DictConfig) -> Gemma2Classifier:
    """Full model on this process: from scratch (the same seed on every rank gives identical
    weights) or read tensor by tensor from a transformers Gemma 2 directory."""
    if mcfg.name_or_path:
        overrides = _pretrained_overrides(mcfg)
        head = overrides.pop("head")
        model = Gemma2Classifier.from_pretrained(_pretrained_dir(mcfg), head=head, dtype=DTYPES[mcfg.dtype],
                                                 **overrides)
        return model.train()
    return Gemma2Classifier(model_args_from_config(mcfg)).to(DTYPES[mcfg.dtype])


def build_sharded_model(mcfg: DictConfig, pcfg: DictConfig, info: DistInfo, mesh) -> Gemma2Classifier:
    """FSDP2-sharded model. Pretrained weights are read once, by rank 0, and streamed to the
    other ranks' shards (they build on the meta device), so a node does not hold one full
    copy of the checkpoint per GPU in host memory."""
    shard = dict(param_dtype=pcfg.param_dtype, reduce_dtype=pcfg.reduce_dtype,
                 reshard_after_forward=pcfg.reshard_after_forward, cpu_offload=pcfg.cpu_offload)
    if not mcfg.name_or_path or info.world_size == 1:
        return shard_model(build_model(mcfg).to(info.device), mesh, **shard)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full_state: dict[str, torch.Tensor] = {}
    if info.is_main:
        model = build_model(mcfg)
        full_state = {k: v.detach() for k, v in model.state_dict().items()}
        model = model.to(info.device)
    else:
        args = ModelArgs.from_hf_config(_pretrained_dir(mcfg), **_pretrained_overrides(mcfg))
        with torch.device("meta"):
            model = Gemma2Classifier(args).to(DTYPES[mcfg.dtype])
    model = shard_model(model, mesh, **shard)
    if not info.is_main:
        model.to_empty(device=info.device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model.train()


def _soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross entropy against (possibly soft) label distributions, in fp32."""
    return -(labels * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def _to_device(mb: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}


def _grad_norm_and_clip(model: torch.nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):  # DTensor: already the global norm across shards
        norm = norm.full_tensor()
    return float(norm)


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        tcfg = cfg.trainer
        if tcfg.num_threads:
            torch.set_num_threads(int(tcfg.num_threads))
        self.info: DistInfo = init_distributed(tcfg.device, cfg.parallel.backend)
        self.run_dir = resolve_run_dir(tcfg.run_dir, cfg.experiment, self.info)
        setup_logging(self.run_dir, self.info.rank, cfg.logging.level)
        log.info("run directory: %s (world size %d, %s, backend %s)", self.run_dir, self.info.world_size,
                 self.info.device, self.info.backend)
        if self.info.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            for marker in (STOP_FILE, PREEMPTED_MARKER):
                (self.run_dir / marker).unlink(missing_ok=True)
        # Before the slow setup below: a SIGTERM/SIGUSR1 arriving during data loading or the
        # checkpoint load must be recorded (stop after the first step), not kill the rank.
        self.watcher = PreemptionWatcher(self.run_dir, self.info)
        seed_everything(tcfg.seed)

        dcfg = cfg.data
        self.train_ds = load_split(dcfg, "train", self.info)
        self.eval_ds = load_split(dcfg, "eval", self.info) if dcfg.eval_path else None
        self.sampler = TokenBudgetSampler(
            self.train_ds.lengths, global_batch_rows=dcfg.global_batch_rows, max_tokens=dcfg.max_tokens,
            world_size=self.info.world_size, rank=self.info.rank, seed=tcfg.seed, shuffle=dcfg.shuffle)
        steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = steps_per_epoch * tcfg.epochs
        if tcfg.max_steps:
            self.total_steps = min(self.total_steps, tcfg.max_steps)
        log.info("train rows %d, steps/epoch %d, total steps %d", len(self.train_ds), steps_per_epoch,
                 self.total_steps)

        torch.manual_seed(tcfg.seed)  # identical init on every rank, whatever happened above
        self.mesh = build_mesh(self.info, cfg.parallel.dp_replicate)
        self.model = build_sharded_model(cfg.model, cfg.parallel, self.info, self.mesh)
        self.model_args: ModelArgs = self.model.args
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler_from_cfg(self.optimizer, cfg.optim, self.total_steps)
        # Dropout streams differ per rank; restored exactly from checkpoints on resume.
        torch.manual_seed(tcfg.seed * 1_000_003 + self.info.rank + 1)

        self.step = 0
        self.tokens_seen = 0
        self.rows_seen = 0
        self.loss_buffer = LossBuffer(tcfg.loss_buffer_size)
        self.wandb_run_id: str | None = None
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", rank=self.info.rank,
                                         keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save,
                                         device=self.info.device)
        self.resumed_from = self.checkpointer.resolve(tcfg.resume)
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        self.logger = MetricsLogger(self.run_dir, rank=self.info.rank, wandb_cfg=cfg.logging.wandb,
                                    run_config=to_container(cfg), resume_run_id=self.wandb_run_id)
        self.wandb_run_id = self.logger.run_id
        peak = tcfg.peak_flops_per_device
        self.peak_flops = flops_lib.peak_flops(flops_lib.detect_peak_key(self.info.device), peak)

    # ---- state --------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        lb = self.loss_buffer.state_dict()
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "rows_seen": self.rows_seen,
            "seed": self.cfg.trainer.seed, "world_size": self.info.world_size,
            "sampler": self.sampler.state_dict(),
            "loss_buffer": {"size": lb["size"], "values": lb["values"].tolist(), "weights": lb["weights"].tolist()},
            "scheduler": self.scheduler.state_dict(),
            "wandb_run_id": self.wandb_run_id,
            "config": to_container(self.cfg),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def _load(self, path: Path) -> None:
        state = self.checkpointer.load(path, self.model, self.optimizer)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.rows_seen = int(state.get("rows_seen", 0))
        self.sampler.load_state_dict(state["sampler"])
        self.loss_buffer.load_state_dict(state["loss_buffer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.wandb_run_id = state.get("wandb_run_id")
        log.info("resumed from %s at step %d (saved with world size %d, now %d)", path, self.step,
                 state.get("world_size", -1), self.info.world_size)

    def save_checkpoint(self) -> Path | None:
        if not self.cfg.checkpoint.enabled:
            return None
        self.checkpointer.save(self.step, self.model, self.optimizer, self._trainer_state())
        return self.checkpointer.root / step_dir_name(self.step)

    # ---- steps --------------------------------------------------------------------------
    def _steps(self) -> Iterator[Step]:
        """This rank's collated micro-batches, one Step per optimizer step, from the sampler's
        saved position (the sampler moves past a Step when it is handed out)."""
        if self.step >= self.total_steps:
            return iter(())
        loader = make_step_loader(self.train_ds, self.sampler, num_workers=self.cfg.data.loader_workers,
                                  max_epochs=self.cfg.trainer.epochs)
        return _rng_untouched(loader)

    def train_step(self, micro_batches: list[dict[str, Any]], rows_in_step: int) -> dict[str, float]:
        model, dev, world = self.model, self.info.device, self.info.world_size
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        tokens = rows = 0
        bad_rows: list[Any] = []
        seq_lens: list[int] = []
        for mb in micro_batches:
            batch = _to_device(mb, dev)
            logits = model(**batch)
            per_row = _soft_cross_entropy(logits, batch["label"]) * batch["weight"]
            (per_row.sum() * (world / rows_in_step)).backward()
            loss_sum += per_row.detach().double().sum()
            if not torch.isfinite(per_row).all():
                bad_rows += [rid for rid, v in zip(mb["row_ids"], per_row.tolist()) if not math.isfinite(v)]
            real = batch["weight"] > 0
            rows += int(real.sum())
            lens = [n for n, w in zip(mb["seq_lens"], mb["weight"].tolist()) if w > 0]
            tokens += sum(lens)
            seq_lens += lens
        grad_norm = _grad_norm_and_clip(model, self.cfg.optim.grad_clip)
        # Model FLOPs are additive over sequences (attention depends on each real length), so
        # each rank counts its own and they ride along in the step's single reduction.
        flops = flops_lib.flops_per_step(self.model_args, seq_lens, training=True,
                                         last_layer_pooled_only=self.model_args.last_layer_pooled_only)
        g_loss, g_rows, g_tokens, g_bad, g_flops = all_reduce_sum(
            [float(loss_sum), rows, tokens, float(len(bad_rows)), float(flops)], dev)
        if g_bad > 0 or not math.isfinite(g_loss) or not math.isfinite(grad_norm):
            ids = [i for part in all_gather_objects(bad_rows) for i in part]
            self.optimizer.zero_grad(set_to_none=True)
            self.checkpointer.wait()  # every rank is here: commit an in-flight async save of a good step
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {self.step + 1}: loss={g_loss}, grad_norm={grad_norm}, "
                f"rows with non-finite loss: {ids[:50]}; stopped before the optimizer update (no checkpoint written)")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": g_loss / max(g_rows, 1.0), "rows": g_rows, "tokens": g_tokens, "grad_norm": grad_norm,
                "flops": g_flops}

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
            self.step += 1
            self.tokens_seen += int(out["tokens"])
            self.rows_seen += int(out["rows"])
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
                    "tokens_seen": self.tokens_seen, "rows_seen": self.rows_seen,
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
        metrics = evaluate(self.model, self.eval_ds, self.info,
                           max_tokens=self.cfg.data.eval_max_tokens or self.cfg.data.max_tokens,
                           predictions_path=out_path)
        if self.info.is_main:
            scalars = {k: v for k, v in metrics.items() if k != "confusion_matrix"}
            self.logger.log_eval(scalars, step=self.step)
            self.logger.log_confusion_matrix(metrics["confusion_matrix"], ["a", "b", "tie"], step=self.step)
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


def run(cfg: DictConfig) -> TrainResult:
    trainer = Trainer(cfg)
    result = trainer.fit()
    if trainer.info.is_main:
        summary = {"run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                   "steps": result.steps, "preempted": result.preempted,
                   **{f"eval_{k}": v for k, v in result.eval_metrics.items()}}
        (result.run_dir / "result.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    destroy_distributed()
    return result


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
