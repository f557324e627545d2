"""TokenBudgetSampler properties over many random length sets, world sizes 1..8, several budgets."""

import numpy as np
import pytest

from trainer.data.sampler import TokenBudgetSampler


def random_case(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    max_tokens = int(rng.choice([512, 2048, 16384]))
    lengths = np.clip(rng.lognormal(np.log(max_tokens / 8), 1.0, size=n), 1, max_tokens).astype(np.int64)
    return dict(lengths=lengths, global_batch_rows=int(rng.integers(1, 100)), max_tokens=max_tokens,
                world_size=int(rng.integers(1, 9)), seed=int(rng.integers(0, 1000)))


def all_ranks(case, **over):
    c = {**case, **over}
    return [TokenBudgetSampler(c["lengths"], global_batch_rows=c["global_batch_rows"],
                               max_tokens=c["max_tokens"], world_size=c["world_size"], rank=r,
                               seed=c["seed"]) for r in range(c["world_size"])]


def epoch_plan(samplers, epoch):
    return [[s.plan_step(epoch, st) for s in samplers] for st in range(samplers[0].steps_per_epoch)]


@pytest.mark.parametrize("block", range(10))
def test_properties(block):
    for seed in range(block * 30, block * 30 + 30):  # 300 random cases in all
        case = random_case(seed)
        samplers = all_ranks(case)
        L, M, n = case["lengths"], case["max_tokens"], len(case["lengths"])
        plans = {}
        for epoch in (0, 1):
            seen = []
            plan = epoch_plan(samplers, epoch)
            plans[epoch] = plan
            for st, per_rank in enumerate(plan):
                counts = {len(mbs) for mbs in per_rank}
                assert len(counts) == 1, f"seed {seed}: ranks differ in micro-batch count"
                real = 0
                for mbs in per_rank:
                    for mb in mbs:
                        assert mb.indices and len(mb.indices) == len(mb.weights)
                        assert L[mb.indices].sum() <= M
                        real += mb.num_rows
                        seen += [i for i, w in zip(mb.indices, mb.weights) if w == 1.0]
                        assert all(w in (0.0, 1.0) for w in mb.weights)
                assert real == samplers[0].step_num_rows(epoch, st)
            assert sorted(seen) == list(range(n)), f"seed {seed}: not every row exactly once"
        # determinism: a fresh sampler gives the same plan
        assert epoch_plan(all_ranks(case), 1) == plans[1]
        if samplers[0].steps_per_epoch > 1 and case["global_batch_rows"] > 1:
            order = lambda p: [i for step in p for mbs in step for mb in mbs for i in mb.indices]
            assert order(plans[0]) != order(plans[1]), f"seed {seed}: epochs identical"


def test_balance_on_recipe_shape():
    # 80 rows/step, 4 ranks, 16k budget on arena-like lengths: nearly equal rank loads
    rng = np.random.default_rng(0)
    L = np.clip(rng.lognormal(np.log(400), 0.9, size=4000), 60, 4096).astype(int)
    s = TokenBudgetSampler(L, global_batch_rows=80, max_tokens=16384, world_size=4, rank=0, seed=0)
    imb = []
    for st in range(s.steps_per_epoch - 1):
        loads = [sum(int(L[mb.indices].sum()) for mb in mbs) for mbs in s.plan_global(0, st)]
        imb.append(max(loads) / np.mean(loads))
    assert np.mean(imb) < 1.02 and max(imb) < 1.1


def flat_sequence(s, max_epochs):
    """(epoch, step, micro, indices, weights) for every micro-batch from s's position on."""
    out = []
    for e, st, mbs in s.iter_steps(max_epochs):
        first = len(s.plan_step(e, st)) - len(mbs)
        out += [(e, st, first + j, tuple(mb.indices), tuple(mb.weights)) for j, mb in enumerate(mbs)]
    return out


def test_resume_anywhere_matches_uninterrupted():
    for seed in range(40):
        case = random_case(1000 + seed)
        for rank in {0, case["world_size"] - 1}:
            s = all_ranks(case)[rank]
            full = flat_sequence(s, 2)
            rng = np.random.default_rng(seed)
            for cut in rng.integers(0, len(full), size=5):
                e, st, j = full[cut][:3]
                s.set_position(e, st, j)
                state = s.state_dict()
                fresh = all_ranks(case)[rank]
                fresh.load_state_dict(state)
                assert flat_sequence(fresh, 2) == full[cut:]


def test_epoch_boundary_rolls_over():
    s = TokenBudgetSampler([10] * 10, global_batch_rows=4, max_tokens=100, seed=3)
    assert s.steps_per_epoch == 3
    s.set_position(0, 3)  # "after the last step of epoch 0"
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["step"] == 0
    steps = [(e, st) for e, st, _ in s.iter_steps(max_epochs=2)]
    assert steps == [(1, 0), (1, 1), (1, 2)]
    assert s.step_num_rows(0, 2) == 2  # last partial step: fewer rows, not dropped


def test_world_size_change_at_step_boundary():
    for seed in range(30):
        case = random_case(2000 + seed)
        old = all_ranks(case)
        total = old[0].steps_per_epoch * 2
        stop = int(np.random.default_rng(seed).integers(0, total))
        for s in old:
            s.set_position(0, stop)
        state = old[0].state_dict()
        new_ws = case["world_size"] % 8 + 1
        new = all_ranks(case, world_size=new_ws)
        for s in new:
            s.load_state_dict(state)
        # the same global rows per step, now cut for new_ws ranks, with every property intact
        for e, st, _ in new[0].iter_steps(max_epochs=2):
            rows_new = sorted(i for s in new for mb in s.plan_step(e, st)
                              for i, w in zip(mb.indices, mb.weights) if w)
            rows_old = sorted(i for s in old for mb in s.plan_step(e, st)
                              for i, w in zip(mb.indices, mb.weights) if w)
            assert rows_new == rows_old
            assert len({len(s.plan_step(e, st)) for s in new}) == 1


def test_refusals():
    L = np.full(100, 10)
    s = TokenBudgetSampler(L, global_batch_rows=8, max_tokens=64, world_size=2, rank=0, seed=0)
    s.set_position(0, 3, 1)
    mid = s.state_dict()
    other_ws = TokenBudgetSampler(L, global_batch_rows=8, max_tokens=64, world_size=4, rank=0, seed=0)
    with pytest.raises(ValueError, match="mid-step"):
        other_ws.load_state_dict(mid)
    for kw, match in [(dict(lengths=np.full(99, 10)), "num_rows"), (dict(global_batch_rows=16), "global_batch_rows"),
                      (dict(seed=1), "seed")]:
        args = dict(lengths=L, global_batch_rows=8, max_tokens=64, world_size=2, rank=0, seed=0) | kw
        with pytest.raises(ValueError, match=match):
            TokenBudgetSampler(args.pop("lengths"), **args).load_state_dict(mid)
    with pytest.raises(ValueError, match="exceed max_tokens"):
        TokenBudgetSampler([10, 100], global_batch_rows=2, max_tokens=64)


def test_padding_rows_when_ranks_outnumber_rows():
    s = [TokenBudgetSampler([5, 7, 9], global_batch_rows=2, max_tokens=10, world_size=4, rank=r, seed=0)
         for r in range(4)]
    for st in range(2):
        mbs = [x.plan_step(0, st) for x in s]
        assert {len(m) for m in mbs} == {1}
        weights = sorted(w for m in mbs for mb in m for w in mb.weights)
        assert weights.count(1.0) == s[0].step_num_rows(0, st)
        assert all(len(mb.indices) >= 1 for m in mbs for mb in m)
