"""The Arena path trains bitwise as it did before the wave-2 refactor (seams for build, task,
state, logging): losses, gradient norms and eval log losses recorded from the old code
(tests/data/arena_pinned.json) must come out identical, on 1 process and on 2 under torchrun,
with the torch release they were recorded with (2.13); within 1e-6 relative on another one.

The config exercises everything the refactor moved: Arena rows and judge prompt through the
task, A/B-swap augmentation, dropout (per-rank RNG streams), the packed collator and the model's
inputs, the token-budget sampler, FSDP2, AnyPrecisionAdamW, the loss normaliser, evaluation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PINNED = json.loads((REPO / "tests" / "data" / "arena_pinned.json").read_text())


def _run(tmp_path: Path, nproc: int) -> dict[str, list]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([*launcher, "-m", "launch.train", *PINNED["overrides"], f"trainer.run_dir={tmp_path}/run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss_step" in r]
    return {"loss_step": [r["loss_step"].hex() for r in train],
            "grad_norm": [r["grad_norm"].hex() for r in train],
            "eval_log_loss": [[r["step"], r["eval/log_loss"].hex()] for r in rows if "eval/log_loss" in r]}


def _same_torch_as_the_pin() -> bool:
    import torch

    return torch.__version__.startswith(PINNED["torch"] + ".")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_arena_losses_bitwise_equal_to_the_pre_refactor_code(tmp_path, nproc):
    got, want = _run(tmp_path, nproc), PINNED["runs"][str(nproc)]
    assert len(want["loss_step"]) == 8 and len(want["eval_log_loss"]) == 3  # 2 evals + the summary row
    if not _same_torch_as_the_pin():
        # Another torch release has other CPU kernels (seen: 2.11 differs from 2.13 by ~1e-8
        # relative): bitwise is a claim about one torch; across releases the numbers stay close.
        for key in ("loss_step", "grad_norm"):
            a, b = [float.fromhex(x) for x in got[key]], [float.fromhex(x) for x in want[key]]
            assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-6, (key, a, b)
        return
    for key in want:
        assert got[key] == want[key], (f"{key} differs from the pre-refactor run: " +
                                       str([(float.fromhex(a), float.fromhex(b)) for a, b in
                                            zip(got[key], want[key]) if a != b][:3] if key != "eval_log_loss"
                                           else (got[key], want[key])))
