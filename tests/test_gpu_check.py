"""The GPU check cannot rot: its CPU self-test runs every part's code path here, a failing part
does not stop the others, and the carried wheels install without an index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _report(out: Path) -> dict:
    report = json.loads((out / "gpu-check.json").read_text())
    assert (out / "gpu-check.md").read_text().startswith(f"GPU check ({report['mode']})")
    assert (out / "gpu-check.log").stat().st_size > 0
    return report


@pytest.mark.slow
def test_cpu_selftest_runs_every_part_within_its_budget(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the suite, wherever its venv is
    proc = subprocess.run(["bash", "scripts/gpu-check.sh", "--cpu-selftest", str(out)], cwd=REPO, text=True,
                          capture_output=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = _report(out)
    assert report["mode"] == "cpu-selftest"
    parts = {p["part"]: p for p in report["parts"]}  # a part over its budget is killed: status "timeout"
    assert list(parts) == ["env", "cuda_tests", "parity", "train", "train_compiled", "bench_2b", "bench_9b", "lora",
                           "planner"]
    ok = ("env", "parity", "train", "train_compiled", "bench_2b", "lora", "planner")
    assert {p: parts[p]["status"] for p in ok} == dict.fromkeys(ok, "ok")
    assert parts["cuda_tests"]["status"] == "skipped"  # collected and skipped cleanly without CUDA
    rows = {r["metric"]: r for p in report["parts"] for r in p["rows"]}
    assert rows["tests skipped"]["value"] > 0 and rows["tests failed"]["value"] == 0
    assert rows["flex vs reference logits, float32"]["value"] < 1e-5
    # the async save at step 3 committed, and a fresh process replayed steps 4-5 bitwise
    assert rows["async DCP checkpoints committed"]["value"] == ["step-00000003"]
    assert rows["reload: resumed steps"]["value"] == [4, 5]
    assert rows["reload: max |loss diff| vs the uninterrupted run"]["value"] == 0
    assert rows["compiled vs eager: max |loss diff|"]["value"] < 1e-5
    assert rows["eager: tokens/s/GPU"]["value"] > 0 and rows["compiled: tokens/s/GPU"]["value"] > 0
    assert "| train | ok" in proc.stdout  # the table is printed
    # QLoRA through the real trainer: three finite losses, the adapter's share of the parameters
    assert len(rows["qlora: losses"]["value"]) == 3
    trainable, total = map(int, rows["qlora: trainable / total params"]["value"].split(" / "))
    assert 0 < trainable < 0.01 * total


def test_a_failing_part_is_reported_and_the_rest_still_run(tmp_path):
    # GPU mode on a machine without CUDA: parity fails (no device), env and planner (no device needed) report.
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--only", "env,parity,planner",
                           "--budget", "planner=180"],  # its GPU budget is for a GPU machine's warm caches
                          cwd=REPO, text=True, capture_output=True, timeout=200)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = {p["part"]: p for p in _report(out)["parts"]}
    assert [parts[p]["status"] for p in ("env", "parity", "planner")] == ["ok", "fail", "ok"]
    assert "no CUDA device" in parts["parity"]["note"]
    assert any(r["metric"] == "torch" for r in parts["env"]["rows"])
    assert "[gpu-check] parity: fail" in proc.stdout and "| planner | ok" in proc.stdout


def test_a_part_over_its_budget_is_killed_and_reported(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--cpu-selftest", "--out", str(out),
                           "--only", "parity,planner", "--budget", "parity=1"], cwd=REPO, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = {p["part"]: p for p in _report(out)["parts"]}
    assert parts["parity"]["status"] == "timeout" and parts["parity"]["budget_s"] == 1
    assert parts["parity"]["elapsed_s"] < 10  # killed at its budget, not left to finish
    assert parts["planner"]["status"] == "ok"


def test_unknown_part_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--only", "trian"],
                          cwd=REPO, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "unknown part(s) ['trian']" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--budget", "train:200"],
                          cwd=REPO, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "expected PART=SECONDS" in proc.stderr


@pytest.mark.slow
def test_carried_wheels_install_without_an_index(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu-wheels.sh"], cwd=REPO, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    names = [w.name.split("-")[0].lower() for w in wheels]
    assert names == ["antlr4_python3_runtime", "hydra_core", "omegaconf", "submitit", "torchao"]  # one of each
    assert all(w.name.endswith("-py3-none-any.whl") for w in wheels if not w.name.startswith("torchao"))
    assert "-cp310-abi3-" in wheels[-1].name  # loads on the GPU machines' Python 3.12
    assert sum(w.stat().st_size for w in wheels) < 8 * 2**20
    for w in wheels:
        zipfile.ZipFile(w).testzip()
    assert (REPO / ".whl/shared/fixtures/gemma2-tokenizer/tokenizer.model").is_file()
    assert sum(f.stat().st_size for f in (REPO / ".whl").rglob("*") if f.is_file()) < 32 * 2**20
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, wheels)], check=True, timeout=120)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import hydra, omegaconf, antlr4, submitit, torchao; "
             "from trainer.adapters import nf4; import torch; w = torch.randn(64, 256); "
             "print(hydra.__file__, omegaconf.__file__, submitit.__file__, torchao.__file__, hydra.__version__, "
             "omegaconf.__version__, float((nf4.dequantize(nf4.to_nf4(w)) - w).norm() / w.norm()))")
    out = subprocess.run([sys.executable, "-c", probe, str(site)], check=True, text=True, capture_output=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.count(str(site)) == 4, out
    assert 0 < float(out.split()[-1]) < 0.15, out  # the carried torchao quantises
    assert "1.3.8 2.3.1" in out
