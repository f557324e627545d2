"""Config -> model: the one place that builds one, for training, export, predict and bench.

Training (``build_model``), in this order:

1. **architecture**: from the ``model`` config group (from scratch), or from a transformers
   Gemma 2 directory's config.json (``model.name_or_path``) with the config's head, runtime
   choices and ``query_pre_attn_scalar`` applied; ``num_labels`` always from the task;
2. **weights**: from scratch (the same seed on every rank gives identical weights), or read by
   rank 0 alone while the other ranks build on the meta device and receive their shards, so a
   node holds one host copy of the checkpoint, not one per GPU;
3. **adapters** (``model.adapter``): none (full fine-tuning), or LoRA / QLoRA: everything but
   the head frozen, the targeted linears wrapped, their weights quantised to NF4 for QLoRA
   (trainer/adapters/); an adapter run records its base's path and fingerprint;
4. **kernels**: attention and RoPE backends resolved once for the device and compute dtype;
5. **parallelize**: activation checkpointing -> (optional) compile -> fully_shard
   (trainer/parallel.py).

Inference (``load_for_inference``): the checkpoint records the trained model's full
architecture (``architecture_record``), and that, not the yaml, is what gets rebuilt; the load
is strict (every tensor present with its shape, nothing left uninitialised), and an override
that contradicts the checkpoint is an error naming both values. An adapter checkpoint holds
only what trained: the base is rebuilt from its recorded path (``model.name_or_path=`` may point
at a moved copy) and must have the recorded fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf

from .adapters import LoRASpec, apply_lora, base_record, trainable_summary
from .adapters.fingerprint import describe as describe_base
from .distributed import DistInfo, broadcast_object
from .dtypes import to_dtype
from .errors import CheckpointError, ConfigError
from .model import Gemma2Classifier, ModelArgs
from .model.args import RUNTIME_FIELDS
from .model.hf_io import load_pretrained, pretrained_args
from .parallel import parallelize
from .tasks import Task

log = logging.getLogger(__name__)

ARGS_FIELDS = tuple(f.name for f in fields(ModelArgs))
# Kept from the config when loading a pretrained directory (the rest comes from its config.json).
PRETRAINED_KEEPS = ("head", "head_dropout", *RUNTIME_FIELDS)


# ---- architecture -------------------------------------------------------------------------
def _num_labels(mcfg: DictConfig, task: Task) -> int:
    if mcfg.num_labels is not None and mcfg.num_labels != task.num_classes:
        raise ConfigError(f"config key 'model.num_labels' = {mcfg.num_labels} contradicts the task: "
                          f"{task.describe()}; leave model.num_labels=null (it follows the task)")
    return task.num_classes


def pretrained_dir(mcfg: DictConfig) -> Path:
    path = Path(mcfg.name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path={path}: no config.json there (a transformers Gemma 2 directory is "
                          "expected; set model.name_or_path=null to train from scratch)")
    return path


def _pretrained_overrides(mcfg: DictConfig, task: Task) -> dict[str, Any]:
    overrides = {k: mcfg[k] for k in PRETRAINED_KEEPS}
    overrides["num_labels"] = _num_labels(mcfg, task)
    if mcfg.query_pre_attn_scalar is not None:  # the 9B release changed 224 -> 256
        overrides["query_pre_attn_scalar"] = mcfg.query_pre_attn_scalar
    return overrides


def model_args(mcfg: DictConfig, task: Task) -> ModelArgs:
    """The architecture this config trains, before any weights exist."""
    if mcfg.name_or_path:
        path = pretrained_dir(mcfg)
        try:
            args = pretrained_args(path, **_pretrained_overrides(mcfg, task))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.name_or_path={path}: {e}") from e
        preset = {k: mcfg[k] for k in args.architecture() if k in mcfg and mcfg[k] is not None}
        differ = {k: (v, getattr(args, k)) for k, v in preset.items() if v != getattr(args, k)}
        if differ:
            log.warning("model.name_or_path=%s: its config.json decides the architecture; the model preset %r "
                        "differs in %s (preset value, checkpoint value): training the checkpoint's", path,
                        mcfg.name, differ)
        return args
    values = {k: v for k, v in OmegaConf.to_container(mcfg, resolve=True).items() if k in ARGS_FIELDS}
    values["num_labels"] = _num_labels(mcfg, task)
    if values.get("query_pre_attn_scalar") is None:
        values["query_pre_attn_scalar"] = values["head_dim"]
    return ModelArgs(**values)


def architecture_record(args: ModelArgs, mcfg: DictConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint stores to rebuild exactly the model that trained (an adapter run: its
    adapter and the base it adapts)."""
    spec = LoRASpec.from_config(mcfg.adapter)
    record = {"architecture": args.architecture(), "dtype": mcfg.dtype, "name_or_path": mcfg.name_or_path}
    if spec is not None:
        record["adapter"] = {"name": mcfg.adapter.name, **adapter_record(spec)}
        record["base"] = base
    return record


def check_same_base(where: Path | str, saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """An adapter checkpoint only means something on the base it trained on."""
    old = (saved or {}).get("base")
    new = now.get("base")
    if not old or not new or old["fingerprint"] == new["fingerprint"]:
        if old and new and old.get("name_or_path") != new.get("name_or_path"):
            log.warning("%s: the base moved from %s to %s (same fingerprint)", where, old.get("name_or_path"),
                        new.get("name_or_path"))
        return
    raise CheckpointError(f"{where} holds adapters trained on another base model: trained on {describe_base(old)}, "
                          f"this base is {describe_base(new)}; point model.name_or_path at the base it was trained on")


def adapter_record(spec: LoRASpec) -> dict[str, Any]:
    out = dict(vars(spec))
    out["target_modules"] = list(spec.target_modules)
    return out


# ---- weights ------------------------------------------------------------------------------
def _load_pretrained(mcfg: DictConfig, task: Task, device: torch.device | str = "cpu") -> Gemma2Classifier:
    path = pretrained_dir(mcfg)
    overrides = _pretrained_overrides(mcfg, task)
    try:
        model = load_pretrained(path, dtype=to_dtype(mcfg.dtype), device=device, **overrides)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"model.name_or_path={path}: {e}") from e
    return model.train()


def apply_adapters(model: Gemma2Classifier, cfg: DictConfig, device: torch.device | str | None = None
                   ) -> Gemma2Classifier:
    """LoRA / QLoRA per ``model.adapter`` (after the base weights exist, before parallelize);
    full fine-tuning: the model as it is. QLoRA quantises on ``device``."""
    spec = LoRASpec.from_config(cfg.model.adapter)
    if spec is None:
        return model
    try:
        return apply_lora(model, spec, seed=int(cfg.trainer.seed), device=device)
    except ValueError as e:
        raise ConfigError(f"model.adapter: {e}") from e


def _broadcast_weights(model: Gemma2Classifier, info: DistInfo) -> None:
    """Every rank gets rank 0's weights, one tensor at a time, as full tensors on its device
    (QLoRA over several ranks: each rank quantises full weights identically before sharding;
    NF4 tensors cannot go through set_model_state_dict's broadcast)."""
    import torch.distributed as dist

    if not info.is_main:
        model.to_empty(device=info.device)
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def build_model(cfg: DictConfig, task: Task, info: DistInfo, mesh
                ) -> tuple[Gemma2Classifier, ModelArgs, dict[str, Any] | None]:
    """The FSDP2-sharded training model on this rank's device, its architecture, and (adapter
    runs) the record of its base: path and fingerprint."""
    mcfg, pcfg = cfg.model, cfg.parallel
    args = model_args(mcfg, task)
    dtype = to_dtype(mcfg.dtype)
    adapter = mcfg.adapter.name
    full_state: dict[str, torch.Tensor] | None = None
    base = None
    if not mcfg.name_or_path:
        # From scratch on a GPU: initialise there (a CPU pass over every weight of a 2B model takes
        # tens of seconds). Every rank draws the same weights: same seed, same device type.
        with torch.device("cuda" if info.device.type == "cuda" else "cpu"):
            model = Gemma2Classifier(args)
        model = model.to(dtype).to(info.device)
    elif info.world_size == 1:
        # QLoRA: read on the host, quantise weight by weight onto the device (a 9B base never
        # sits on a 24 GB GPU in bf16)
        model = _load_pretrained(mcfg, task, "cpu" if adapter == "qlora" else info.device)
    elif adapter == "qlora":
        if info.is_main:
            model = _load_pretrained(mcfg, task, info.device)
        else:
            with torch.device("meta"):
                model = Gemma2Classifier(args).to(dtype)
        _broadcast_weights(model, info)
    elif info.is_main:
        model = _load_pretrained(mcfg, task)  # on the host until its state is taken below
        full_state = {}
    else:
        with torch.device("meta"):
            model = Gemma2Classifier(args).to(dtype)
        full_state = {}
    if adapter != "none":
        # the base, fingerprinted before the adapters exist (rank 0's view, the same everywhere)
        base = broadcast_object(base_record(mcfg.name_or_path, model, cfg.trainer.seed) if info.is_main else None)
    model = apply_adapters(model, cfg, info.device if full_state is None else None)
    if full_state is not None and info.is_main:  # after the adapters: rank 0 broadcasts them too
        full_state = {k: v.detach() for k, v in model.state_dict().items()}
        model = model.to(info.device)
    attn, rope = model.select_kernels(info.device, to_dtype(pcfg.param_dtype))
    log.info("model: %d layers, hidden %d, %d labels, %s weights; attention %s, rope %s%s", args.num_hidden_layers,
             args.hidden_size, args.num_labels, mcfg.dtype, attn, rope,
             f"; from {mcfg.name_or_path}" if mcfg.name_or_path else " (from scratch)")
    if adapter != "none":
        counts, spec = trainable_summary(model), LoRASpec.from_config(mcfg.adapter)
        log.info("adapter %s (rank %d, alpha %g, targets %s): %d trainable of %d parameters (%.2f%%); base %s",
                 adapter, spec.rank, spec.alpha, ",".join(spec.target_modules), counts["trainable"], counts["total"],
                 100 * counts["trainable"] / counts["total"], describe_base(base))
    model = parallelize(model, mesh, activation_checkpointing=mcfg.activation_checkpointing, compile=mcfg.compile,
                        compile_backend=mcfg.compile_backend,
                        param_dtype=pcfg.param_dtype, reduce_dtype=pcfg.reduce_dtype,
                        reshard_after_forward=pcfg.reshard_after_forward, cpu_offload=pcfg.cpu_offload)
    if full_state is not None:  # pretrained over several ranks: rank 0's weights into every rank's shards
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if not info.is_main:
            model.to_empty(device=info.device)
        set_model_state_dict(model, full_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model.train(), args, base


# ---- inference ----------------------------------------------------------------------------
def recorded_args(state: Mapping[str, Any], cfg: DictConfig, task: Task, overrides: list[str], where: str
                  ) -> ModelArgs:
    """The architecture a checkpoint trained, with the config's runtime choices. ``overrides``
    (the user's key=value list) may not contradict it."""
    record = state.get("model")
    if record is None:  # written before architectures were recorded: the config trained it
        return model_args(cfg.model, task)
    arch = dict(record["architecture"])
    for item in overrides:
        key, _, _ = item.lstrip("+").partition("=")
        name = key.removeprefix("model.")
        if key.startswith("model.") and name in arch and OmegaConf.select(cfg, key) != arch[name]:
            raise ConfigError(f"override {key}={OmegaConf.select(cfg, key)!r} contradicts {where}, which was trained "
                              f"with {name}={arch[name]!r}; drop the override (the checkpoint's architecture is used)")
    return ModelArgs(**arch, **{k: cfg.model[k] for k in RUNTIME_FIELDS})


def _check_keys(model: torch.nn.Module, ckpt: Path, names: set[str]) -> None:
    """Every model tensor of ``names`` in the checkpoint with its shape, and no other model tensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {k.removeprefix("model."): tuple(m.size)
             for k, m in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k in names}
    missing, extra = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    wrong = {k: (saved[k], want[k]) for k in want.keys() & saved.keys() if saved[k] != want[k]}
    if missing or extra or wrong:
        raise CheckpointError(f"{ckpt}: the checkpoint does not hold this model's tensors: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, shape (saved, model) {dict(list(wrong.items())[:5])}")


def _base_for_adapter(record: Mapping[str, Any], args: ModelArgs, cfg: DictConfig, where: str,
                      device: torch.device | str) -> Gemma2Classifier:
    """The frozen base an adapter checkpoint was trained on, rebuilt and fingerprint-checked."""
    dtype = to_dtype(cfg.model.dtype)
    saved = record["base"]
    path = cfg.model.name_or_path  # the recorded path, or the user's override (a moved copy)
    if path:
        arch = {k: v for k, v in args.architecture().items() if k != "head"}
        try:
            model = load_pretrained(pretrained_dir(cfg.model), head=args.head, dtype=dtype, device="cpu", **arch,
                                    **{k: getattr(args, k) for k in RUNTIME_FIELDS})
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"model.name_or_path={path}: {e}") from e
    else:
        torch.manual_seed(int(saved["seed"]))  # the training run's seeded init (on the host)
        model = Gemma2Classifier(args).to(dtype)
    check_same_base(where, record, {"base": base_record(path, model, saved.get("seed"))})
    return model


def recorded_spec(record: Mapping[str, Any]) -> LoRASpec:
    adapter = {k: v for k, v in record["adapter"].items() if k != "name"}
    return LoRASpec(**{**adapter, "target_modules": tuple(adapter["target_modules"])})


def adapter_model(record: Mapping[str, Any], args: ModelArgs, cfg: DictConfig, where: str,
                  device: torch.device | str = "cpu", spec: LoRASpec | None = None) -> Gemma2Classifier:
    """An adapter run's model before its trained tensors are filled in: the recorded base,
    rebuilt and fingerprint-checked, with fresh adapters (QLoRA: the base quantised as when it
    trained)."""
    spec = spec or recorded_spec(record)
    model = _base_for_adapter(record, args, cfg, where, device)
    return apply_lora(model, spec, seed=int(record["base"].get("seed") or 0), device=device)


def load_for_inference(ckpt: Path, state: Mapping[str, Any], cfg: DictConfig, task: Task,
                       overrides: list[str] = (), device: torch.device | str = "cpu") -> Gemma2Classifier:
    """The trained model, unsharded, on one device, in eval mode: built on the meta device from
    the recorded architecture, allocated once and filled strictly from the DCP shards (DCP
    reshards, so any number of training ranks loads on one process). An adapter checkpoint: the
    recorded base, rebuilt (fingerprint checked), with the adapters and head from the shards."""
    from .checkpoint import SafeLoadPlanner

    args = recorded_args(state, cfg, task, list(overrides), str(ckpt))
    dtype = to_dtype(cfg.model.dtype)
    record = state.get("model") or {}
    if record.get("adapter"):
        model = adapter_model(record, args, cfg, str(ckpt), device)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
    else:
        with torch.device("meta"):
            model = Gemma2Classifier(args).to(dtype)
        model = model.to_empty(device=device)
        names = set(model.state_dict())
    _check_keys(model, ckpt, names)
    sd = {"model": {k: v for k, v in model.state_dict().items() if k in names}}
    dcp.load(sd, checkpoint_id=str(ckpt), planner=SafeLoadPlanner(allow_partial_load=False))
    result = model.load_state_dict(sd["model"], strict=False)
    assert not result.unexpected_keys and not set(result.missing_keys) & names, result
    model.select_kernels(device, dtype)
    return model.eval()
