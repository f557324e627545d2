"""VarlenCollator exact tensors and the step loader (DataLoader workers, resume)."""
import numpy as np
import pytest
import torch

from trainer.data.collate import Item, VarlenCollator, make_step_loader
from trainer.data.sampler import TokenBudgetSampler
from trainer.data.tokenize import TokenizedDataset


def test_collator_exact():
    items = [Item(np.array([2, 10, 11]), np.array([1, 0, 0], np.float32), 7, 1.0),
             Item(np.array([2, 12]), np.array([0.2, 0.5, 0.3], np.float32), 8, 1.0),
             Item(np.array([2, 13, 14, 15]), None, "x9", 0.0)]
    b = VarlenCollator(3, decode=lambda ids: " ".join(map(str, ids)))(items)
    x = b.inputs  # exactly the model's keyword arguments; bookkeeping stays outside
    assert sorted(x) == ["cu_seqlens", "input_ids", "max_seq_len", "position_ids"]
    assert x["input_ids"].dtype == torch.long and x["input_ids"].tolist() == [[2, 10, 11, 2, 12, 2, 13, 14, 15]]
    assert x["position_ids"].dtype == torch.long and x["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert b.seq_lens == [3, 2, 4] and x["max_seq_len"] == 4 and b.batch_size == 3
    assert x["cu_seqlens"].dtype == torch.int32 and x["cu_seqlens"].tolist() == [0, 3, 5, 9]
    assert b.labels.dtype == torch.float32
    torch.testing.assert_close(b.labels, torch.tensor([[1, 0, 0], [0.2, 0.5, 0.3], [0, 0, 0]]))
    assert b.weights.dtype == torch.float32 and b.weights.tolist() == [1.0, 1.0, 0.0]
    assert b.row_ids == [7, 8, "x9"] and b.text[1] == "2 12"
    with pytest.raises(ValueError):
        VarlenCollator(3)([])


def test_recipe_example():
    # the recipe's example: three sequences of 298, 687 and 1951 tokens, all "A wins"
    b = VarlenCollator(3)([Item(np.arange(n), np.array([1, 0, 0], np.float32), i, 1.0)
                          for i, n in enumerate([298, 687, 1951])])
    x = b.inputs
    assert x["input_ids"].shape == (1, 2936) and x["cu_seqlens"].tolist() == [0, 298, 985, 2936]
    assert x["max_seq_len"] == 1951 and x["position_ids"][0, 985:].tolist() == list(range(1951))


def toy_dataset(n=37, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [np.concatenate([[2], rng.integers(3, 1000, size=int(rng.integers(4, 60)))]).astype(np.int32)
            for _ in range(n)]
    labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=n)]
    return TokenizedDataset(np.arange(100, 100 + n), np.concatenate(seqs),
                            np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64),
                            labels, np.zeros(n, bool))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_step_loader_matches_plan_and_resumes(num_workers):
    ds = toy_dataset()
    mk = lambda: TokenBudgetSampler(ds.lengths, global_batch_rows=8, max_tokens=100, world_size=2,
                                    rank=1, seed=5)
    s = mk()
    steps = list(make_step_loader(ds, s, VarlenCollator(3), num_workers=num_workers, max_epochs=2))
    assert [(x.epoch, x.step) for x in steps] == [(e, t) for e in range(2) for t in range(s.steps_per_epoch)]
    for x in steps:
        plan = s.plan_step(x.epoch, x.step)
        assert len(x.micro_batches) == len(plan) and x.num_rows == s.step_num_rows(x.epoch, x.step)
        for mb, p in zip(x.micro_batches, plan):
            assert mb.row_ids == [100 + i for i in p.indices] and mb.weights.tolist() == p.weights
            assert mb.inputs["input_ids"].shape[1] == sum(int(ds.lengths[i]) for i in p.indices) <= 100
            torch.testing.assert_close(mb.labels, torch.from_numpy(ds.labels[p.indices]))
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["step"] == 0
    # stop after 3 steps, save, resume in a fresh sampler: the rest is identical
    s2 = mk()
    it = make_step_loader(ds, s2, VarlenCollator(3), num_workers=num_workers, max_epochs=2)
    for _ in range(3):
        next(it)
    state = s2.state_dict()
    it.close()
    s3 = mk()
    s3.load_state_dict(state)
    rest = list(make_step_loader(ds, s3, VarlenCollator(3), num_workers=num_workers, max_epochs=2))
    key = lambda x: (x.epoch, x.step, [mb.row_ids for mb in x.micro_batches])
    assert [key(x) for x in rest] == [key(x) for x in steps[3:]]


def test_step_loader_mid_step_resume():
    ds = toy_dataset()
    s = TokenBudgetSampler(ds.lengths, global_batch_rows=16, max_tokens=100, seed=1)
    assert len(s.plan_step(0, 0)) > 1
    s.set_position(0, 0, 1)
    first = next(make_step_loader(ds, s, VarlenCollator(3), max_epochs=1))
    plan = s.plan_step(0, 0)
    assert [mb.row_ids for mb in first.micro_batches] == [[100 + i for i in p.indices] for p in plan[1:]]
