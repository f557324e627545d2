"""Worker processes start clean in a process that has threads (trainer.data.workers).

A trainer process is never single-threaded when it prepares data (gloo/NCCL loops, wandb, the
run lock's heartbeat). Here a thread of the test process holds a lock that the workers' code
takes. A forked worker would inherit it held and wait forever (a CI run hung in the tokenizer
pool this way); a worker from the forkserver imports a fresh, free one. The timeout turns a
hang into a failure.
"""
import threading

import numpy as np
import pytest

from test_data_collate import toy_dataset
from trainer.data.collate import VarlenCollator, make_step_loader
from trainer.data.sampler import TokenBudgetSampler
from trainer.data.tokenize import _tokenize_rows

# module state, as a library's lock would be: each worker process has its own copy
LOCK = threading.Lock()


class LockingBuilder:
    """A renderer whose work takes LOCK, as tokenizers and loggers take their own locks."""

    def build_many(self, rows):
        with LOCK:
            return [np.array([2, *range(3, 3 + n)], np.int32) for n in rows]


class LockingCollator(VarlenCollator):
    def __call__(self, items):
        with LOCK:
            return super().__call__(items)


@pytest.fixture
def lock_held_by_another_thread():
    taken, done = threading.Event(), threading.Event()

    def hold():
        with LOCK:
            taken.set()
            done.wait()

    t = threading.Thread(target=hold, name="holds-the-lock")
    t.start()
    taken.wait()
    yield
    done.set()
    t.join()


@pytest.mark.timeout(120)
def test_tokenizer_pool_workers_do_not_inherit_a_held_lock(lock_held_by_another_thread):
    rows = [1 + i % 7 for i in range(300)]
    out = _tokenize_rows(LockingBuilder(), rows, num_workers=2, desc="t", chunk_rows=16)
    assert [len(x) for x in out] == [1 + n for n in rows]


@pytest.mark.timeout(120)
def test_dataloader_workers_do_not_inherit_a_held_lock(lock_held_by_another_thread):
    ds = toy_dataset()
    sampler = TokenBudgetSampler(ds.lengths, global_batch_rows=8, max_tokens=100, seed=5)
    steps = list(make_step_loader(ds, sampler, LockingCollator(3), num_workers=2, max_epochs=1))
    assert sorted(r for s in steps for mb in s.micro_batches for r in mb.row_ids) == sorted(ds.row_ids.tolist())
