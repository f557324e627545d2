"""transformers-compatible Gemma 2 checkpoints (safetensors only; pickles are refused).

Key layout (ours -> file):
  embed_tokens / layers.* / norm   ->  model.<same name>   (Gemma2Model files: no "model." prefix, also read)
  linear head  head.weight         ->  score.weight        (Gemma2ForSequenceClassification)
  mlp head     head.fc{1,2}.{weight,bias} -> head.fc{1,2}.{weight,bias}   (ours; transformers ignores them)
  lm_head.weight (Gemma2ForCausalLM) is ignored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .args import ModelArgs
from .gemma2 import Gemma2Classifier

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
IGNORED_PREFIXES = ("lm_head.",)


def _hf_name(name: str, head: str) -> str:
    if name.startswith("head."):
        return "score.weight" if head == "linear" else name
    return "model." + name


def parameter_name_map(model_or_args: nn.Module | ModelArgs) -> dict[str, str]:
    """Our parameter name -> the name written to / expected in a transformers checkpoint."""
    if isinstance(model_or_args, ModelArgs):
        with torch.device("meta"):
            model_or_args = Gemma2Classifier(model_or_args)
    head = model_or_args.args.head
    return {n: _hf_name(n, head) for n, _ in model_or_args.named_parameters()}


def match_checkpoint_keys(name_map: dict[str, str], ckpt_keys) -> tuple[dict[str, str], list[str], list[str]]:
    """Match our parameters to checkpoint keys, with or without the "model." prefix.
    Returns (ours -> checkpoint key, our names not found, checkpoint keys left over (lm_head excluded))."""
    keys = set(ckpt_keys)
    found, missing = {}, []
    for ours, hf in name_map.items():
        for cand in (hf, hf.removeprefix("model.")):
            if cand in keys:
                found[ours] = cand
                break
        else:
            missing.append(ours)
    used = set(found.values())
    unexpected = sorted(k for k in keys - used if not k.startswith(IGNORED_PREFIXES))
    return found, missing, unexpected


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Checkpoint key -> safetensors file holding it (reads headers only)."""
    index = path / SAFE_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    files = [path / SAFE_WEIGHTS] if (path / SAFE_WEIGHTS).exists() else sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{path} holds only pickle checkpoint(s) {pickles}; refusing to unpickle (arbitrary code "
                "execution). Convert to safetensors first (e.g. load and `save_pretrained(safe_serialization=True)` "
                "in a trusted environment)."
            )
        raise FileNotFoundError(f"no {SAFE_WEIGHTS} or {SAFE_INDEX} in {path}")
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def pretrained_args(path, head: str | None = None, **arg_overrides) -> ModelArgs:
    """The ModelArgs of a transformers Gemma 2 directory (config.json) with overrides.
    head=None takes the head recorded by our save_pretrained, else "mlp"."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'} not found")
    cfg = json.loads((path / "config.json").read_text())
    return ModelArgs.from_hf_config(cfg, head=head or cfg.get("arena_head", "mlp"), **arg_overrides)


def pretrained_labels(path) -> list[str] | None:
    """id2label of a directory's config.json, in class order (None when it has none)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    id2label = cfg.get("id2label")
    return None if not id2label else [id2label[k] for k in sorted(id2label, key=int)]


def load_pretrained(path, head: str | None = None, *, dtype=None, device="cpu", **arg_overrides) -> Gemma2Classifier:
    """Build on the meta device, then allocate once and fill tensor by tensor from safetensors.
    head=None takes the head recorded by our save_pretrained, else "mlp". Returns the model in eval mode."""
    path = Path(path)
    args = pretrained_args(path, head, **arg_overrides)
    key_file = _checkpoint_files(path)

    with torch.device("meta"):
        model = Gemma2Classifier(args)
    if dtype is not None:
        model.to(dtype)  # still meta: free
    found, missing, unexpected = match_checkpoint_keys(parameter_name_map(model), key_file)
    missing_body = [n for n in missing if not n.startswith("head.")]
    if missing_body:
        raise KeyError(f"checkpoint {path} lacks {len(missing_body)} tensor(s) for {missing_body[:10]}")
    if unexpected:
        logger.warning("checkpoint %s: %d tensor(s) not used: %s", path, len(unexpected), unexpected[:10])

    params = dict(model.named_parameters())  # meta: shapes only
    by_file: dict[Path, list[str]] = {}
    for ours, key in found.items():
        by_file.setdefault(key_file[key], []).append(ours)
    # shapes first (headers only), so a mismatch fails before any allocation
    for f, names in by_file.items():
        with safe_open(f, framework="pt") as fh:
            for ours in names:
                shape = tuple(fh.get_slice(found[ours]).get_shape())
                if shape != tuple(params[ours].shape):
                    raise ValueError(
                        f"shape mismatch for {found[ours]!r} in {f.name}: checkpoint {shape}, "
                        f"model expects {tuple(params[ours].shape)} (parameter {ours!r})"
                    )

    model.to_empty(device=device)
    params = dict(model.named_parameters())  # to_empty swapped in new Parameters
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(f, framework="pt", device="cpu") as fh:
                for ours in names:
                    params[ours].copy_(fh.get_tensor(found[ours]))  # one tensor in memory at a time
    if any(n.startswith("head.") for n in missing):
        model.init_head()
        logger.info("checkpoint %s has no %s head weights: head initialised fresh", path, args.head)
    return model.eval()


def shard_names(n_shards: int) -> list[str]:
    """transformers' file names: model.safetensors alone, else model-0000i-of-0000n.safetensors."""
    if n_shards == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def plan_shards(sizes: dict[str, int], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Keys in order, cut into groups of at most ``max_bytes`` (a larger tensor gets a group of
    its own), as transformers' ``save_pretrained`` cuts them."""
    groups: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    return groups


def write_sharded(path: Path, groups: list[list[str]], read_group, total_bytes: int) -> None:
    """Write each group's tensors (``read_group(keys) -> {key: tensor}``, called one group at a
    time, so only one shard is in host memory) and, for several shards, the index."""
    names = shard_names(len(groups))
    weight_map = {}
    for name, keys in zip(names, groups):
        tensors = read_group(keys)
        save_file({k: tensors[k].contiguous() for k in keys}, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    (path / SAFE_INDEX).unlink(missing_ok=True)  # a stale index would shadow a single new file
    if len(names) > 1:
        (path / SAFE_WEIGHTS).unlink(missing_ok=True)
        (path / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
                                                  indent=2) + "\n")
    for stale in path.glob("model-*-of-*.safetensors"):
        if stale.name not in names:
            stale.unlink()


def save_pretrained(model: nn.Module, path, labels=None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the weights (in their dtype; shards of at most ``max_shard_bytes`` + index, as
    transformers does) and config.json, loadable by transformers' Gemma2ForSequenceClassification
    (linear head; an mlp-head file loads there with a freshly initialised `score`). ``labels``:
    the task's output column per class, written as id2label."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    name_map = parameter_name_map(model)
    params = dict(model.named_parameters())
    sizes = {name_map[n]: p.numel() * p.element_size() for n, p in params.items()}
    by_hf = {name_map[n]: n for n in params}

    def read(keys):
        out = {}
        for k in keys:
            t = params[by_hf[k]].detach()
            if hasattr(t, "full_tensor"):  # FSDP2 DTensor: gather (every rank must call)
                t = t.full_tensor()
            out[k] = t.cpu()
        return out

    write_sharded(path, plan_shards(sizes, max_shard_bytes), read, sum(sizes.values()))
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(model.args.to_hf_config(dtype=dtype, labels=labels), indent=2) + "\n")
