"""A LoRA run on a base directory that transformers wrote, exported in PEFT's format: peft +
transformers load it and give the project's logits (fp32, linear head); the merged export
equals the adapter forward; the model card has the Hub's front matter; predict scores an
export exactly as it scores the run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml

import scratch
from launch.export import main as export_main
from launch.predict import main as predict_main
from launch.train import main as train_main
from trainer.consolidate import open_trained
from trainer.model.testing import pack

EVAL_CSV = "../shared/fixtures/arena/eval.csv"


@pytest.fixture(scope="module")
def lora_run(request, tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    root = scratch.module_dir(request, tmp_path_factory, "peft")
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=256000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                          sliding_window=128, num_labels=3, pad_token_id=0, torch_dtype="float32")
    Gemma2ForSequenceClassification(config).save_pretrained(root / "base")
    Gemma2ForSequenceClassification(config).save_pretrained(root / "other-base")  # same shapes, other weights
    train_main(["+experiment=cpu_demo_lora", f"model.name_or_path={root / 'base'}", "model.head=linear",
                "model.query_pre_attn_scalar=null", "model.adapter.rank=4", "model.adapter.dropout=0.05",
                "data.limit_train_rows=24", "data.eval_path=null", "data.global_batch_rows=8", "optim.lr=1e-2",
                "logging.progress_bar=false", f"trainer.run_dir={root / 'run'}"])
    return root


def _seqs(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256000, (int(k),), generator=g) for k in (9, 30, 17, 5)[:n]]


def _hf_logits(model, seqs) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=s[None], use_cache=False).logits.float() for s in seqs])


def test_peft_loads_the_adapter_and_gives_the_project_logits(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import Gemma2ForSequenceClassification

    out = export_main([f"checkpoint={lora_run / 'run'}", f"out={tmp_path / 'adapter'}"])
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "arena_trainer.json",
            "tokenizer.model"} <= {p.name for p in out.iterdir()}
    ours = open_trained(lora_run / "run").load_model()
    trained_b = ours.layers[1].mlp.down_proj.lora_B.weight
    assert trained_b.abs().max() > 1e-4  # the adapters trained: the comparison below means something
    seqs = _seqs()
    with torch.no_grad():
        want = ours(**pack(seqs))

    base = Gemma2ForSequenceClassification.from_pretrained(lora_run / "base", attn_implementation="eager")
    plain = _hf_logits(base.eval(), seqs)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    got = _hf_logits(peft_model, seqs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (plain - want).abs().max() > 1e-3  # without the adapter (and trained head) it differs

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(lora_run / "base") and front["library_name"] == "peft"
    assert front["pipeline_tag"] == "text-classification" and front["license"] == "gemma"
    assert "python -m launch.train +experiment=cpu_demo_lora" in card and "Gemma Terms of Use" in card


def test_merged_export_equals_the_adapter_forward(lora_run, tmp_path):
    from transformers import Gemma2ForSequenceClassification

    out = export_main([f"checkpoint={lora_run / 'run'}", f"out={tmp_path / 'merged'}", "merge=true"])
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = Gemma2ForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    seqs = _seqs()
    with torch.no_grad():
        want = open_trained(lora_run / "run").load_model()(**pack(seqs))
    torch.testing.assert_close(_hf_logits(merged, seqs), want, rtol=1e-5, atol=1e-5)
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["library_name"] == "transformers"


def _rows(path) -> np.ndarray:
    with open(path) as f:
        return np.array([[float(r[c]) for c in ("winner_model_a", "winner_model_b", "winner_tie")]
                         for r in csv.DictReader(f)])


def test_predict_scores_an_exported_adapter_as_it_scores_the_run(lora_run, tmp_path, repo_dir, capsys):
    out = export_main([f"checkpoint={lora_run / 'run'}", f"out={tmp_path / 'adapter'}"])
    test = [f"data.test_path={repo_dir / EVAL_CSV}", "data.limit_eval_rows=null"]
    from_run = predict_main([f"checkpoint={lora_run / 'run'}", *test, f"out={tmp_path / 'run.csv'}"])
    from_export = predict_main([f"checkpoint={out}", *test, f"out={tmp_path / 'export.csv'}"])
    assert from_export["rows"] == from_run["rows"] > 0
    np.testing.assert_allclose(_rows(tmp_path / "export.csv"), _rows(tmp_path / "run.csv"), atol=1e-6)
    # model.name_or_path may point at a moved base, but another base is refused (one line, exit 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        predict_main([f"checkpoint={out}", *test, f"out={tmp_path / 'x.csv'}",
                      f"model.name_or_path={lora_run / 'other-base'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "adapters trained on another base model" in err and "Traceback" not in err
