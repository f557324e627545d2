"""bench/bench_data.py packing rows on synthetic lengths (the tokenization rows run in the bench)."""
import numpy as np

from bench.bench_data import naive_plan, packing_rows


def test_packing_rows_shape_and_limits():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(400), 0.9, size=800), 60, 2048).astype(np.int64)
    rows = packing_rows(lengths, 4, budget=2048)
    assert [set(r) for r in rows] == [{"name", "ours", "alternative", "ratio", "limit", "unit"}] * 3
    fill, imb, pad = rows
    assert fill["ours"] >= float(fill["limit"].split()[1]) and fill["ours"] >= fill["alternative"]
    assert imb["ours"] <= 1.05 and pad["ours"] == 0 and pad["alternative"] > 0
    plan = naive_plan(np.arange(10), lengths, 3, 2048)
    assert len({len(p) for p in plan}) == 1
