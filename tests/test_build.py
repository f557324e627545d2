"""The build seam: the architecture that trained is the one that loads (recorded in the
checkpoint, rebuilt strictly, overrides that contradict it refused), kernels resolved once,
parallelize's order, and a resume that refuses another task or architecture."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import scratch
import text_data
from trainer.config import compose
from trainer.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
EVAL_CSV = REPO.parent / "shared" / "fixtures" / "arena" / "eval.csv"


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _launch(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)


# ---- a pretrained directory that is not the preset ------------------------------------------
HF_ARCH = dict(vocab_size=256000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
               attn_logit_softcapping=20.0, num_labels=3, pad_token_id=0)


@pytest.fixture(scope="module")
def pretrained_run(request, tmp_path_factory):
    """Fine-tune a 2-layer transformers checkpoint (window 16, softcap 20) under model=gemma2_2b
    (26 layers, window 4096, softcap 50 in the yaml)."""
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    d = scratch.module_dir(request, tmp_path_factory, "pretrained")
    torch.manual_seed(0)
    Gemma2ForSequenceClassification(Gemma2Config(**HF_ARCH)).save_pretrained(d / "hf")
    proc = _launch("launch.train", "+experiment=cpu_demo", "model=gemma2_2b", f"model.name_or_path={d / 'hf'}",
                   "model.query_pre_attn_scalar=null", "model.head=linear", "model.head_dropout=0.0",
                   "data.max_length=256", "data.max_tokens=2048", "data.global_batch_rows=16",
                   "data.limit_train_rows=32", "data.limit_eval_rows=24", "trainer.eval_every=null",
                   "checkpoint.every_steps=null", "logging.progress_bar=false", f"trainer.run_dir={d / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


@pytest.mark.slow
def test_pretrained_dir_with_other_layer_count_exports_and_predicts_what_trained(pretrained_run, tmp_path):
    d = pretrained_run
    log = (d / "run" / "train.log").read_text()
    assert "its config.json decides the architecture" in log and "'num_hidden_layers': (26, 2)" in log
    ckpt = next((d / "run" / "checkpoints").glob("step-*[0-9]"))
    arch = json.loads((ckpt / "trainer_state.json").read_text())["model"]["architecture"]
    assert (arch["num_hidden_layers"], arch["sliding_window"], arch["attn_logit_softcapping"]) == (2, 16, 20.0)

    out = tmp_path / "export"
    proc = _launch("launch.export", f"checkpoint={d / 'run'}", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["sliding_window"], config["attn_logit_softcapping"]) == (2, 16, 20.0)
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert not [k for k in tensors if k.startswith("model.layers.2.")]  # 2 layers, not the preset's 26
    assert all(torch.isfinite(t).all() and t.abs().max() < 100 for t in tensors.values())  # nothing uninitialised

    # predict rebuilds the trained settings (window 16, softcap 20 over 256-token rows): it
    # reproduces the run's own evaluation of the same rows
    limited = tmp_path / "eval24.csv"
    with open(EVAL_CSV, newline="") as f, open(limited, "w", newline="") as g:
        reader = csv.DictReader(f)
        writer = csv.DictWriter(g, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(r for i, r in enumerate(reader) if i < 24)
    proc = _launch("launch.predict", f"checkpoint={d / 'run'}", f"data.test_path={limited}",
                   f"out={tmp_path / 'p.csv'}", "tta=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {r["id"]: [float(r[c]) for c in ("winner_model_a", "winner_model_b", "winner_tie")]
            for r in csv.DictReader(open(next((d / "run" / "eval").glob("predictions-step-*.csv"))))}
    got = {r["id"]: [float(r[c]) for c in ("winner_model_a", "winner_model_b", "winner_tie")]
           for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("module,override,named", [
    ("launch.export", "model.num_hidden_layers=26", "num_hidden_layers=2"),
    ("launch.predict", "model.sliding_window=4096", "sliding_window=16"),
])
def test_an_override_that_contradicts_the_checkpoint_is_refused(pretrained_run, tmp_path, module, override, named):
    args = [f"checkpoint={pretrained_run / 'run'}", f"out={tmp_path / 'out'}", override]
    if module == "launch.predict":
        args.append(f"data.test_path={EVAL_CSV}")
    proc = _launch(module, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and override.split("=")[0] in proc.stderr and named in proc.stderr


# ---- strict rebuild from a small checkpoint (in process) -------------------------------------
SHORT = ["+experiment=cpu_demo", "model.hidden_size=32", "model.intermediate_size=64", "model.head_dim=16",
         "model.query_pre_attn_scalar=16", "data.max_length=256", "data.max_tokens=1024",
         "data.global_batch_rows=16", "data.limit_train_rows=16", "data.eval_path=null", "trainer.eval_every=null",
         "checkpoint.every_steps=null", "logging.progress_bar=false", "trainer.resume=never"]


@pytest.fixture(scope="module")
def small_checkpoint(request, tmp_path_factory):
    from trainer.train import run

    d = scratch.module_dir(request, tmp_path_factory, "small")
    return run(compose(SHORT + [f"trainer.run_dir={d}"])).checkpoint


def test_rebuild_is_strict_about_every_tensor(small_checkpoint):
    from trainer.build import load_for_inference
    from trainer.checkpoint import verify_checkpoint
    from trainer.consolidate import open_trained

    trained = open_trained(small_checkpoint)
    model = trained.load_model()
    assert model.args.num_hidden_layers == 2 and not model.training
    state = verify_checkpoint(small_checkpoint)
    for change, missing in ((dict(num_hidden_layers=3), "layers.2."), (dict(num_hidden_layers=1), "unexpected"),
                            (dict(intermediate_size=48), "shape")):
        tampered = {**state, "model": {**state["model"], "architecture": {**state["model"]["architecture"], **change}}}
        with pytest.raises(CheckpointError, match=missing):
            load_for_inference(small_checkpoint, tampered, trained.cfg, trained.task)
    # a checkpoint written before architectures were recorded: its config trained the model
    legacy = {k: v for k, v in state.items() if k != "model"}
    old = load_for_inference(small_checkpoint, legacy, trained.cfg, trained.task)
    for (n, p), (_, q) in zip(model.named_parameters(), old.named_parameters()):
        assert torch.equal(p, q), n


def test_kernels_are_resolved_once(monkeypatch):
    import trainer.model.gemma2 as gemma2
    from trainer.model import Gemma2Classifier
    from trainer.model.testing import pack, tiny_args

    calls = []
    real = gemma2.resolve_attn_impl
    monkeypatch.setattr(gemma2, "resolve_attn_impl", lambda *a: calls.append(a) or real(*a))
    model = Gemma2Classifier(tiny_args(attn_impl="auto")).eval()
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randint(1, 128, (n,), generator=g) for n in (5, 9)])
    with torch.no_grad():
        for _ in range(3):
            model(**batch)
    assert len(calls) == 1 and model.kernels.attn == "reference"  # at the first forward, never again
    model.select_kernels(torch.device("cpu"), torch.float32)
    with torch.no_grad():
        model(**batch)
    assert len(calls) == 2


def test_parallelize_order_and_activation_checkpointing_saves_memory(monkeypatch, tmp_path):
    import torch.distributed as dist

    import trainer.parallel as parallel
    from trainer.model import Gemma2Classifier
    from trainer.model.testing import pack, tiny_args

    order = []
    for name in ("apply_activation_checkpointing", "apply_compile", "shard_model"):
        monkeypatch.setattr(parallel, name, lambda m, *a, _n=name, **k: order.append(_n) or m)
    parallel.parallelize(torch.nn.Module(), None, activation_checkpointing=True, compile=True)
    assert order == ["apply_activation_checkpointing", "apply_compile", "shard_model"]
    monkeypatch.undo()

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1,))
        g = torch.Generator().manual_seed(0)
        batch = pack([torch.randint(1, 128, (n,), generator=g) for n in (40, 60)])
        saved = {}
        for ac in (False, True):
            torch.manual_seed(0)
            model = parallel.parallelize(Gemma2Classifier(tiny_args(num_hidden_layers=4)), mesh,
                                         activation_checkpointing=ac).train()
            sizes = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
                model(**batch).sum().backward()
            saved[ac] = sum(sizes)
            assert [n for n, _ in model.named_parameters()][:2] == ["embed_tokens.weight",
                                                                   "layers.0.self_attn.q_proj.weight"]
        assert saved[True] < 0.5 * saved[False], saved
    finally:
        dist.destroy_process_group()


def test_model_keys_are_refused_where_they_cannot_work():
    with pytest.raises(ConfigError, match="query_pre_attn_scalar"):
        compose(["+experiment=cpu_demo", "model.query_pre_attn_scalar=null"])
    with pytest.raises(ConfigError, match="model.num_labels"):
        from trainer.build import model_args
        from trainer.tasks import ArenaTask

        model_args(compose(["+experiment=cpu_demo", "model.num_labels=5"]).model, ArenaTask())


# ---- resume refuses a run of another task -------------------------------------------------------
@pytest.mark.slow
def test_resume_refuses_other_classes_and_predict_refuses_other_task(tmp_path):
    from trainer.train import run

    train = text_data.write(tmp_path / "train.csv", text_data.rows(40, 0))
    base = ["+experiment=cpu_demo", "data/task=text_classification", f"data.train_path={train}",
            "data.max_length=32", "data.max_tokens=512", "data.global_batch_rows=20", "trainer.max_steps=1",
            "trainer.eval_every=null", "logging.progress_bar=false", f"trainer.run_dir={tmp_path / 'run'}"]
    run(compose(base))
    names = list(reversed(text_data.CLASSES))
    with pytest.raises(CheckpointError, match=r"trained with another task.*class_names.*'anger'.*'sadness'"):
        run(compose(base + [f"data.class_names=[{','.join(names)}]"]))
    proc = _launch("launch.predict", f"checkpoint={tmp_path / 'run'}", f"data.test_path={train}",
                   f"out={tmp_path / 'p.csv'}", "data/task=arena")
    assert proc.returncode == 2, proc.stderr
