"""LoRA and QLoRA are the same computation at every world size, and resume bitwise.

Real torchrun process groups on CPU (gloo), the tiny fp32 model of the engine tests (dropout 0,
4 steps of 8 rows). 1 vs 2 ranks for lora and qlora, and HSDP 2 x 2 on 4 processes for qlora
(NF4 weights sharded on the dp_shard dimension, replicated across the other): per-step losses,
gradient norms and the trained adapters and head (read from the final checkpoint) agree to
1e-5. QLoRA's scale blocks are 4 here (the tiny model's k_proj is 32 x 16: two blocks of 4 x 64
values, one per shard). A QLoRA run killed with SIGKILL resumes bitwise: its base is re-read
and re-quantised, its adapters, head, optimizer and RNG come from the checkpoint.
"""

from __future__ import annotations

import pytest

import dist_helpers as h
import scratch

pytestmark = pytest.mark.slow

STEPS = 4
COMMON = [f"trainer.max_steps={STEPS}", "model.adapter.rank=4", "model.adapter.dropout=0.0", "optim.lr=1e-2"]
ADAPTER = {"lora": ["model/adapter=lora"],
           "qlora": ["model/adapter=qlora", "model.adapter.nf4_scaler_block_size=4"]}
ATOL = 1e-5


def _compare(run_dir, ref_dir):
    ref_loss, loss = h.losses(ref_dir), h.losses(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1)) and loss.keys() == ref_loss.keys(), loss
    for s in ref_loss:
        assert loss[s] == pytest.approx(ref_loss[s], abs=ATOL), f"loss at step {s}"
    for s, g in h.grad_norms(ref_dir).items():
        assert h.grad_norms(run_dir)[s] == pytest.approx(g, rel=1e-5, abs=1e-6), f"grad_norm at step {s}"
    w_ref, w = h.load_weights(h.latest_checkpoint(ref_dir)), h.load_weights(h.latest_checkpoint(run_dir))
    assert set(w) == set(w_ref) and all(".lora_" in k or k.startswith("model.head.") for k in w)  # only what trains
    assert h.max_abs_diff(w, w_ref) < ATOL
    first = h.load_weights(h.checkpoints(ref_dir)[0])
    assert h.max_abs_diff(first, w_ref) > 50 * ATOL  # the last steps moved the adapters by far more


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_two_ranks_equal_one(adapter):
    overrides = [*COMMON, *ADAPTER[adapter]]
    _compare(h.shared_run(2, overrides), h.shared_run(1, overrides))


def test_qlora_hsdp_2x2_equals_one_process(tmp_path):
    overrides = [*COMMON, *ADAPTER["qlora"]]
    proc = h.run(tmp_path / "hsdp", 4, [*overrides, "parallel.dp_replicate=2"], timeout=300)
    assert "world size 4" in h.log_text(proc)
    _compare(tmp_path / "hsdp", h.shared_run(1, overrides))


def test_qlora_killed_resumes_bitwise(tmp_path):
    """Adapter dropout 0.1, so the restored RNG matters; killed once step 2 is committed."""
    overrides = [*COMMON, *ADAPTER["qlora"], "model.adapter.dropout=0.1"]
    reference = h.shared_run(1, overrides)
    run_dir = tmp_path / "run"
    proc = h.start(run_dir, 1, overrides)
    h.wait_for(lambda: (run_dir / "checkpoints" / "step-00000002").is_dir(), proc=proc, interval=0.005)
    h.kill_group(proc)
    proc = h.run(run_dir, 1, overrides)
    assert "resumed from" in h.log_text(proc)
    loss, ref_loss = h.losses(run_dir), h.losses(reference)
    assert loss == ref_loss
    h.assert_weights_equal(h.load_weights(h.latest_checkpoint(run_dir)), h.load_weights(h.latest_checkpoint(reference)))
    h.assert_weights_equal(h.load_weights(h.latest_checkpoint(run_dir), "optim."),
                           h.load_weights(h.latest_checkpoint(reference), "optim."))


@pytest.fixture(scope="module")
def base_dir(request, tmp_path_factory):
    """A transformers-layout base of the tiny model's shape (what model.name_or_path reads)."""
    import torch

    from trainer.model import Gemma2Classifier, ModelArgs
    from trainer.model.hf_io import save_pretrained

    torch.manual_seed(5)
    path = scratch.module_dir(request, tmp_path_factory, "base")
    save_pretrained(Gemma2Classifier(ModelArgs(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, query_pre_attn_scalar=16, sliding_window=128, num_labels=3)), path)
    return path


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_pretrained_base_two_ranks_equal_one(adapter, base_dir, tmp_path):
    """Over several ranks rank 0 reads the base: LoRA's adapters ride set_model_state_dict's
    broadcast; QLoRA's base is broadcast tensor by tensor and quantised on every rank."""
    overrides = [*COMMON, *ADAPTER[adapter], f"model.name_or_path={base_dir}", "model.query_pre_attn_scalar=null"]
    h.run(tmp_path / "one", 1, overrides)
    h.run(tmp_path / "two", 2, overrides)
    _compare(tmp_path / "two", tmp_path / "one")
    assert h.trainer_state(h.latest_checkpoint(tmp_path / "two"))["model"]["base"]["name_or_path"] == str(base_dir)
