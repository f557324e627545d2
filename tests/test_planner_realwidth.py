"""The planner against what ranks really hold, at real width: gemma-2-2b's widths (hidden 2304,
MLP 9216, 8 heads of 256, 4 KV heads, vocabulary 256,000), 1 layer, bf16 weights and compute,
AnyPrecisionAdamW with bf16 moments + Kahan. The trainer runs 2 steps on 1 and 4 gloo ranks and
writes memory.json (trainer/memory.py): per rank, parameter / gradient / optimizer bytes, and the
peak resident set of the steady step above what the process held before the build. Planned state
within 5%, planned peak (gloo's collective copies included, no overhead) within 15%. Short
text-classification rows keep the bf16 CPU matmuls cheap; the state and the all-gathered
embedding (1.1 GiB) dominate every peak here. 2 ranks: the export rehearsal's run (2 layers,
tests/test_rehearsal_realwidth.py) is checked the same way, so that case is not run twice.

The 4-rank case needs ~22 GB of host memory at once (each rank ~5.8 GB: gloo copies the 1.1 GiB
embedding twice around its collectives); it runs where that much is available and is skipped on
the 24 GB CI machine, where it was measured alone (docs/planner.md has the figures)."""

from __future__ import annotations

from pathlib import Path

import pytest

import dist_helpers as h
import text_data
from memory_check import assert_planned_memory_matches

pytestmark = [pytest.mark.slow, pytest.mark.realwidth]

REAL_WIDTH = ["model.hidden_size=2304", "model.intermediate_size=9216", "model.num_attention_heads=8",
              "model.num_key_value_heads=4", "model.head_dim=256", "model.query_pre_attn_scalar=256",
              "model.num_hidden_layers=1", "model.vocab_size=256000", "model.dtype=bfloat16",
              "parallel.param_dtype=bfloat16", "parallel.reduce_dtype=bfloat16", "optim.use_kahan_summation=true",
              "optim.momentum_dtype=bfloat16", "optim.variance_dtype=bfloat16", "data/task=text_classification",
              "data.max_length=32", "data.max_tokens=64", "data.limit_train_rows=null", "trainer.max_steps=2",
              "checkpoint.enabled=false", "model.head=linear"]


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@pytest.mark.parametrize("world", [1, 4])
def test_planned_memory_matches_real_width_ranks(tmp_path, world):
    need = {1: 9, 4: 25}[world]
    if _available_gib() < need:
        pytest.skip(f"{world} real-width ranks need ~{need} GiB of free host memory; {_available_gib():.1f} available")

    train = text_data.write(tmp_path / "train.csv", text_data.rows(8 * world, seed=world))
    overrides = [*REAL_WIDTH, f"data.train_path={train}", f"data.global_batch_rows={2 * world}"]
    run_dir = tmp_path / "run"
    h.run(run_dir, world, overrides, timeout=400)
    assert_planned_memory_matches(run_dir, overrides, world)
