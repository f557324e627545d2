"""The planner: state bytes from the real FSDP2 sharding on a fake process group match the
analytic formula and what ranks really hold; the CLI says whether a job fits and why not."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from trainer.config import compose


def _plan(overrides):
    from trainer.planner import plan

    return plan(compose(overrides))


def _analytic_params(cfg, world: int) -> int:
    """Rank 0's parameter bytes from the architecture alone: every weight cut into
    ceil(rows / world) rows (FSDP2 pads dim 0)."""
    from trainer.build import model_args
    from trainer.tasks import ArenaTask

    a = model_args(cfg.model, ArenaTask())
    h, i, q, kv, v = a.hidden_size, a.intermediate_size, a.num_attention_heads * a.head_dim, \
        a.num_key_value_heads * a.head_dim, a.vocab_size
    shapes = [(v, h)] + a.num_hidden_layers * ([(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
                                              + 4 * [(h,)]) + [(h,)]
    mlp_head = [(h // 2, h), (h // 2,), (a.num_labels, h // 2), (a.num_labels,)]
    shapes += mlp_head if a.head == "mlp" else [(a.num_labels, h)]
    n = sum(math.ceil(s[0] / world) * (s[1] if len(s) > 1 else 1) for s in shapes)
    return n * 4 if cfg.model.dtype == "float32" else n * 2


@pytest.mark.parametrize("world", [1, 8, 64])
def test_full_finetune_state_bytes_match_the_analytic_formula(world):
    overrides = ["model=gemma2_2b", "model.dtype=bfloat16", f"plan.world_size={world}", "data.limit_train_rows=64"]
    p = _plan(overrides)
    cfg = compose(overrides)
    want = _analytic_params(cfg, world)
    assert p.per_device["params_bytes"] == want
    assert p.per_device["grads_bytes"] == want  # every weight trains, grads in the weight dtype
    # AnyPrecisionAdamW: bf16 momentum + bf16 variance + bf16 Kahan compensation per element
    assert p.per_device["optimizer_bytes"] == 3 * want
    assert p.world_size == world and p.mesh == [world]


def test_adapters_plan_their_trainable_share_and_the_nf4_base():
    lora = _plan(["model=gemma2_2b", "model/adapter=lora", "model.adapter.rank=16", "plan.world_size=8",
                  "data.limit_train_rows=64"])
    qlora = _plan(["model=gemma2_2b", "model/adapter=qlora", "model.adapter.rank=16", "plan.world_size=8",
                   "data.limit_train_rows=64"])
    a = lora.architecture
    per_layer = 16 * sum(i + o for i, o in [(a["hidden_size"], a["num_attention_heads"] * a["head_dim"])] * 2
                         + [(a["hidden_size"], a["num_key_value_heads"] * a["head_dim"])] * 2
                         + [(a["hidden_size"], a["intermediate_size"])] * 3)
    head = a["hidden_size"] * (a["hidden_size"] // 2) + a["hidden_size"] // 2 + (a["hidden_size"] // 2) * 3 + 3
    assert lora.trainable_params == qlora.trainable_params == a["num_hidden_layers"] * per_layer + head
    assert lora.per_device["optimizer_bytes"] < 0.05 * lora.per_device["params_bytes"]
    assert qlora.per_device["nf4_base_bytes"] > 0 and lora.per_device["nf4_base_bytes"] == 0
    # the NF4 base: ~0.52 bytes per weight instead of 4 (fp32 here)
    saved = lora.per_device["params_bytes"] - qlora.per_device["params_bytes"]
    assert saved == pytest.approx(qlora.per_device["nf4_base_bytes"] * (4 / 0.5159 - 1), rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_planned_state_bytes_match_what_ranks_hold(world):
    """bench_adapters' smoke stack (hidden 256) trained for a step on 1 and 2 real gloo ranks,
    full / LoRA / QLoRA: trainer.parallel.local_state_bytes (no padding) vs the plan, within 5%."""
    from bench import bench_adapters

    measured = bench_adapters.measure_all(smoke=True, steps=0, world=world)
    for adapter in ("none", "lora", "qlora"):
        cfg = bench_adapters._cfg(adapter, smoke=True)
        overrides = [f"{k}={v}" for k, v in _flat(cfg) if k.split(".")[0] in ("model", "optim", "parallel")]
        p = _plan(["+experiment=cpu_demo", *overrides, f"plan.world_size={world}", "parallel.param_dtype=float32",
                   "data.limit_train_rows=64"])
        got = max(measured[adapter]["per_rank"], key=lambda s: s["total"])
        for key in ("params", "grads", "optimizer"):
            assert p.per_device[f"{key}_bytes"] == pytest.approx(got[key], rel=0.05), (adapter, key)


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif not isinstance(v, list) and v is not None:
            yield f"{prefix}{k}", v


@pytest.mark.slow
def test_cli_plans_the_9b_preset_and_says_what_to_change(tmp_path, repo_dir):
    out = tmp_path / "plan.json"
    # the example: the 9B recipe's 80 rows per step spread over 4 nodes x 8 GPUs
    proc = subprocess.run([sys.executable, "-m", "launch.plan", "+experiment=gemma2_9b", "launcher.nodes=4",
                           f"out={out}"], cwd=repo_dir, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(out.read_text())
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes"):
        assert plan["per_device"][key] > 0
    assert plan["world_size"] == 32 and plan["fits"] is True and 0 < plan["budget_fill"] < 0.15
    assert plan["step_time_s"] > 0 and plan["bound"] == "communication"
    assert "low budget fill" in proc.stdout and "data.global_batch_rows=" in proc.stdout
    assert "communication-bound" in proc.stdout
    assert proc.stdout.strip().splitlines()[-2].startswith("plan: fits")
    # the preset as shipped (one 8-GPU node): fits and compute-bound
    preset = json.loads(subprocess.run([sys.executable, "-m", "launch.plan", "+experiment=gemma2_9b",
                                        f"out={tmp_path / 'one.json'}"], cwd=repo_dir, text=True, capture_output=True,
                                       timeout=300).stdout and (tmp_path / "one.json").read_text())
    assert preset["world_size"] == 8 and preset["fits"] and preset["bound"] == "compute"
    # the same job without activation checkpointing does not fit 80 GB, and the plan says why
    proc = subprocess.run([sys.executable, "-m", "launch.plan", "+experiment=gemma2_9b",
                           "model.activation_checkpointing=false"], cwd=repo_dir, text=True, capture_output=True,
                          timeout=300)
    assert "DOES NOT FIT" in proc.stdout and "model.activation_checkpointing=true" in proc.stdout
