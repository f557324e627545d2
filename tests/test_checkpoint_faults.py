"""A full disk: a save the filesystem cannot hold is refused before a byte is written (the
pre-flight check), and one that runs out of space mid-write (a quota statvfs does not show)
fails cleanly: every rank raises, the partial ``.tmp`` is removed, the previous checkpoint and
``latest`` stay as they were and load. Real filesystems: a small tmpfs mounted per test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import dist_helpers as h
from trainer.checkpoint import Checkpointer, CheckpointError, verify_checkpoint


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of ``size`` MiB at tmp_path/fs (needs root: mount)."""
    mounted = []

    def make(size_mib: int) -> Path:
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:120]})")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights + 8 MiB of AdamW moments
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("preflight", [True, False], ids=["refused-before-writing", "enospc-mid-write"])
def test_full_disk_keeps_the_previous_checkpoint(small_fs, preflight):
    root = small_fs(20) / "checkpoints"
    model, opt = _model()
    cp = Checkpointer(root, rank=0)
    cp.preflight = preflight
    cp.save(1, model, opt, {}, {"seed": 0})
    before = (root / "step-00000001" / "trainer_state.json").read_bytes()
    saved_weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(CheckpointError) as err:
        cp.save(2, model, opt, {}, {"seed": 0})
    msg = str(err.value)
    assert f"checkpoint {root / 'step-00000002'} not saved" in msg
    assert f"the previous checkpoint {root / 'step-00000001'} is intact" in msg
    assert ("it needs ~0.01 GB and" in msg) if preflight else ("No space left on device" in msg and "needs ~" in msg)
    assert err.value.collective
    # nothing half-written is left; the previous checkpoint and `latest` are as they were, and load
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert (root / "step-00000001" / "trainer_state.json").read_bytes() == before
    verify_checkpoint(root / "step-00000001", contents=True)
    fresh, fresh_opt = _model()
    with torch.no_grad():
        fresh.weight.zero_()
    cp.load(root / "step-00000001", fresh, fresh_opt, {})
    assert torch.equal(fresh.weight, saved_weight)


def test_resaving_a_step_never_leaves_it_missing(small_fs):
    """The end of training right after a periodic save re-saves that step: the new copy is
    written beside the old one and swapped in, so a failure keeps the old one."""
    for size, fits in ((30, True), (20, False)):
        root = small_fs(size) / "checkpoints"
        model, opt = _model()
        cp = Checkpointer(root, rank=0)
        cp.preflight = False  # let the second write really run out of space
        cp.save(1, model, opt, {}, {"seed": 0})
        if fits:
            cp.save(1, model, opt, {}, {"seed": 0})
        else:
            with pytest.raises(CheckpointError, match="No space left on device"):
                cp.save(1, model, opt, {}, {"seed": 0})
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
        verify_checkpoint(root / "step-00000001", contents=True)


@pytest.mark.slow
def test_two_rank_run_on_a_full_disk_exits_2_naming_the_space(small_fs):
    """2 gloo ranks, TINY model (~98 MB per checkpoint) on a 160 MiB filesystem: the step-2
    checkpoint fits, the step-4 one does not. Every rank stops (no hang) with exit code 2 (torchrun
    itself then exits 1) and one line naming the path and the space; step 2 is intact."""
    run_dir = small_fs(160) / "run"
    proc = h.run(run_dir, 2, ["trainer.max_steps=6"], check=False, timeout=180)
    text = h.log_text(proc)
    assert proc.returncode == 1 and "failed (exitcode: 2)" in text, text[-3000:]
    errors = [x for x in h.log_text(proc).splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "checkpoint " in errors[0] and "step-00000004 not saved: it needs ~0.10 GB" \
        in errors[0] and "the previous checkpoint" in errors[0], errors
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002"]
    verify_checkpoint(ckpts / "step-00000002", contents=True)
