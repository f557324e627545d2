"""data.swap_ab=full: each row and its A/B-swapped twin in the same optimizer step (issue 17).

The sampler draws its permutation over pairs (row i and row i + N/2), so every global step
holds whole pairs; the token budget and the rank balance come from the same cut as ever.
Trained with 1 and 2 ranks the runs agree to 1e-5, and a resume is bitwise.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import dist_helpers as h
from trainer.config import compose, swap_mode
from trainer.data.sampler import TokenBudgetSampler
from trainer.datasets import load_split, train_sampler
from trainer.errors import ConfigError
from trainer.tasks import build_task


def test_swap_ab_modes_and_aliases():
    assert [swap_mode(v) for v in (True, False, "true", "False", "none", "double", "full")] == \
        ["double", "none", "double", "none", "none", "double", "full"]
    with pytest.raises(ConfigError, match="data.swap_ab"):
        swap_mode("twice")
    assert compose(["+experiment=cpu_demo", "data.swap_ab=true"]).data.swap_ab is True  # old configs still compose
    with pytest.raises(ConfigError, match="must be even"):
        compose(["+experiment=cpu_demo", "data.swap_ab=full", "data.global_batch_rows=7"])
    with pytest.raises(ConfigError, match="no A/B swap"):
        compose(["+experiment=cpu_demo", "data/task=text_classification", "data.train_path=x.csv",
                 "data.swap_ab=full"])


@pytest.mark.parametrize("seed", range(6))
def test_every_step_holds_whole_pairs_within_budget(seed):
    rng = np.random.default_rng(seed)
    half = int(rng.integers(5, 120))
    base = rng.integers(20, 900, size=half)
    lengths = np.concatenate([base, base + rng.integers(-5, 5, size=half).clip(-19)])  # twins: about as long
    g, world, budget = 2 * int(rng.integers(1, 20)), int(rng.integers(1, 5)), 2048
    samplers = [TokenBudgetSampler(lengths, global_batch_rows=g, max_tokens=budget, world_size=world, rank=r,
                                   seed=seed, paired=True) for r in range(world)]
    s = samplers[0]
    assert s.steps_per_epoch == -(-2 * half // g)  # as long an epoch as double
    for epoch in (0, 1):
        seen = Counter()
        for step in range(s.steps_per_epoch):
            rows = s.step_rows(epoch, step)
            plan = [samplers[r].plan_step(epoch, step) for r in range(world)]
            assert len({len(p) for p in plan}) == 1  # every rank runs the same number of micro-batches
            real = [i for p in plan for mb in p for i, w in zip(mb.indices, mb.weights) if w > 0]
            assert sorted(real) == sorted(rows.tolist())
            assert all(sum(int(lengths[i]) for i in mb.indices) <= budget for p in plan for mb in p)
            originals = {i % half for i in real}
            assert Counter(real) == Counter([i for o in originals for i in (o, o + half)])  # each with its twin
            assert s.step_num_rows(epoch, step) == 2 * len(originals)  # the normaliser counts both
            seen.update(real)
        assert seen == Counter(range(2 * half))  # each row once per epoch
    orders = [TokenBudgetSampler(lengths, global_batch_rows=g, max_tokens=budget, seed=seed, paired=True)
              .step_rows(0, 0).tolist() for _ in range(2)]
    assert orders[0] == orders[1]


def test_paired_sampler_state_is_checked_on_resume():
    s = TokenBudgetSampler([10] * 8, global_batch_rows=4, max_tokens=100, paired=True)
    state = s.state_dict()
    assert state["paired"] is True
    with pytest.raises(ValueError, match="paired"):
        TokenBudgetSampler([10] * 8, global_batch_rows=4, max_tokens=100).load_state_dict(state)
    old = {k: v for k, v in TokenBudgetSampler([10] * 8, global_batch_rows=4, max_tokens=100).state_dict().items()
           if k != "paired"}  # a checkpoint from before the key existed
    TokenBudgetSampler([10] * 8, global_batch_rows=4, max_tokens=100).load_state_dict(old)
    with pytest.raises(ValueError, match="even"):
        TokenBudgetSampler([10] * 7, global_batch_rows=4, max_tokens=100, paired=True)


def test_real_arena_rows_train_with_their_twins(tmp_path, arena_dir, tokenizer_dir):
    dcfg = {"task": "arena", "train_path": str(arena_dir / "train.csv"), "eval_path": None,
            "tokenizer_path": str(tokenizer_dir), "max_length": 512, "max_tokens": 2048, "on_bad_row": "error",
            "prompt_layout": "interleaved", "swap_ab": "full", "limit_train_rows": 60, "cache_dir": str(tmp_path),
            "global_batch_rows": 16, "shuffle": True}
    ds = load_split(dcfg, build_task(dcfg), "train")
    assert len(ds) == 120 and not ds.swapped[:60].any() and ds.swapped[60:].all()
    np.testing.assert_array_equal(ds.row_ids[:60], ds.row_ids[60:])
    sampler = train_sampler(ds, dcfg, world_size=2, rank=0, seed=5)
    for step in range(sampler.steps_per_epoch):
        rows = [i for p in sampler.plan_global(0, step) for mb in p for i, w in zip(mb.indices, mb.weights) if w]
        ids = Counter(ds.row_ids[rows].tolist())
        assert set(ids.values()) == {2}, step  # every comparison twice in the step...
        assert sorted(ds.swapped[rows].tolist()) == [False] * (len(rows) // 2) + [True] * (len(rows) // 2)
        for i in rows:  # ...once each way round, labels following the answers
            twin = i + 60 if i < 60 else i - 60
            np.testing.assert_array_equal(ds.labels[twin], ds.labels[i][[1, 0, 2]])


def test_a_row_kept_in_one_orientation_only_loses_its_twin(caplog):
    from trainer.data.tokenize import TokenizedDataset
    from trainer.datasets import _twins_aligned

    def ds(ids, swapped):
        n = len(ids)
        return TokenizedDataset(np.array(ids), np.arange(3 * n, dtype=np.int32), np.arange(0, 3 * n + 1, 3),
                                np.eye(3, dtype=np.float32)[np.arange(n) % 3], np.full(n, swapped))

    a, b = _twins_aligned([ds([1, 2, 3, 4], False), ds([4, 1, 3], True)], "f.csv")  # id 2 lost one way round
    assert a.row_ids.tolist() == b.row_ids.tolist() == [1, 3, 4]
    assert "1 row(s) were kept in only one A/B orientation" in caplog.text
    same = [ds([1, 2], False), ds([1, 2], True)]
    assert _twins_aligned(same, "f.csv") is same


# ---- trained: 1 vs 2 ranks, resume ------------------------------------------------------------
FULL = ["data.swap_ab=full", "trainer.max_steps=4", "data.eval_path=null"]


@pytest.mark.slow
def test_full_swap_trains_the_same_on_1_and_2_ranks_and_resumes_bitwise(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    h.run(one, 1, FULL)
    h.run(two, 2, FULL)
    l1, l2 = h.losses(one), h.losses(two)
    assert sorted(l1) == [1, 2, 3, 4] and l1.keys() == l2.keys()
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], abs=1e-5), f"loss at step {s}"
    w1, w2 = h.load_weights(h.latest_checkpoint(one)), h.load_weights(h.latest_checkpoint(two))
    assert h.max_abs_diff(w1, w2) < 1e-5
    state = h.trainer_state(h.latest_checkpoint(two))["state"]
    assert state["sampler"]["paired"] is True and state["progress"]["rows_seen"] == 4 * 8

    # Resume the 2-rank run from its step-2 checkpoint: bitwise the uninterrupted run.
    resumed = h.copy_run(two, tmp_path / "resumed", checkpoints_upto=2)
    proc = h.run(resumed, 2, FULL)
    assert "resumed from" in h.log_text(proc)
    h.assert_weights_equal(h.load_weights(h.latest_checkpoint(resumed)), w2)
    assert h.losses(resumed) == l2
