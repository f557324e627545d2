"""A training checkpoint (or an export) as one plain (unsharded) model on one process, for
export and predict.

DCP reshards on load, so a checkpoint written by N ranks loads on one CPU process without a
process group. The run's resolved config, its task (class names) and its model's full
architecture travel inside the checkpoint (trainer_state.json), so only the path is needed;
key=value overrides may change inference-time settings (attention backend, data paths) but
not what was trained (see trainer/build.py: load_for_inference).

An export directory (``launch.export``: its ``arena_trainer.json`` holds the same records) opens
the same way: a PEFT adapter over its base (``model.name_or_path=`` may point at a moved copy;
the fingerprint must match), or merged / fully fine-tuned weights in transformers' layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .build import load_for_inference
from .checkpoint import find_latest, verify_checkpoint
from .config import Config, register_configs, validate
from .errors import CheckpointError, ConfigError
from .model import Gemma2Classifier
from .tasks import Task, build_task, task_from_record

log = logging.getLogger(__name__)

EXPORT_RECORD = "arena_trainer.json"  # written by launch.export beside the weights


def resolve_checkpoint(path: str | Path) -> Path:
    """A step-N directory, or a run directory / checkpoints directory (its newest checkpoint that
    verifies). Every file's SHA-256 is checked before use."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint={path}: no such file or directory")
    if (path / ".metadata").is_file():
        verify_checkpoint(path, contents=True)
        return path
    for root in (path / "checkpoints", path):
        found, problems = find_latest(root, contents=True)
        for p in problems:
            log.warning("checkpoint refused: %s", p)
        if found is not None:
            return found
    raise CheckpointError(f"checkpoint={path}: no complete checkpoint there (expected a run directory or a "
                          "checkpoints/step-N directory)")


def checkpoint_config(ckpt: Path, overrides: list[str] | None = None, state: dict | None = None) -> DictConfig:
    """The config the checkpoint was trained with (validated), with dotlist overrides applied."""
    register_configs()
    state = state or verify_checkpoint(ckpt)
    base = OmegaConf.structured(Config)
    cfg = OmegaConf.merge(base, OmegaConf.create(state["config"]))
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        except Exception as e:  # noqa: BLE001 - OmegaConf names the key
            raise ConfigError(f"bad override {overrides}: {str(e).splitlines()[0]}") from e
    validate(cfg)
    return cfg


def checkpoint_task(ckpt: Path, cfg: DictConfig, state: dict | None = None) -> Task:
    """The task the checkpoint was trained on (its recorded class names), checked against cfg."""
    state = state or verify_checkpoint(ckpt)
    if "task" not in state:  # written before tasks were recorded: the Arena task
        return build_task(cfg.data)
    return task_from_record(state["task"], cfg.data, str(ckpt))


@dataclass
class TrainedRun:
    """What a checkpoint says about its run: enough to rebuild the model, score and export."""

    checkpoint: Path
    state: dict  # trainer_state.json
    cfg: DictConfig  # the training config, with the caller's overrides
    task: Task
    overrides: list[str]

    def load_model(self, device: torch.device | str = "cpu") -> Gemma2Classifier:
        """The trained model, unsharded on ``device``, in eval mode."""
        return load_for_inference(self.checkpoint, self.state, self.cfg, self.task, self.overrides, device)


class ExportedModel(TrainedRun):
    """An export directory: ``checkpoint`` is the directory, ``state`` its arena_trainer.json."""

    def load_model(self, device: torch.device | str = "cpu") -> Gemma2Classifier:
        from dataclasses import replace

        from .adapters.peft_format import load_adapter_weights, read_adapter_config
        from .build import adapter_model, recorded_args, recorded_spec
        from .dtypes import to_dtype
        from .model.hf_io import load_pretrained

        where, record = str(self.checkpoint), self.state["model"]
        args = recorded_args({"model": record}, self.cfg, self.task, self.overrides, where)
        if self.state.get("kind") == "adapter":
            spec, _ = read_adapter_config(self.checkpoint)  # what the files say; NF4 from the run's record
            spec = replace(recorded_spec(record), **{k: getattr(spec, k) for k in
                                                      ("rank", "alpha", "dropout", "target_modules", "use_rslora")})
            model = adapter_model(record, args, self.cfg, where, device, spec)
            load_adapter_weights(model, self.checkpoint)
        else:
            runtime = {k: getattr(args, k) for k in ("attn_impl", "rope_impl", "last_layer_pooled_only")}
            model = load_pretrained(self.checkpoint, head=args.head, dtype=to_dtype(self.cfg.model.dtype),
                                    device=device, **runtime)
        model.select_kernels(device, to_dtype(self.cfg.model.dtype))
        return model.eval()


def open_export(path: Path, overrides: list[str] | None = None) -> ExportedModel:
    """An export directory with its training config (the tokenizer: the copy inside it) and task."""
    try:
        state = json.loads((path / EXPORT_RECORD).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / EXPORT_RECORD}: unreadable ({e})") from e
    if not state.get("config") or not state.get("model"):
        raise CheckpointError(f"{path}: exported before exports recorded their training config; score the run "
                              "directory instead (checkpoint=runs/NAME)")
    overrides = list(overrides or [])
    if not any(o.lstrip("+").startswith("data.tokenizer_path=") for o in overrides):
        overrides.insert(0, f"data.tokenizer_path={path}")
    cfg = checkpoint_config(path, overrides, state)
    return ExportedModel(path, state, cfg, checkpoint_task(path, cfg, state), overrides)


def open_trained(checkpoint: str | Path, overrides: list[str] | None = None) -> TrainedRun:
    """A run directory or checkpoint directory, resolved and verified, with its config and
    task; or an export directory (see ``open_export``)."""
    path = Path(checkpoint).expanduser()
    if (path / EXPORT_RECORD).is_file():
        return open_export(path, overrides)
    ckpt = resolve_checkpoint(checkpoint)
    state = verify_checkpoint(ckpt)
    cfg = checkpoint_config(ckpt, overrides, state)
    return TrainedRun(ckpt, state, cfg, checkpoint_task(ckpt, cfg, state), list(overrides or []))


def load_model_from_checkpoint(ckpt: Path, cfg: DictConfig, device: torch.device | str = "cpu") -> Gemma2Classifier:
    """The trained model of ``ckpt`` (config as given by ``checkpoint_config``)."""
    state = verify_checkpoint(ckpt)
    return load_for_inference(ckpt, state, cfg, checkpoint_task(ckpt, cfg, state), (), device)


def checkpoint_metadata(ckpt: Path) -> dict[str, Any]:
    state = verify_checkpoint(ckpt)
    return {"step": state["step"], "tokens_seen": state["state"]["progress"].get("tokens_seen"),
            **{k: state[k] for k in ("world_size", "saved_at") if k in state}}


def export_full_weights(trained: TrainedRun, out: Path, max_shard_bytes: int) -> int:
    """A full fine-tune's weights straight from its DCP shards into transformers' layout, one
    safetensors shard at a time, in the dtype they trained in: host memory holds one shard
    (at most ``max_shard_bytes``, or one larger tensor), never the model. Returns the bytes written."""
    import torch.distributed.checkpoint as dcp

    from .build import _check_keys, recorded_args
    from .checkpoint import SafeLoadPlanner
    from .model.hf_io import parameter_name_map, plan_shards, write_sharded

    ckpt = trained.checkpoint
    args = recorded_args(trained.state, trained.cfg, trained.task, trained.overrides, str(ckpt))
    with torch.device("meta"):
        model = Gemma2Classifier(args)
    params = dict(model.named_parameters())
    _check_keys(model, ckpt, set(params))
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    dtypes = {n: saved[f"model.{n}"].properties.dtype for n in params}
    name_map = parameter_name_map(model)
    ours = {name_map[n]: n for n in params}
    sizes = {name_map[n]: p.numel() * dtypes[n].itemsize for n, p in params.items()}

    def read(keys):
        sd = {"model": {ours[k]: torch.empty(params[ours[k]].shape, dtype=dtypes[ours[k]]) for k in keys}}
        dcp.load(sd, checkpoint_id=str(ckpt), planner=SafeLoadPlanner(allow_partial_load=True))
        return {k: sd["model"][ours[k]] for k in keys}

    out.mkdir(parents=True, exist_ok=True)
    write_sharded(out, plan_shards(sizes, max_shard_bytes), read, sum(sizes.values()))
    dtype = str(dtypes["embed_tokens.weight"]).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(args.to_hf_config(dtype=dtype, labels=trained.task.output_columns),
                                                indent=2) + "\n")
    return sum(sizes.values())
