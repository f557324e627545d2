"""Export a training checkpoint as a consolidated Hugging Face-style directory.

    python -m launch.export checkpoint=runs/NAME[/checkpoints/step-N] out=DIR [config overrides]

Writes DIR/model.safetensors + config.json (loadable by trainer.model.hf_io.load_pretrained,
and by transformers' Gemma2ForSequenceClassification for the linear head; id2label holds the
task's classes) and the tokenizer files. The model is rebuilt from the architecture the
checkpoint recorded, strictly. Runs on one CPU process whatever the number of ranks that wrote
the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from launch.cli import entry_point, parse_key_values, require
from trainer.consolidate import checkpoint_metadata, open_trained
from trainer.model.hf_io import save_pretrained

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
USAGE = "python -m launch.export checkpoint=PATH out=DIR [overrides]"


def export(checkpoint: str, out: str, overrides: list[str] | None = None) -> Path:
    trained = open_trained(checkpoint, overrides)
    cfg, ckpt = trained.cfg, trained.checkpoint
    model = trained.load_model()
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, labels=trained.task.output_columns)
    tok_dir = Path(cfg.data.tokenizer_path)
    for name in TOKENIZER_FILES:  # Gemma Terms of Use apply to the tokenizer files
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, tmp / name)
    (tmp / "arena_trainer.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), **checkpoint_metadata(ckpt), "task": trained.task.record(),
         "prompt_layout": cfg.data.prompt_layout, "max_length": cfg.data.max_length}, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _main(argv: list[str]) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own, overrides = parse_key_values(argv, ("checkpoint", "out"), USAGE)
    require(own, ("checkpoint", "out"), USAGE)
    out = export(own["checkpoint"], own["out"], overrides)
    print(f"exported to {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    return entry_point(_main, argv)


if __name__ == "__main__":
    main()
