"""Export a training checkpoint for transformers / peft / the Hub.

    python -m launch.export checkpoint=runs/NAME[/checkpoints/step-N] out=DIR [merge=true] [shard_gb=5]
        [config overrides]

A full fine-tune: the weights in transformers' layout, in the dtype they trained in (bf16 stays
bf16), as safetensors shards of at most ``shard_gb`` GB with ``model.safetensors.index.json``
(one ``model.safetensors`` when it fits), + config.json (loadable by
trainer.model.hf_io.load_pretrained, and by transformers' Gemma2ForSequenceClassification for the
linear head; id2label holds the task's classes). Streamed from the DCP shards one output shard at
a time: host memory holds one shard, never the whole model.

A LoRA / QLoRA run: DIR/adapter_config.json + adapter_model.safetensors in PEFT's format (the
head as ``modules_to_save``), for ``PeftModel.from_pretrained(Gemma2ForSequenceClassification
.from_pretrained(base), DIR)``; ``merge=true`` writes the merged full weights in transformers'
layout instead (a QLoRA adapter is merged into the dequantised NF4 base it trained against).

Every export carries the tokenizer files, ``arena_trainer.json`` (task, prompt layout, the
training config and model record: ``launch.predict checkpoint=DIR`` scores from it) and a model
card (``README.md`` with the Hub's YAML front matter), so ``huggingface-cli upload`` takes the
folder as it is. Runs on one CPU process whatever the number of ranks that wrote the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from launch.cli import entry_point, parse_bool, parse_key_values, require
from trainer.consolidate import EXPORT_RECORD, ExportedModel, checkpoint_metadata, export_full_weights, open_trained
from trainer.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
USAGE = "python -m launch.export checkpoint=PATH out=DIR [merge=true|false] [shard_gb=5] [overrides]"


def export(checkpoint: str, out: str, overrides: list[str] | None = None, merge: bool = False,
           shard_gb: float = 5.0) -> Path:
    from trainer.adapters import merge_lora
    from trainer.adapters.peft_format import save_adapter
    from trainer.build import recorded_spec
    from trainer.model.hf_io import save_pretrained
    from trainer.model_card import final_metrics, model_card

    trained = open_trained(checkpoint, overrides)
    if isinstance(trained, ExportedModel):
        raise ConfigError(f"checkpoint={checkpoint} is an export already: export a run directory or a "
                          "checkpoints/step-N directory")
    cfg, ckpt, state = trained.cfg, trained.checkpoint, trained.state
    record = state.get("model") or {}
    adapter = record.get("adapter")
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base = cfg.model.name_or_path
    max_shard = int(shard_gb * 10**9)
    if adapter and not merge:
        kind = "adapter"
        save_adapter(trained.load_model(), recorded_spec(record), tmp, base)
    elif adapter:  # merged: the base (re-read) with the adapters folded in, in memory
        kind = "merged"
        save_pretrained(merge_lora(trained.load_model()), tmp, labels=trained.task.output_columns,
                        max_shard_bytes=max_shard)
    else:
        kind = "full"
        export_full_weights(trained, tmp, max_shard)
    tok_dir = Path(cfg.data.tokenizer_path)
    for name in TOKENIZER_FILES:  # Gemma Terms of Use apply to the tokenizer files
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, tmp / name)
    meta = checkpoint_metadata(ckpt)
    (tmp / EXPORT_RECORD).write_text(json.dumps(
        {"checkpoint": str(ckpt), **meta, "kind": kind, "task": trained.task.record(),
         "prompt_layout": cfg.data.prompt_layout, "max_length": cfg.data.max_length,
         "model": record, "config": state.get("config"), "command": state.get("command")}, indent=1) + "\n")
    files = [p.name for p in tmp.iterdir()] + ["README.md"]
    (tmp / "README.md").write_text(model_card(
        kind=kind, base=base, experiment=cfg.experiment, task=trained.task.record(), step=meta["step"],
        metrics=final_metrics(ckpt, meta["step"]), command=state.get("command"), adapter=adapter, files=files))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _main(argv: list[str]) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own, overrides = parse_key_values(argv, ("checkpoint", "out", "merge", "shard_gb"), USAGE)
    require(own, ("checkpoint", "out"), USAGE)
    merge = parse_bool("merge", own["merge"]) if "merge" in own else False
    try:
        shard_gb = float(own.get("shard_gb", 5))
    except ValueError:
        raise ConfigError(f"shard_gb={own['shard_gb']!r}: expected a number of GB (e.g. 5)") from None
    if shard_gb <= 0:
        raise ConfigError(f"shard_gb={shard_gb}: must be > 0")
    out = export(own["checkpoint"], own["out"], overrides, merge=merge, shard_gb=shard_gb)
    print(f"exported to {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
