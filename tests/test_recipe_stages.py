"""The recipe's three stages on CPU, end to end (issue 17, docs/recipe.md).

Stage 1 trains two teachers (cpu_demo_stage1, seeds 0 and 1) on labelled rows; launch.predict
averages their A/B-swap-TTA probabilities into pseudo-labels for an unlabelled pool
(out_format=train); stage 2 (cpu_demo_stage2) trains on that file; its export starts stage 3
(cpu_demo_stage3) on the labelled rows. Each stage's eval metrics land in its run directory.
The same teachers write teacher_<class> columns beside the labels (out_format=teacher) for a
loss.kind=distill run, whose teacher_weight=0 twin is the CE run bitwise.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scratch
from launch.export import main as export_main
from launch.predict import main as predict_main
from trainer.config import compose
from trainer.train import run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

SMALL = ["data.max_length=256", "data.max_tokens=2048", "data.global_batch_rows=16", "data.limit_eval_rows=24",
         "model.hidden_size=32", "model.intermediate_size=64", "model.head_dim=16", "model.query_pre_attn_scalar=16",
         "trainer.eval_every=null", "checkpoint.every_steps=null", "trainer.num_threads=1", "trainer.resume=never",
         "logging.progress_bar=false"]
TEXT = ("id", "model_a", "model_b", "prompt", "response_a", "response_b")
WINNERS = ("winner_model_a", "winner_model_b", "winner_tie")


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _train(experiment: str, run_dir: Path, *extra: str):
    overrides = [f"+experiment={experiment}", *SMALL, f"trainer.run_dir={run_dir}", *extra]
    if experiment.endswith("stage3"):  # the architecture comes from the export
        overrides = [o for o in overrides if not o.startswith(("model.hidden", "model.inter", "model.head_dim",
                                                               "model.query"))]
    result = run(compose(overrides))
    summary = json.loads((run_dir / "result.json").read_text())
    assert result.steps > 0 and result.checkpoint is not None
    assert {"eval_log_loss", "eval_accuracy", "eval_macro_f1"} <= set(summary), summary  # metrics in the run dir
    assert np.isfinite(summary["eval_log_loss"])
    return result, summary


@pytest.fixture(scope="module")
def stage1(request, tmp_path_factory, arena_dir):
    d = scratch.module_dir(request, tmp_path_factory, "recipe")
    teachers = [_train("cpu_demo_stage1", d / f"stage1-seed{s}", "data.limit_train_rows=48", f"trainer.seed={s}")[0]
                for s in (0, 1)]
    # the unlabelled pool: other rows of the shared train file, without their labels
    rows = _csv(arena_dir / "train.csv")[200:232]
    pool = d / "pool.csv"
    with open(pool, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if c not in WINNERS])
        w.writeheader()
        w.writerows({k: v for k, v in r.items() if k not in WINNERS} for r in rows)
    return d, teachers, pool


def test_three_stages_end_to_end(stage1, arena_dir):
    d, teachers, pool = stage1
    runs = [str(t.run_dir) for t in teachers]

    # pseudo-labels: the two teachers' averaged (TTA) probabilities in the label columns
    pseudo = d / "pseudo.csv"
    res = predict_main([f"checkpoint=[{runs[0]},{runs[1]}]", f"data.test_path={pool}", f"out={pseudo}",
                        "out_format=train"])
    assert res["tta"] is True and res["rows"] == 32 and res["written"] == 32 and len(res["checkpoint"]) == 2
    src, out = _csv(pool), _csv(pseudo)
    assert list(out[0]) == list(src[0]) + list(WINNERS)  # every input column kept, labels appended
    assert [{k: r[k] for k in TEXT} for r in out] == [{k: r[k] for k in TEXT} for r in src]
    probs = np.array([[float(r[c]) for c in WINNERS] for r in out])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    singles = []
    for k, path in enumerate(runs):  # each teacher alone, as a submission
        predict_main([f"checkpoint={path}", f"data.test_path={pool}", f"out={d / f'single{k}.csv'}"])
        singles.append(np.array([[float(r[c]) for c in WINNERS] for r in _csv(d / f"single{k}.csv")]))
    np.testing.assert_allclose(probs, (singles[0] + singles[1]) / 2, atol=1e-7)
    assert np.abs(singles[0] - singles[1]).max() > 1e-3  # two different teachers really were averaged
    weighted = d / "weighted.csv"
    predict_main([f"checkpoint=[{runs[0]},{runs[1]}]", "weights=[3,1]", f"data.test_path={pool}", f"out={weighted}"])
    np.testing.assert_allclose(np.array([[float(r[c]) for c in WINNERS] for r in _csv(weighted)]),
                               0.75 * singles[0] + 0.25 * singles[1], atol=1e-7)

    # the same ensemble under torchrun (rows split over 2 ranks): the same file to float precision
    dist = d / "pseudo-2ranks.csv"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "launch.predict", f"checkpoint=[{runs[0]},{runs[1]}]", f"data.test_path={pool}",
                           f"out={dist}", "out_format=train"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _csv(dist)
    assert [{k: r[k] for k in TEXT} for r in two] == [{k: r[k] for k in TEXT} for r in src]
    np.testing.assert_allclose(np.array([[float(r[c]) for c in WINNERS] for r in two]), probs, atol=1e-6)

    # stage 2 on the pseudo-labelled pool, evaluated on the labelled eval file
    stage2, _ = _train("cpu_demo_stage2", d / "stage2", f"data.train_path={pseudo}")
    assert stage2.steps == 4  # 32 rows and their twins, 16 rows per step
    export = d / "stage2-export"
    export_main([f"checkpoint={stage2.run_dir}", f"out={export}"])

    # stage 3 starts from the stage-2 export and fine-tunes on labelled rows
    stage3, _ = _train("cpu_demo_stage3", d / "stage3", f"model.name_or_path={export}", "data.limit_train_rows=48")
    state = json.loads((stage3.checkpoint / "trainer_state.json").read_text())
    assert state["model"]["name_or_path"] == str(export)
    log = (stage3.run_dir / "logs").glob("*.log")
    assert any(str(export) in p.read_text() for p in log)


def test_distillation_from_teacher_columns(stage1, arena_dir):
    d, teachers, _ = stage1
    runs = [str(t.run_dir) for t in teachers]
    labelled = d / "labelled.csv"  # 40 labelled rows of the shared file
    rows = _csv(arena_dir / "train.csv")[300:340]
    with open(labelled, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with_teacher = d / "with-teacher.csv"
    res = predict_main([f"checkpoint=[{runs[0]},{runs[1]}]", f"data.test_path={labelled}", f"out={with_teacher}",
                        "out_format=teacher", "data.on_bad_row=skip"])
    out = _csv(with_teacher)
    assert res["written"] == len(out) == 40 and list(out[0])[-3:] == ["teacher_a", "teacher_b", "teacher_tie"]
    assert all(r[c] == s[c] for r, s in zip(out, _csv(labelled)) for c in WINNERS)  # the labels are kept
    base = ["data.limit_train_rows=32", "trainer.max_steps=2", f"data.train_path={with_teacher}",
            "data.limit_eval_rows=8"]
    ce = _train("cpu_demo_stage1", d / "ce", *base)[1]
    zero = _train("cpu_demo_stage1", d / "distill0", *base, "loss.kind=distill", "loss.teacher_weight=0")[1]
    half = _train("cpu_demo_stage1", d / "distill", *base, "loss.kind=distill", "loss.teacher_weight=0.5",
                  "loss.temperature=2")[1]
    losses = {name: [json.loads(x).get("loss_step") for x in (d / name / "metrics.jsonl").read_text().splitlines()
                     if "loss_step" in x] for name in ("ce", "distill0", "distill")}
    assert losses["distill0"] == losses["ce"] and zero["eval_log_loss"] == ce["eval_log_loss"]  # bitwise
    assert losses["distill"] != losses["ce"] and np.isfinite(half["eval_log_loss"])
