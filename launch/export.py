"""Export a training checkpoint for transformers / peft / the Hub.

    python -m launch.export checkpoint=runs/NAME[/checkpoints/step-N] out=DIR [merge=true] [config overrides]

A full fine-tune: DIR/model.safetensors + config.json in transformers' layout (loadable by
trainer.model.hf_io.load_pretrained, and by transformers' Gemma2ForSequenceClassification for the
linear head; id2label holds the task's classes).

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
from trainer.consolidate import EXPORT_RECORD, checkpoint_metadata, open_trained

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
USAGE = "python -m launch.export checkpoint=PATH out=DIR [merge=true|false] [overrides]"


def export(checkpoint: str, out: str, overrides: list[str] | None = None, merge: bool = False) -> Path:
    from trainer.adapters import merge_lora
    from trainer.adapters.peft_format import save_adapter
    from trainer.build import recorded_spec
    from trainer.model.hf_io import save_pretrained
    from trainer.model_card import final_metrics, model_card

    trained = open_trained(checkpoint, overrides)
    cfg, ckpt, state = trained.cfg, trained.checkpoint, trained.state
    record = state.get("model") or {}
    adapter = record.get("adapter")
    model = trained.load_model()
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base = cfg.model.name_or_path
    if adapter and not merge:
        kind = "adapter"
        save_adapter(model, recorded_spec(record), tmp, base)
    else:
        kind = "merged" if adapter else "full"
        if adapter:
            merge_lora(model)
        save_pretrained(model, tmp, labels=trained.task.output_columns)
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
    own, overrides = parse_key_values(argv, ("checkpoint", "out", "merge"), USAGE)
    require(own, ("checkpoint", "out"), USAGE)
    merge = parse_bool("merge", own["merge"]) if "merge" in own else False
    out = export(own["checkpoint"], own["out"], overrides, merge=merge)
    print(f"exported to {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
