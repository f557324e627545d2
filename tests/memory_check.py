"""The planner's figures against what the ranks of a finished run really held (memory.json,
written by trainer/memory.py): shared by the real-width tests, so one 2-rank run serves both
the export rehearsal and the planner check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dist_helpers as h
from trainer.config import compose


def assert_planned_memory_matches(run_dir: Path, overrides: list[str], world: int) -> None:
    """Planned parameter / gradient / optimizer bytes within 5% of every rank's, and the planned peak
    (gloo's collective copies included, no overhead) within 15% of the highest measured peak."""
    from trainer.planner import plan

    record = json.loads((run_dir / "memory.json").read_text())
    assert record["steps_measured"] == 2 and record["world_size"] == world
    assert record["peak_method"].startswith("CPU resident set")

    p = plan(compose([*h.TINY, *overrides, f"plan.world_size={world}", "plan.overhead_gb=0", "trainer.device=cpu"]))
    d = p.per_device
    for rank in record["per_rank"]:
        for key in ("params", "grads", "optimizer"):
            assert d[f"{key}_bytes"] == pytest.approx(rank[key], rel=0.05), (world, key)
    measured = max(r["peak"] for r in record["per_rank"])
    # the peak is real: far above the state alone (the gathered 256k x 2304 embedding, its gradient)
    assert measured > 1.2 * max(r["total"] for r in record["per_rank"])
    print(f"world {world}: planned state {d['params_bytes'] + d['grads_bytes'] + d['optimizer_bytes']:,} B, peak "
          f"{d['peak_bytes']:,} B ({p.peak_moment}); measured per rank "
          + "; ".join(f"state {r['total']:,} B, peak {r['peak']:,} B" for r in record["per_rank"]))
    assert d["peak_bytes"] == pytest.approx(measured, rel=0.15), (world, p.peak_moment, d, record)
