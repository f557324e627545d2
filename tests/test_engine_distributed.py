"""The training engine is the same computation at every world size (issue 5).

Each test launches `python -m launch.train` (1 process) or torchrun (2 or 4 processes, gloo on
CPU) on the same 64 rows, 8 rows per optimizer step, fp32, dropout 0, and compares the loss of
every step (metrics.jsonl `loss_step`), the logged global gradient norm and the final weights
(loaded from the final DCP checkpoint on one process). Gradient clipping is made to bind
(optim.grad_clip below the norms seen), so clipping with a per-rank instead of the global norm
would show up in the weights.
"""

from __future__ import annotations

import re

import pytest

import dist_helpers as h

pytestmark = pytest.mark.slow

STEPS = 4
# grad norms of this model on these rows are 0.3-0.6: a 0.2 clip binds at every step.
COMMON = [f"trainer.max_steps={STEPS}", "optim.grad_clip=0.2"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference():
    """One process: the trajectory every other world size must reproduce."""
    return h.shared_run(1, COMMON)


def _compare(run_dir, ref_dir, *, atol=ATOL):
    ref_loss, loss = h.losses(ref_dir), h.losses(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1)), loss
    assert loss.keys() == ref_loss.keys()
    for s in ref_loss:
        assert loss[s] == pytest.approx(ref_loss[s], abs=atol), f"loss at step {s}"
    # The logged norm is the global pre-clip norm: the same whatever the world size.
    ref_gn, gn = h.grad_norms(ref_dir), h.grad_norms(run_dir)
    for s in ref_gn:
        assert gn[s] == pytest.approx(ref_gn[s], rel=1e-5, abs=1e-6), f"grad_norm at step {s}"
        assert ref_gn[s] > 0.2, "the clip should bind for this test to mean something"
    w_ref = h.load_weights(h.latest_checkpoint(ref_dir))
    w = h.load_weights(h.latest_checkpoint(run_dir))
    diff = h.max_abs_diff(w, w_ref)
    assert diff < atol
    # ...while the last two steps alone moved the weights by far more than the tolerance
    first = h.load_weights(h.checkpoints(ref_dir)[0])
    assert h.max_abs_diff(first, w_ref) > 50 * atol
    return diff


def test_two_processes_equal_one(reference, tmp_path):
    run_dir = h.shared_run(2, COMMON)
    _compare(run_dir, reference)
    state = h.trainer_state(h.latest_checkpoint(run_dir))
    assert state["world_size"] == 2 and state["step"] == STEPS and state["state"]["progress"]["rows_seen"] == 8 * STEPS


def test_different_micro_batch_cut_equals_one_process(reference, tmp_path):
    """max_tokens 512 cuts each rank's 4 rows of ~256 tokens into 2 micro-batches, not 1."""
    run_dir = tmp_path / "cut"
    h.run(run_dir, 2, [*COMMON, "data.max_tokens=512"])
    _compare(run_dir, reference)
    # The loss normaliser is the global row count, so the cut changes nothing but rounding.


def test_hsdp_2x2_equals_one_process(reference, tmp_path):
    run_dir = tmp_path / "hsdp"
    proc = h.run(run_dir, 4, [*COMMON, "parallel.dp_replicate=2"], timeout=300)
    _compare(run_dir, reference)
    assert "world size 4" in h.log_text(proc)


def test_non_finite_loss_stops_with_step_and_rows(tmp_path):
    """lr=1e30: step 1 runs at lr 0 (warm-up), step 2 blows the weights up, step 3's loss is
    NaN. The run must stop at that step, name it and the rows, and not checkpoint it. Saves
    are async, so the last good step's save is still in flight when the bad step is found: it
    must be committed, not left as a .tmp."""
    run_dir = tmp_path / "nan"
    proc = h.run(run_dir, 2, ["optim.lr=1e30", "checkpoint.every_steps=1", "checkpoint.async_save=true",
                              "trainer.max_steps=6"], check=False)
    text = h.log_text(proc)
    assert proc.returncode != 0
    m = re.search(r"non-finite loss or gradient at step (\d+): .*rows with non-finite loss: \[([^\]]*)\]", text)
    assert m, text[-3000:]
    bad_step = int(m.group(1))
    row_ids = [int(x) for x in m.group(2).split(",") if x.strip()]
    assert row_ids, "the rows with a non-finite loss are named"
    trained = h.losses(run_dir)
    assert max(trained) == bad_step - 1, trained  # the bad step was never logged as trained
    steps_saved = [int(p.name.split("-")[1]) for p in h.checkpoints(run_dir)]
    assert steps_saved == list(range(1, bad_step)), steps_saved
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert not (run_dir / ".done").exists()
