"""Crash, preemption and resume (issue 6): real torchrun process groups on CPU (gloo).

The reference is an uninterrupted 2-process run with dropout 0.1 (so the per-rank RNG restore
matters) over 24 rows x 3 epochs (3 steps per epoch, 9 steps): checkpoints at steps 2, 4, 6,
8 and 9 sit at the start, in the middle and at the end of epochs. An interrupted run in the
same run_dir must reach the same per-step losses and final weights *bitwise*.
"""

from __future__ import annotations

import os
import random
import json
import re
import signal
import time
from pathlib import Path

import pytest

import dist_helpers as h
from trainer.checkpoint import Checkpointer, CheckpointError, find_latest, verify_checkpoint

STEPS = 9
DROP = ["model.head_dropout=0.1", "data.limit_train_rows=24", "trainer.epochs=3", "checkpoint.every_steps=2",
        "checkpoint.keep_last=3"]
# Same as test_engine_distributed's reference (shared within one pytest session).
FP32 = ["trainer.max_steps=4", "optim.grad_clip=0.2"]


def _step_of(path: Path) -> int:
    return int(re.match(r"step-(\d+)", path.name).group(1))


def _assert_bitwise_same_run(run_dir: Path, ref_dir: Path, steps: int = STEPS) -> None:
    loss, ref_loss = h.losses(run_dir), h.losses(ref_dir)
    assert sorted(loss) == list(range(1, steps + 1)), loss
    mismatch = {s: (loss[s], ref_loss[s]) for s in ref_loss if loss[s] != ref_loss[s]}
    assert not mismatch, f"losses differ from the uninterrupted run at steps {mismatch}"
    gn, ref_gn = h.grad_norms(run_dir), h.grad_norms(ref_dir)
    assert gn == ref_gn
    final, ref_final = h.latest_checkpoint(run_dir), h.latest_checkpoint(ref_dir)
    assert final.name == ref_final.name == f"step-{steps:08d}"
    h.assert_weights_equal(h.load_weights(final), h.load_weights(ref_final))
    h.assert_weights_equal(h.load_weights(final, "optim."), h.load_weights(ref_final, "optim."))
    assert (run_dir / ".done").exists() and not (run_dir / ".preempted").exists()


def _resumed_step(proc) -> int | None:
    m = re.search(r"resumed from \S+ at step (\d+)", h.log_text(proc))
    return int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def reference():
    return h.shared_run(2, DROP)


@pytest.mark.slow
def test_sigkill_at_random_steps_and_during_checkpoint_write(reference, tmp_path):
    rng = random.Random()
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"

    # 1. SIGKILL the whole group right after a random step (>= 3: a checkpoint is committed).
    k1 = rng.randint(3, 6)
    proc = h.start(run_dir, 2, DROP)
    h.wait_for(lambda: max(h.losses(run_dir), default=0) >= k1, proc=proc)
    h.kill_group(proc)
    killed_at = max(h.losses(run_dir))
    committed = [_step_of(p) for p in h.checkpoints(run_dir)]
    assert committed and all(s <= killed_at for s in committed)

    # 2. Restart; SIGKILL while the next checkpoint's shards are being written.
    proc = h.start(run_dir, 2, DROP)
    last_committed = max(committed, default=0)

    def writing():
        for t in ckpts.glob("step-*.tmp"):
            if _step_of(t) > max(last_committed, killed_at) and any(t.glob("*.distcp")):
                return t
        return None

    tmp = h.wait_for(writing, interval=0.002, proc=proc)
    h.kill_group(proc)
    assert _resumed_step(proc) == (last_committed or None), h.log_text(proc)[-3000:]
    assert tmp.is_dir(), f"{tmp} was committed before the kill landed"
    assert not (ckpts / tmp.name[:-4]).exists()
    committed = [_step_of(p) for p in h.checkpoints(run_dir)]
    assert max(committed, default=0) < _step_of(tmp)

    # 3. Restart: the partial checkpoint is ignored and reported, training finishes.
    proc = h.run(run_dir, 2, DROP)
    text = h.log_text(proc)
    assert f"{tmp}: a partial checkpoint (never committed), ignored" in text
    assert _resumed_step(proc) == (max(committed, default=0) or None)
    _assert_bitwise_same_run(run_dir, reference)
    print(f"killed after step {killed_at}, then while writing {tmp.name}; resumed bitwise")


@pytest.mark.slow
def test_sigusr1_checkpoints_marks_preempted_and_exits_zero(reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = h.start(run_dir, 2, DROP)
    h.wait_for(lambda: max(h.losses(run_dir), default=0) >= 3, proc=proc)
    for pid in h.rank_pids(proc):
        os.kill(pid, signal.SIGUSR1)
    assert h.wait(proc) == 0, h.log_text(proc)[-3000:]
    text = h.log_text(proc)
    assert "stop requested (SIGUSR1)" in text
    stopped = int((run_dir / ".preempted").read_text())
    assert 3 <= stopped < STEPS
    assert h.latest_checkpoint(run_dir).name == f"step-{stopped:08d}"
    verify_checkpoint(h.latest_checkpoint(run_dir))
    assert max(h.losses(run_dir)) == stopped
    assert not (run_dir / ".done").exists()
    assert '"preempted": true' in (run_dir / "result.json").read_text()

    proc = h.run(run_dir, 2, DROP)
    assert _resumed_step(proc) == stopped
    _assert_bitwise_same_run(run_dir, reference)


@pytest.mark.slow
def test_async_checkpoints_resume_bitwise_after_kill_and_stop_file(reference, tmp_path):
    """checkpoint.async_save=true: the step-2 save is written in the background and committed
    at the next save (step 4). SIGKILL at step 3 leaves only step-00000002.tmp. Then a STOP
    file stops a restarted run cleanly, and a third run finishes: all bitwise."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    opts = [*DROP, "checkpoint.async_save=true"]
    proc = h.start(run_dir, 2, opts)
    h.wait_for(lambda: 3 in h.losses(run_dir), interval=0.002, proc=proc)
    h.kill_group(proc)
    if 4 not in h.losses(run_dir):  # the kill landed before step 4 saved (and so committed) step 2
        assert not (ckpts / "step-00000002").exists()
        assert not h.checkpoints(run_dir)
        assert not (ckpts / "latest").exists()

    proc = h.start(run_dir, 2, opts)
    start = _resumed_step(proc) or 0
    h.wait_for(lambda: max(h.losses(run_dir), default=0) >= max(start, 4) + 1, proc=proc)
    (run_dir / "STOP").touch()
    assert h.wait(proc) == 0, h.log_text(proc)[-3000:]
    assert "stop requested (STOP)" in h.log_text(proc)
    stopped = int((run_dir / ".preempted").read_text())
    assert h.latest_checkpoint(run_dir).name == f"step-{stopped:08d}"  # committed before exit
    assert not [p for p in ckpts.glob("*.tmp") if _step_of(p) > 3]  # only launch 1's leftover, if any

    proc = h.run(run_dir, 2, opts)
    assert _resumed_step(proc) == stopped
    assert not (run_dir / "STOP").exists()
    _assert_bitwise_same_run(run_dir, reference)
    # async and sync checkpoints hold the same bytes of state
    h.assert_weights_equal(h.load_weights(ckpts / "step-00000008", ""),
                           h.load_weights(reference / "checkpoints" / "step-00000008", ""))


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 4])
def test_resume_two_process_checkpoint_on_other_world_size(nproc, tmp_path):
    """fp32, dropout 0: a 2-process checkpoint at step 2 resumed on 1 or 4 processes continues
    the 2-process trajectory (DCP reshards model and optimizer; the sampler is re-cut at the
    step boundary; ranks without a saved RNG stream are reseeded)."""
    ref = h.shared_run(2, FP32)
    run_dir = h.copy_run(ref, tmp_path / "run", checkpoints_upto=2)
    proc = h.run(run_dir, nproc, FP32, timeout=300)
    assert re.search(r"resumed from \S+step-00000002 at step 2 \(saved with world size 2, now %d\)" % nproc,
                     h.log_text(proc)), h.log_text(proc)[-3000:]
    loss, ref_loss = h.losses(run_dir), h.losses(ref)
    assert sorted(loss) == [1, 2, 3, 4]
    for s in (3, 4):
        assert loss[s] == pytest.approx(ref_loss[s], abs=1e-5)
    w, w_ref = h.load_weights(h.latest_checkpoint(run_dir)), h.load_weights(h.latest_checkpoint(ref))
    assert h.max_abs_diff(w, w_ref) < 1e-5
    st = h.trainer_state(h.latest_checkpoint(run_dir))
    assert st["world_size"] == nproc and st["state"]["sampler"]["world_size"] == nproc and st["step"] == 4
    if nproc == 4:
        assert "no saved RNG state" in (run_dir / "logs" / "rank-3.log").read_text()


def _corrupt(ckpt: Path, how: str) -> None:
    if how == "truncated_shard":
        shard = sorted(ckpt.glob("*.distcp"))[-1]
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif how == "flipped_byte":  # same size, one byte of tensor data changed: only the checksum sees it
        shard = sorted(ckpt.glob("*.distcp"))[-1]
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x10]))
    elif how == "edited_state":  # still valid JSON, one number changed: the seal sees it
        state_file = ckpt / "trainer_state.json"
        state = json.loads(state_file.read_text())
        state["state"]["progress"]["tokens_seen"] += 1
        state_file.write_text(json.dumps(state, indent=1))
    elif how == "missing_metadata":
        (ckpt / ".metadata").unlink()
    elif how == "garbage_state":
        (ckpt / "trainer_state.json").write_bytes(b"\x80\x04garbage{")
    elif how == "garbage_metadata":  # same size, unreadable: DCP's reader must refuse it
        meta = ckpt / ".metadata"
        meta.write_bytes(b"\0" * meta.stat().st_size)
    else:
        raise ValueError(how)


@pytest.mark.slow
@pytest.mark.parametrize("how,message", [
    ("flipped_byte", r"file __1_0\.distcp does not match its recorded sha256 \(corrupted on disk\)"),
    ("edited_state", r"trainer_state\.json does not match its seal"),
    ("truncated_shard", r"\.distcp has \d+ bytes, expected \d+ \(truncated"),
    ("missing_metadata", r"DCP \.metadata is missing"),
    ("garbage_state", r"trainer_state\.json is corrupt"),
    ("garbage_metadata", r"DCP metadata unreadable"),
])
def test_corrupt_checkpoint_is_refused_and_previous_used(how, message, tmp_path):
    ref = h.shared_run(2, FP32)
    run_dir = h.copy_run(ref, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    bad = ckpts / "step-00000004"
    _corrupt(bad, how)
    if how == "flipped_byte":  # the structural check passes; the checksums refuse it
        verify_checkpoint(bad)
        assert find_latest(ckpts)[0] == bad
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(bad, contents=True)
    chosen, problems = find_latest(ckpts, contents=True)
    assert chosen == ckpts / "step-00000002"
    assert len(problems) == 1 and re.search(message, problems[0]) and str(bad) in problems[0]
    # An explicit trainer.resume=<path> to a bad checkpoint is an error, not a silent fallback.
    with pytest.raises(CheckpointError, match=message):
        Checkpointer(ckpts, rank=0).resolve(str(bad))
    assert Checkpointer(ckpts, rank=0).resolve("auto") == ckpts / "step-00000002"


@pytest.mark.slow
def test_training_resumes_from_previous_when_latest_is_corrupt(tmp_path):
    """End to end: one byte of the latest checkpoint's shard is flipped (same size); the
    restarted 2-rank run checks every file's SHA-256 (the ranks sharing the files), refuses it
    naming the file, records the event, resumes from the one before, and ends with weights
    bitwise equal to the uninterrupted run's."""
    ref = h.shared_run(2, FP32)
    run_dir = h.copy_run(ref, tmp_path / "run", checkpoints_upto=4)  # drops .done and result.json
    _corrupt(run_dir / "checkpoints" / "step-00000004", "flipped_byte")
    proc = h.run(run_dir, 2, FP32)
    text = h.log_text(proc)
    assert re.search(r"WARNING .*checkpoint refused: \S+step-00000004: file __1_0\.distcp does not match its "
                     r"recorded sha256", text), text[-3000:]
    assert "not the newest checkpoint" in text
    assert _resumed_step(proc) == 2
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"kind": "event"' in line]
    assert [(e["event"], e["step"]) for e in events] == [("checkpoint_refused", 2)]
    assert "__1_0.distcp" in events[0]["detail"]
    h.assert_weights_equal(h.load_weights(h.latest_checkpoint(run_dir)),
                           h.load_weights(h.latest_checkpoint(ref)))
    assert h.losses(run_dir) == h.losses(ref)
    # the new run's checkpoints carry checksums that verify
    verify_checkpoint(h.latest_checkpoint(run_dir), contents=True)


@pytest.mark.slow
def test_resumed_at_final_step_evaluates_and_finishes(tmp_path):
    ref = h.shared_run(2, FP32)
    run_dir = h.copy_run(ref, tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_text()
    eval_csv = h.REPO.parent / "shared" / "fixtures" / "arena" / "eval.csv"
    proc = h.run(run_dir, 1, [*FP32, f"data.eval_path={eval_csv}"])
    text = h.log_text(proc)
    assert "nothing left to train" in text
    after = (run_dir / "metrics.jsonl").read_text()
    assert after.startswith(before)
    assert h.losses(run_dir) == h.losses(ref)  # no step retrained
    assert '"steps": 4' in (run_dir / "result.json").read_text()
    assert "eval_log_loss" in (run_dir / "result.json").read_text()
    assert (run_dir / ".done").exists()
    h.assert_weights_equal(h.load_weights(h.latest_checkpoint(run_dir)),
                           h.load_weights(h.latest_checkpoint(ref)))


def test_rng_entry_saved_on_another_device_kind_loads(tmp_path, monkeypatch):
    """In process (world of one): a checkpoint whose RNG entry is longer than this device's
    (a CUDA run stores CPU + CUDA state) loads on CPU, restoring the CPU part exactly."""
    import torch
    import torch.distributed as dist

    import trainer.checkpoint as ck

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        torch.manual_seed(123)
        expected = torch.get_rng_state()
        monkeypatch.setattr(ck, "_rng_state", lambda device: torch.cat([torch.get_rng_state(),
                                                                         torch.full((16,), 7, dtype=torch.uint8)]))
        cp = Checkpointer(tmp_path / "ckpts", rank=0)
        cp.save(1, model, opt, {}, {"seed": 0})
        monkeypatch.undo()
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(999)
        with torch.no_grad():
            model.weight.zero_()
        state = cp.load(tmp_path / "ckpts" / "step-00000001", model, opt, {})
        assert state["step"] == 1
        assert torch.equal(torch.get_rng_state(), expected)
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights[k])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["load", "eval", "save", "async_save"])
def test_a_signal_at_any_moment_ends_at_a_committed_step_and_resumes_bitwise(moment, tmp_path):
    """SIGUSR1 to both ranks while the data loads, during an evaluation, between a checkpoint's
    write and its commit, and while an async save writes in the background (then a second
    signal, SIGTERM, during the same save). The process is held at that point
    (ARENA_TRAINER_PAUSE_AT) so the signal lands there. Every run exits 0 with a committed,
    verified checkpoint at a step boundary and `.preempted`, and the restarted run ends bitwise
    equal to an uninterrupted one with the same options."""
    from trainer.runtime import PAUSE_ENV

    eval_csv = h.REPO.parent / "shared" / "fixtures" / "arena" / "eval.csv"
    opts = {"load": DROP, "save": DROP, "async_save": [*DROP, "checkpoint.async_save=true"],
            "eval": [*DROP, f"data.eval_path={eval_csv}", "data.limit_eval_rows=16", "trainer.eval_every=2"]}[moment]
    reference = h.shared_run(2, opts if moment == "eval" else DROP)  # async saves hold the same bytes
    run_dir = tmp_path / "run"
    point = "save" if moment == "async_save" else moment
    proc = h.start(run_dir, 2, opts, env={PAUSE_ENV: f"{point}=1.5"})
    rank0_log = run_dir / "logs" / "rank-0.log"
    h.wait_for(lambda: rank0_log.is_file() and f"pausing at {point}" in rank0_log.read_text(), proc=proc)
    for pid in h.rank_pids(proc):
        os.kill(pid, signal.SIGUSR1)
    if point == "save":  # a second signal while the same save is still in progress
        time.sleep(0.3)
        for pid in h.rank_pids(proc):
            os.kill(pid, signal.SIGTERM)
    assert h.wait(proc) == 0, h.log_text(proc)[-3000:]
    stopped = int((run_dir / ".preempted").read_text())
    assert stopped >= 1 and h.latest_checkpoint(run_dir).name == f"step-{stopped:08d}"
    verify_checkpoint(h.latest_checkpoint(run_dir), contents=True)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    if moment == "load":
        assert stopped == 1  # the signal came before any step: the first step ends the run

    proc = h.run(run_dir, 2, opts)
    assert _resumed_step(proc) == stopped
    _assert_bitwise_same_run(run_dir, reference)
