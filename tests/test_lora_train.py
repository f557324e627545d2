"""LoRA / QLoRA training runs on one process (in-process, gloo): the CPU twins learn, only the
adapters and the head move, checkpoints hold only what trains, and a checkpoint refuses a base
it was not trained on."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dist_helpers as h
from trainer.adapters import nf4
from trainer.checkpoint import verify_checkpoint
from trainer.config import compose
from trainer.distributed import destroy_distributed
from trainer.errors import CheckpointError
from trainer.model import Gemma2Classifier
from trainer.model.hf_io import save_pretrained
from trainer.train import Trainer, run

# 32 rows, 8 per step: 4 steps an epoch, 4 epochs.
SMALL = ["data.limit_train_rows=32", "data.eval_path=null", "data.global_batch_rows=8", "trainer.epochs=4",
         "checkpoint.every_steps=null", "logging.progress_bar=false", "trainer.resume=never"]


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.get_original_weight() if type(t).__name__ == "NF4Tensor" else t.clone()


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_cpu_demo_adapter_learns_and_moves_only_adapters_and_head(adapter, tmp_path):
    cfg = compose([f"+experiment=cpu_demo_{adapter}", *SMALL, f"trainer.run_dir={tmp_path}"])
    trainer, ok = Trainer(cfg), False
    try:
        model = trainer.model
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        before = {n: _full(p) for n, p in model.named_parameters()}
        result = trainer.fit()
        after = {n: _full(p) for n, p in model.named_parameters()}
        ok = True
    finally:
        trainer.close(failed=not ok)
        destroy_distributed(graceful=ok)
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.startswith("head.") for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    for name in before:
        if name in trainable:
            assert not torch.equal(before[name], after[name]), f"{name} did not move"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    if adapter == "qlora":
        assert nf4.is_nf4(model.layers[0].mlp.up_proj.weight)

    losses = [h.losses(tmp_path)[s] for s in range(1, 17)]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.1, losses  # the first epoch vs the fourth, over the same 32 rows

    # the checkpoint: every trainable tensor, nothing frozen, and a record of the base
    ckpt = result.checkpoint
    saved = {k.removeprefix("model.") for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
             if k.startswith("model.")}
    assert saved == trainable
    state = verify_checkpoint(ckpt)
    assert state["model"]["adapter"]["name"] == adapter and state["model"]["base"]["fingerprint"].startswith("init:")
    model_bytes = sum(t.numel() * t.element_size() for t in before.values())
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.iterdir())
    assert ckpt_bytes < 0.03 * model_bytes, (ckpt_bytes, model_bytes)
    log = (tmp_path / "train.log").read_text()
    assert "trainable of" in log and "memory per rank, MiB" in log


def _base_dir(path, seed: int):
    """A transformers-layout Gemma 2 base written by our save_pretrained (tiny, real vocab)."""
    from trainer.model import ModelArgs

    torch.manual_seed(seed)
    model = Gemma2Classifier(ModelArgs(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       query_pre_attn_scalar=16, sliding_window=128, head="linear", num_labels=3))
    save_pretrained(model, path)
    return path


def test_resume_refuses_another_base_and_accepts_a_moved_copy(tmp_path):
    base_a, base_b = _base_dir(tmp_path / "base-a", 0), _base_dir(tmp_path / "base-b", 1)
    common = ["+experiment=cpu_demo_lora", "data.limit_train_rows=16", "data.eval_path=null",
              "data.global_batch_rows=8", "logging.progress_bar=false", "checkpoint.every_steps=1",
              f"trainer.run_dir={tmp_path / 'run'}", "model.query_pre_attn_scalar=null"]
    first = run(compose([*common, f"model.name_or_path={base_a}", "trainer.max_steps=1"]))
    assert verify_checkpoint(first.checkpoint)["model"]["base"]["name_or_path"] == str(base_a)
    with pytest.raises(CheckpointError, match="adapters trained on another base model") as err:
        run(compose([*common, f"model.name_or_path={base_b}", "trainer.max_steps=2"]))
    assert str(base_a) in str(err.value) and str(base_b) in str(err.value)
    moved = shutil.copytree(base_a, tmp_path / "moved")  # same files elsewhere: the same base
    resumed = run(compose([*common, f"model.name_or_path={moved}", "trainer.max_steps=2"]))
    assert resumed.steps == 2 and resumed.checkpoint.name == "step-00000002"
