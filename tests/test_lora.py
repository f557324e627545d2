"""LoRA / QLoRA building blocks on one process: exact identity at init, what is frozen, NF4's
error on real-shaped weights, QLoRA vs LoRA logits, merging, and the config's errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from trainer.adapters import LoRALinear, LoRASpec, apply_lora, merge_lora, nf4, trainable_summary
from trainer.config import compose
from trainer.errors import ConfigError
from trainer.model import Gemma2Classifier
from trainer.model.testing import pack, randomize_norms, tiny_args
from trainer.optim import build_optimizer

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _spec(**kw) -> LoRASpec:
    return LoRASpec(**{"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ALL, **kw})


def _model(**kw) -> Gemma2Classifier:
    torch.manual_seed(0)
    m = Gemma2Classifier(tiny_args(**kw))
    randomize_norms(m)
    return m.eval()


def _batch(vocab: int = 128):
    g = torch.Generator().manual_seed(1)
    return pack([torch.randint(1, vocab, (n,), generator=g) for n in (7, 19, 12)])


def _randomize_b(model: torch.nn.Module, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def test_b_zero_at_init_gives_the_base_logits_exactly():
    base = _model()
    lora = apply_lora(copy.deepcopy(base), _spec(), seed=0)
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(lora(**batch), base(**batch))
    wrapped = [m for m in lora.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 7 * base.args.num_hidden_layers
    assert all(torch.count_nonzero(m.lora_B.weight) == 0 and torch.count_nonzero(m.lora_A.weight) > 0 for m in wrapped)


def test_lora_forward_is_the_formula_and_rslora_scales_by_sqrt_rank():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48, bias=False)
    x = torch.randn(5, 32)
    for rslora, scaling in ((False, 16 / 8), (True, 16 / math.sqrt(8))):
        m = LoRALinear(copy.deepcopy(linear), _spec(rank=8, alpha=16.0, use_rslora=rslora))
        m.reset_lora(0, "x")
        torch.nn.init.normal_(m.lora_B.weight)
        want = x @ linear.weight.T + scaling * (x @ m.lora_A.weight.T @ m.lora_B.weight.T)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
        assert m.scaling == pytest.approx(scaling)


def test_adapter_init_is_the_same_for_every_device_and_call_order():
    a = apply_lora(_model(), _spec(), seed=7)
    torch.rand(100)  # the global RNG moved: the adapters' draw must not
    b = apply_lora(_model(), _spec(), seed=7)
    c = apply_lora(_model(), _spec(), seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.self_attn.q_proj.lora_A.weight"], sc["layers.0.self_attn.q_proj.lora_A.weight"])


def test_only_adapters_and_head_train_and_frozen_weights_get_no_grad_or_optimizer_state():
    model = apply_lora(_model(), _spec(target_modules=("q_proj", "v_proj")), seed=0).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight"} | {f"layers.{i}.self_attn.{t}.lora_{ab}.weight"
                                           for i in range(3) for t in ("q_proj", "v_proj") for ab in "AB"}
    counts = trainable_summary(model)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    opt = build_optimizer(model, compose(["optim=adamw"]).optim)
    model(**_batch()).sum().backward()
    opt.step()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        assert (p in opt.state) == (name in trainable), name


def test_merged_model_equals_the_adapter_forward():
    model = apply_lora(_model(), _spec(), seed=0)
    _randomize_b(model)
    batch = _batch()
    with torch.no_grad():
        want = model(**batch)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(_model().state_dict())  # the plain layout again
        torch.testing.assert_close(merged(**batch), want, rtol=1e-5, atol=1e-5)


def test_nf4_relative_error_on_a_real_gemma2_2b_mlp_weight(capsys):
    """gemma-2-2b's gate_proj is 9216 x 2304. Weights drawn like trained ones (normal, std 0.02)
    quantise with ~9% relative (Frobenius) error: NF4's 16 levels per 64-value block."""
    torch.manual_seed(0)
    w = torch.randn(9216, 2304) * 0.02
    q = nf4.to_nf4(w)
    rel = float((nf4.dequantize(q) - w).norm() / w.norm())
    with capsys.disabled():
        print(f"\nNF4 relative error, 9216 x 2304 normal(0, 0.02) weight: {rel:.4f}; "
              f"{nf4.storage_bytes(q) / w.numel():.4f} bytes/weight")
    assert 0.05 < rel < 0.11
    assert nf4.storage_bytes(q) / w.numel() == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)


def test_qlora_logits_are_lora_logits_over_the_dequantised_base(capsys):
    """The same adapters over the NF4 base and over the full-precision base. QLoRA computes
    exactly LoRA over the dequantised weights (1e-5); against the full-precision base the logits
    differ by what quantising every linear costs, reported and bounded. (hidden 256 so every
    weight is whole NF4 blocks; Gemma 2's post-norms give every sublayer unit scale, so a
    random 3-layer model carries each layer's ~9% weight error into its output.)"""
    kw = dict(hidden_size=256, intermediate_size=512, head_dim=64, query_pre_attn_scalar=64, initializer_range=0.02)
    lora = apply_lora(_model(**kw), _spec(), seed=0)
    qlora = apply_lora(_model(**kw), _spec(quantize_base=True, nf4_scaler_block_size=64), seed=0)
    _randomize_b(lora)
    _randomize_b(qlora)
    assert nf4.is_nf4(qlora.layers[0].mlp.down_proj.weight) and not nf4.is_nf4(lora.layers[0].mlp.down_proj.weight)
    dequantised = copy.deepcopy(lora)
    with torch.no_grad():
        for (name, m), q in zip(dequantised.named_modules(), qlora.modules()):
            if isinstance(m, LoRALinear):
                m.weight.copy_(nf4.dequantize(q.weight))
        batch = _batch()
        full, quant, deq = lora(**batch), qlora(**batch), dequantised(**batch)
    torch.testing.assert_close(quant, deq, rtol=1e-5, atol=1e-5)
    rel = float((full - quant).norm() / full.norm())
    with capsys.disabled():
        print(f"\nQLoRA vs LoRA logits (3 layers, hidden 256, same adapters): relative error {rel:.4f}")
    assert 1e-3 < rel < 0.3


def test_adapter_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.adapter.target_modules"):
        compose(["model/adapter=lora", "model.adapter.target_modules=[q_proj,lm_head]"])
    with pytest.raises(ConfigError, match="model.adapter.rank"):
        compose(["model/adapter=lora", "model.adapter.rank=0"])
    with pytest.raises(ConfigError, match="model.adapter.name"):
        compose(["model.adapter.name=dora"])
    with pytest.raises(ConfigError, match="parallel.cpu_offload"):
        compose(["model/adapter=qlora", "parallel.cpu_offload=true"])
    assert compose(["model/adapter=qlora"]).model.adapter.name == "qlora"


def test_nf4_weight_that_cannot_be_cut_into_shards_is_a_config_error():
    from trainer.parallel import _check_nf4_shardable

    w = nf4.to_nf4(torch.randn(64, 256) * 0.02)  # one scale block of 64 x 256
    _check_nf4_shardable(w, 1)
    with pytest.raises(ConfigError, match="cannot be cut into 2 FSDP shards"):
        _check_nf4_shardable(w, 2)
