"""The model card (README.md) every export carries, so the folder can go to the Hub as it is.

YAML front matter as the Hub reads it (base_model, library_name, pipeline_tag, license, tags),
then what was trained, how, the final evaluation and the command that trained it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LICENSE_NOTICE = ("Gemma 2 weights and the tokenizer are provided under the Gemma Terms of Use "
                  "(https://ai.google.dev/gemma/terms); a model derived from them is subject to those terms.")


def final_metrics(ckpt: Path, step: int) -> dict[str, float] | None:
    """The run's final evaluation (``result.json``) when it was taken at this checkpoint's step."""
    result = Path(ckpt).parent.parent / "result.json"
    try:
        data = json.loads(result.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("steps") != step:
        return None
    return {k.removeprefix("eval_"): v for k, v in data.items()
            if k.startswith("eval_") and isinstance(v, (int, float))}


def _yaml_value(v: Any) -> str:
    return json.dumps(v)  # JSON scalars and lists are valid YAML flow values


def model_card(*, kind: str, base: str | None, experiment: str, task: dict[str, Any], step: int,
               metrics: dict[str, float] | None, command: str | None, adapter: dict[str, Any] | None,
               files: list[str]) -> str:
    """``kind``: "adapter" (PEFT), "merged" or "full" (transformers' layout)."""
    library = "peft" if kind == "adapter" else "transformers"
    tags = ["arena-trainer", "gemma2", "text-classification", "packed-sequences"]
    if adapter:
        tags.append(adapter.get("name", "lora"))
    front = {"library_name": library, "pipeline_tag": "text-classification", "license": "gemma", "tags": tags}
    if base:
        front = {"base_model": base, **front}
    lines = ["---", *(f"{k}: {_yaml_value(v)}" for k, v in front.items()), "---", "",
             f"# {experiment}: {task.get('name', 'arena')} classifier", ""]
    how = {"adapter": "a LoRA adapter in PEFT's format (load it over the base model with peft)",
           "merged": "the base model with the LoRA adapter merged into its weights (transformers' layout)",
           "full": "fully fine-tuned weights (transformers' layout)"}[kind]
    lines += [f"This folder holds {how}, trained with arena-trainer and exported at step {step}.", ""]
    lines += [f"- Base model: {base or 'none (trained from scratch)'}",
              f"- Classes: {', '.join(task.get('class_names', []))}"]
    if adapter:
        lines.append(f"- Adapter: {adapter.get('name')} rank {adapter.get('rank')}, alpha {adapter.get('alpha')}, "
                     f"dropout {adapter.get('dropout')}, rsLoRA {adapter.get('use_rslora')}, targets "
                     f"{', '.join(adapter.get('target_modules', []))}"
                     + ("; base weights NF4 while training" if adapter.get("quantize_base") else ""))
    lines += [f"- Files: {', '.join(sorted(files))}", "", "## Evaluation", ""]
    if metrics:
        rows = [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
        lines += ["| metric | value |", "| --- | --- |", *rows, ""]
    else:
        lines += [f"No final evaluation was recorded for step {step}.", ""]
    lines += ["## Training command", "", "```", command or "(not recorded)", "```", ""]
    if kind == "adapter" and not base:
        lines += ["## Use", "", "The base was a seeded from-scratch init, not a published model: export with "
                  "merge=true for weights that stand alone.", ""]
    elif kind == "adapter":
        lines += ["## Use", "", "```python", "from peft import PeftModel",
                  "from transformers import Gemma2ForSequenceClassification", "",
                  f"base = Gemma2ForSequenceClassification.from_pretrained({base!r}, num_labels="
                  f"{len(task.get('class_names', [])) or 3})",
                  "model = PeftModel.from_pretrained(base, 'THIS_FOLDER')", "```", ""]
    lines += ["## License", "", LICENSE_NOTICE, ""]
    return "\n".join(lines)
