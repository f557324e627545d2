"""Real-width rehearsal: a gemma-2-2b-width checkpoint (2 layers, 256k vocabulary) that
transformers wrote as sharded safetensors + index is fine-tuned for 2 steps on 2 gloo ranks in
bf16 (weights, compute and gradients) with AnyPrecisionAdamW + Kahan (bf16 moments and
compensation), exported (streamed into bf16 shards + index), and loaded back by transformers:
its fp32 logits equal ours, and the exported tensors are the checkpoint's, bit for bit. What the
ranks held (memory.json) is checked against the planner, as tests/test_planner_realwidth.py does
for 1 rank.

Short text-classification rows (3 classes, <= 32 tokens) keep the bf16 CPU matmuls cheap. Each
rank peaks near 7.6 GB (planned: 6.9; gloo copies the gathered 1.1 GiB embedding around its
collectives), so the two ranks need ~15 GB of host memory, and the run ~9 GB of disk (base,
checkpoint with bf16 moments and compensation, export), removed when the test passes.
"""

from __future__ import annotations

import json

import pytest
import torch

import dist_helpers as h
import scratch
import text_data
from memory_check import assert_planned_memory_matches

pytestmark = [pytest.mark.slow, pytest.mark.realwidth]

WIDTH = dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
             query_pre_attn_scalar=256, num_hidden_layers=2, vocab_size=256000, sliding_window=4096)


@pytest.fixture(scope="module")
def base(request, tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    path = scratch.module_dir(request, tmp_path_factory, "gemma2-2b-width")
    torch.manual_seed(0)
    config = Gemma2Config(**WIDTH, num_labels=3, pad_token_id=0)
    model = Gemma2ForSequenceClassification(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="400MB")
    del model
    return path


def test_two_rank_bf16_finetune_exports_what_transformers_reads(base, tmp_path):
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # transformers wrote shards + index
    run_dir = tmp_path / "run"
    train = text_data.write(tmp_path / "train.csv", text_data.rows(8, seed=0, classes=text_data.CLASSES[:3]))
    overrides = [f"model.name_or_path={base}", "model.head=linear", "model.dtype=bfloat16",
                 "parallel.param_dtype=bfloat16", "parallel.reduce_dtype=bfloat16",
                 "optim.use_kahan_summation=true", "optim.momentum_dtype=bfloat16",
                 "optim.variance_dtype=bfloat16", "model.query_pre_attn_scalar=null",
                 "data/task=text_classification", f"data.train_path={train}", "data.limit_train_rows=null",
                 "data.max_length=32", "data.max_tokens=64", "data.global_batch_rows=4",
                 "trainer.max_steps=2", "checkpoint.every_steps=null", "optim.lr=1e-4"]
    h.run(run_dir, 2, overrides, timeout=600)
    losses = h.losses(run_dir)
    assert sorted(losses) == [1, 2] and all(map(lambda x: x == x, losses.values()))
    # what the 2 ranks held is what the planner said (its 2-rank check, tests/test_planner_realwidth.py)
    assert_planned_memory_matches(run_dir, overrides, 2)

    from launch.export import main as export_main

    out = export_main([f"checkpoint={run_dir}", f"out={tmp_path / 'export'}", "shard_gb=0.4"])
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()

    # the exported tensors are the checkpoint's, bf16 as trained
    from safetensors import safe_open

    trained = h.load_weights(h.latest_checkpoint(run_dir))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "score.weight"):
        with safe_open(out / weight_map[key], framework="pt") as f:
            t = f.get_tensor(key)
        ours = trained["model." + (key.removeprefix("model.") if key != "score.weight" else "head.weight")]
        assert t.dtype == torch.bfloat16 and torch.equal(t, ours), key
    with safe_open(base / json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][
            "model.layers.1.mlp.down_proj.weight"], framework="pt") as f:
        base_w = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert not torch.equal(base_w, trained["model.layers.1.mlp.down_proj.weight"])  # it trained

    # transformers and our loader read the export; fp32 logits agree
    from transformers import Gemma2ForSequenceClassification

    from trainer.model.hf_io import load_pretrained
    from trainer.model.testing import pack

    hf = Gemma2ForSequenceClassification.from_pretrained(out, torch_dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    ours_model = load_pretrained(out, dtype=torch.float32, attn_impl="reference").eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 256000, (n,), generator=g) for n in (7, 21)]
    with torch.no_grad():
        want = torch.cat([hf(input_ids=s[None], use_cache=False).logits for s in seqs])
        got = ours_model(**pack(seqs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
