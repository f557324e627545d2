"""Load a sharded training checkpoint into one plain (unsharded) model on one process.

Used by export and predict. DCP reshards on load, so a checkpoint written by N ranks loads on
one CPU process without a process group. The run's resolved config travels inside the
checkpoint (trainer_state.json), so only the path is needed; key=value overrides may change
inference-time settings (attention backend, data paths).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointError, SafeLoadPlanner, find_latest, verify_checkpoint
from .config import Config, ConfigError, register_configs, validate
from .model import Gemma2Classifier

log = logging.getLogger(__name__)


def parse_cli(argv: list[str], special: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into the entry point's own keys and config overrides."""
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value, got {arg!r}")
        if key in special:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def resolve_checkpoint(path: str | Path) -> Path:
    """A step-N directory, or a run directory / checkpoints directory (its latest complete one)."""
    path = Path(path).expanduser()
    if (path / ".metadata").is_file():
        verify_checkpoint(path)
        return path
    for root in (path / "checkpoints", path):
        found, problems = find_latest(root)
        for p in problems:
            log.warning("checkpoint refused: %s", p)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint at {path}")


def checkpoint_config(ckpt: Path, overrides: list[str] | None = None) -> DictConfig:
    """The config the checkpoint was trained with (validated), with dotlist overrides applied."""
    register_configs()
    state = verify_checkpoint(ckpt)
    base = OmegaConf.structured(Config)
    cfg = OmegaConf.merge(base, OmegaConf.create(state["config"]))
    if overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        except Exception as e:  # noqa: BLE001 - OmegaConf names the key
            raise ConfigError(f"bad override {overrides}: {e}") from e
    validate(cfg)
    return cfg


def load_model_from_checkpoint(ckpt: Path, cfg: DictConfig, device: torch.device | str = "cpu") -> Gemma2Classifier:
    """Build the model on the meta device, allocate once, and fill it from the DCP shards."""
    from .train import model_args_from_config

    args = model_args_from_config(cfg.model)
    with torch.device("meta"):
        model = Gemma2Classifier(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    model = model.to(dtype).to_empty(device=device)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), planner=SafeLoadPlanner(allow_partial_load=True))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def checkpoint_metadata(ckpt: Path) -> dict[str, Any]:
    state = verify_checkpoint(ckpt)
    return {k: state[k] for k in ("step", "tokens_seen", "world_size", "saved_at") if k in state}
