"""Export a training checkpoint as a consolidated Hugging Face-style directory.

    python -m launch.export checkpoint=runs/NAME[/checkpoints/step-N] out=DIR [config overrides]

Writes DIR/model.safetensors + config.json (loadable by Gemma2Classifier.from_pretrained, and by
transformers' Gemma2ForSequenceClassification for the linear head) and the tokenizer files.
Runs on one CPU process whatever the number of ranks that wrote the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

from trainer.consolidate import (checkpoint_config, checkpoint_metadata, load_model_from_checkpoint, parse_cli,
                                 resolve_checkpoint)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export(checkpoint: str, out: str, overrides: list[str] | None = None) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, overrides)
    model = load_model_from_checkpoint(ckpt, cfg)
    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok_dir = Path(cfg.data.tokenizer_path)
    for name in TOKENIZER_FILES:  # Gemma Terms of Use apply to the tokenizer files
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, tmp / name)
    (tmp / "arena_trainer.json").write_text(json.dumps(
        {"checkpoint": str(ckpt), **checkpoint_metadata(ckpt), "prompt_layout": cfg.data.prompt_layout,
         "max_length": cfg.data.max_length}, indent=1) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    own, overrides = parse_cli(sys.argv[1:] if argv is None else argv, ("checkpoint", "out"))
    if "checkpoint" not in own or "out" not in own:
        raise SystemExit("usage: python -m launch.export checkpoint=PATH out=DIR [overrides]")
    out = export(own["checkpoint"], own["out"], overrides)
    print(f"exported to {out}")


if __name__ == "__main__":
    main()
