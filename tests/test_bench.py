"""bench.run in its smallest mode, so the benchmarks cannot rot. No timing assertions: figures must exist and be
numbers; whether they are good is docs/benchmarks.md's business."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from bench import run as bench_run

ROW_KEYS = {"name", "ours", "alternative", "ratio", "limit", "unit"}


def _numeric(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def test_smoke_runs_every_benchmark_and_prints_the_table(repo_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--json", str(out)], cwd=repo_dir,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "smoke" and set(res["benchmarks"]) == set(bench_run.BENCHMARKS)
    table_lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for bench, (module, _) in bench_run.BENCHMARKS.items():
        got = res["benchmarks"][bench]
        assert got["rows"], bench
        assert any(line.startswith(f"| {bench} |") for line in table_lines), bench
        if bench == "gpu" and not torch.cuda.is_available():
            assert [r["status"] for r in got["rows"]] == ["skipped"] and "CUDA" in got["rows"][0]["note"]
            continue
        if importlib.util.find_spec(module) is None:  # being written elsewhere: must say so, not vanish
            assert got["status"] == "not available", bench
            continue
        assert got["status"] == "ok", (bench, got)
        for r in got["rows"]:
            assert ROW_KEYS <= set(r), r
            if r["status"] == "ok":  # a figure with no alternative (e.g. checkpoint load time) may leave it out
                assert _numeric(r["ours"]), r
                assert all(_numeric(r[k]) or r[k] is None for k in ("alternative", "ratio")), r
        assert any(all(_numeric(r[k]) for k in ("ours", "alternative", "ratio")) for r in got["rows"]), bench


def test_only_subset_json_and_unknown_name(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    rc = bench_run.main(["--smoke", "--only", "gpu", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["benchmarks"]) == ["gpu"] and "| gpu |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench_run.main(["--only", "gpu,nope"])
    assert e.value.code == 2


def test_missing_module_is_not_available_and_a_failure_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "bench_fake_broken.py").write_text("def run(quick=True):\n    raise RuntimeError('boom')\n")
    (tmp_path / "bench_fake_ok.py").write_text(
        "def run(quick=True, smoke=False):\n"
        "    return [dict(name='x', ours=2.0, alternative=1.0, ratio=2.0, limit=None, unit='u', smoke=smoke)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(bench_run, "BENCHMARKS", {"absent": ("bench_fake_absent", ""),
                                                  "broken": ("bench_fake_broken", ""),
                                                  "fine": ("bench_fake_ok", "")})
    assert bench_run.run_one("absent", "smoke")["status"] == "not available"
    broken = bench_run.run_one("broken", "smoke")
    assert broken["status"] == "error" and "boom" in broken["rows"][0]["note"]
    fine = bench_run.run_one("fine", "smoke")
    assert fine["status"] == "ok" and fine["rows"][0]["smoke"] is True
    assert bench_run.main(["--smoke", "--only", "fine,broken"]) == 1  # a broken benchmark fails the run


def test_gpu_benchmark_code_path_on_cpu():
    """bench_gpu's step/timing/MFU code on a tiny CPU model (the real run needs CUDA and was never lent one)."""
    from bench import bench_gpu

    rows = bench_gpu.bench_shape("tiny", "smoke", "reference", torch.device("cpu"))
    tput = rows[0]
    assert _numeric(tput["ours"]) and _numeric(tput["alternative"]) and tput["limit"] >= 1.0
    assert "HF attn eager" in tput["note"]  # transformers' Gemma 2 has no sdpa; no flash-attn here
    assert rows[1]["status"] == "skipped"  # no bf16 peak for a CPU: MFU is not reported
