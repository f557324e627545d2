"""model.compile=true: each decoder layer's forward compiled with dynamic shapes, masks built once
per forward ahead of the layers, the eager numbers on CPU (the GPU figures are in docs/gpu.md)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from trainer import parallel
from trainer.config import compose
from trainer.model import Gemma2Classifier
from trainer.model import attention as attention_mod
from trainer.model import gemma2 as gemma2_mod
from trainer.model.testing import pack, randomize_norms, tiny_args
from trainer.train import run


def _batches(seed=1, n=8, max_len=40):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        k = int(torch.randint(1, 6, (1,), generator=g))
        lens = torch.randint(1, max_len, (k,), generator=g).tolist()
        yield pack([torch.randint(1, 128, (m,), generator=g) for m in lens])


def _train_steps(model, batches):
    out = []
    for b in batches:
        model.zero_grad(set_to_none=True)
        loss = model(**b).logsumexp(-1).sum()
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return out


def test_masks_are_built_once_per_forward_ahead_of_the_layers(monkeypatch):
    # 4 layers alternate sliding/global windows and the last one is pooled: three kinds of mask,
    # each built once, before the first layer runs.
    events = []
    real = attention_mod.build_attention_mask
    monkeypatch.setattr(gemma2_mod, "build_attention_mask",
                        lambda *a, **k: events.append(("mask", a[3], a[4] is not None)) or real(*a, **k))
    model = Gemma2Classifier(tiny_args(num_hidden_layers=4, sliding_window=8))
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, _: events.append(("layer", m.layer_idx)))
    model(**next(_batches()))
    assert events == [("mask", 8, False), ("mask", None, False), ("mask", None, True),
                      ("layer", 0), ("layer", 1), ("layer", 2), ("layer", 3)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_give_eager_losses_and_grads_without_recompiling(checkpointing):
    # aot_eager traces exactly what inductor compiles (dynamo graphs, AOTAutograd fwd/bwd, guards)
    # at a fraction of the cost; test_cpu_demo_compiled_matches_eager runs inductor itself.
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    torch.manual_seed(0)
    base = Gemma2Classifier(tiny_args(num_hidden_layers=3, sliding_window=8))
    randomize_norms(base)
    ref = _train_steps(copy.deepcopy(base), _batches())
    model = copy.deepcopy(base)
    if checkpointing:
        parallel.apply_activation_checkpointing(model)
    parallel.apply_compile(model, backend="aot_eager")
    dynamo_utils.counters.clear()
    warm = _train_steps(model, _batches(n=4))
    graphs_after_warmup = dynamo_utils.counters["stats"]["unique_graphs"]
    got = _train_steps(model, _batches())
    # packings of 1..5 sequences of 1..39 tokens: no recompile once sizes went symbolic
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs_after_warmup
    assert warm and [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]
    for (loss_a, grads_a), (loss_b, grads_b) in zip(ref, got):
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_cpu_demo_compiled_matches_eager(tmp_path):
    # The check: cpu_demo for 3 steps, model.compile=true (inductor) gives the eager losses
    # to 1e-5; with activation checkpointing too (the recompute replays the compiled forward).
    def losses(name, *extra):
        cfg = compose(["+experiment=cpu_demo", "trainer.max_steps=3", "trainer.eval_every=null",
                       "checkpoint.every_steps=null", "checkpoint.enabled=false", "data.limit_eval_rows=8",
                       f"trainer.run_dir={tmp_path / name}", "logging.progress_bar=false", "trainer.resume=never",
                       *extra])
        run(cfg)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss_step"] for r in rows if "loss_step" in r]

    torch._dynamo.reset()
    eager = losses("eager")
    compiled = losses("compiled", "model.compile=true")
    compiled_ac = losses("compiled-ac", "model.compile=true", "model.activation_checkpointing=true")
    assert len(eager) == 3 and eager[0] > 1.0
    for other in (compiled, compiled_ac):
        assert max(abs(a - b) for a, b in zip(eager, other)) < 1e-5, (eager, other)
