"""Checkpointable state listed once: every non-tensor piece is a Stateful handed to the
checkpointer as one mapping, saved as JSON and restored exactly; wave-1 checkpoints (format 1,
one key per piece) still load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from trainer.checkpoint import Checkpointer
from trainer.data.sampler import TokenBudgetSampler
from trainer.errors import CheckpointError
from trainer.metrics import LossBuffer
from trainer.tracking import MetricsLogger
from trainer.train import TrainProgress


@pytest.fixture
def world(tmp_path):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _states(tmp_path, opt, sampler_pos=(0, 0), losses=(), progress=(0, 0, 0), run_id=None):
    sampler = TokenBudgetSampler(list(range(10, 50)), global_batch_rows=8, max_tokens=200, seed=3)
    sampler.set_position(*sampler_pos)
    buf = LossBuffer(4)
    for x in losses:
        buf.push(x)
    logger = MetricsLogger(tmp_path, rank=0, wandb_cfg=None, start=False)
    logger.run_id = run_id
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for _ in range(progress[0]):
        opt.step()
        scheduler.step()
    return {"progress": TrainProgress(*progress), "sampler": sampler, "loss_buffer": buf, "scheduler": scheduler,
            "logger": logger}


def test_states_round_trip_exactly_through_json(world, tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    losses = [1.0986122886681098, 0.1 + 0.2, 1e-300, 2.5, 1 / 3]  # a wrap-around, and floats JSON must keep
    saved = _states(tmp_path, opt, (1, 3), losses, (7, 1234, 56), "abc123")
    cp = Checkpointer(tmp_path / "ckpts", rank=0)
    cp.save(7, model, opt, saved, {"seed": 3})
    fresh = _states(tmp_path, opt)
    meta = cp.load(tmp_path / "ckpts" / "step-00000007", model, opt, fresh)
    assert meta["step"] == 7 and meta["seed"] == 3 and meta["format"] == 3
    assert fresh["progress"] == TrainProgress(7, 1234, 56)
    assert (fresh["sampler"].epoch, fresh["sampler"].step) == (1, 3)
    assert fresh["loss_buffer"].state_dict()["values"].tolist() == losses[-4:]  # bitwise
    assert fresh["loss_buffer"].mean() == saved["loss_buffer"].mean()
    assert fresh["logger"].run_id == "abc123" and fresh["scheduler"].last_epoch == 7
    with pytest.raises(CheckpointError, match=r"no state for \['extra'\]"):
        cp.load(tmp_path / "ckpts" / "step-00000007", model, opt, {**fresh, "extra": TrainProgress()})


def test_a_format_1_checkpoint_still_loads(world, tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    cp = Checkpointer(tmp_path / "ckpts", rank=0)
    cp.save(4, model, opt, _states(tmp_path, opt, (0, 4), [0.5, 0.25], (4, 99, 32), "run0001"), {"seed": 3})
    path = tmp_path / "ckpts" / "step-00000004" / "trainer_state.json"
    new = json.loads(path.read_text())
    s = new["state"]
    # wave 1: one key per piece, no checksums or seal
    old = {k: v for k, v in new.items() if k not in ("state", "format", "seal", "checksums")}
    old.update(s["progress"], sampler=s["sampler"], loss_buffer=s["loss_buffer"], scheduler=s["scheduler"],
               wandb_run_id=s["logger"]["wandb_run_id"])
    path.write_text(json.dumps(old))
    fresh = _states(tmp_path, opt)
    cp.load(path.parent, model, opt, fresh)
    assert fresh["progress"] == TrainProgress(4, 99, 32) and fresh["sampler"].step == 4
    assert fresh["loss_buffer"].mean() == 0.375 and fresh["logger"].run_id == "run0001"
    assert fresh["scheduler"].last_epoch == 4


def test_logger_state_is_restored_before_it_starts(tmp_path):
    logger = MetricsLogger(tmp_path, rank=0, wandb_cfg={"mode": "disabled"}, start=False)
    logger.load_state_dict({"wandb_run_id": "keepme"})
    logger.start()
    assert logger.run_id == "keepme" and logger.resumed
    with pytest.raises(RuntimeError, match="before start"):
        logger.load_state_dict({"wandb_run_id": "other"})
    logger.finish()
