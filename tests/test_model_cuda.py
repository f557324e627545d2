"""GPU backends (flash-attn, TE fused RoPE, compiled flex with backward, bf16): skipped without CUDA."""

import pytest
import torch

from trainer.model import Gemma2Classifier
from trainer.model.attention import flash_attn_available, resolve_attn_impl
from trainer.model.rope import te_available
from trainer.model.testing import pack, randomize_norms, tiny_args

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_flash = pytest.mark.skipif(not flash_attn_available(), reason="flash_attn not importable")
needs_te = pytest.mark.skipif(not te_available(), reason="transformer_engine.pytorch not importable")

LENGTHS = [37, 200, 5, 130, 64]  # around/over the window below


def model_and_batch(dtype=torch.bfloat16, **overrides):
    torch.manual_seed(0)
    args = tiny_args(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=64,
                     num_hidden_layers=4, initializer_range=0.05, **overrides)
    model = Gemma2Classifier(args)
    randomize_norms(model)
    model = model.to("cuda", dtype).eval()
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randint(1, 512, (n,), generator=g) for n in LENGTHS])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    return model, batch


def run(model, batch, impl, rope="torch", pooled=True, grad=False):
    model.args.attn_impl, model.args.rope_impl, model.args.last_layer_pooled_only = impl, rope, pooled
    model.select_kernels()  # where the parameters live, in their dtype
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        logits = model(**batch)
        if grad:
            logits.square().sum().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_close_rel(a, b, rtol):
    err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)
    assert err < rtol, err.item()


@needs_flash
@pytest.mark.parametrize("pooled", [True, False])
def test_flash_attn_matches_reference(pooled):
    model, batch = model_and_batch()
    ref, ref_g = run(model, batch, "reference", pooled=pooled, grad=True)
    out, g = run(model, batch, "flash_attn", pooled=pooled, grad=True)
    assert_close_rel(out, ref, 2e-2)
    for n in ref_g:
        assert_close_rel(g[n], ref_g[n], 5e-2)


@needs_flash
def test_auto_picks_flash_for_bf16_cuda():
    assert resolve_attn_impl("auto", torch.device("cuda"), torch.bfloat16) == "flash_attn"
    assert resolve_attn_impl("auto", torch.device("cuda"), torch.float32) == "flex"


@needs_te
@pytest.mark.parametrize("pooled", [True, False])
def test_te_rope_matches_torch_rope(pooled):
    model, batch = model_and_batch(dtype=torch.float32)
    ref, _ = run(model, batch, "reference", rope="torch", pooled=pooled)
    out, _ = run(model, batch, "reference", rope="te", pooled=pooled)
    assert_close_rel(out, ref, 1e-4)


@pytest.mark.parametrize("pooled", [True, False])
def test_flex_cuda_forward_backward_matches_reference(pooled):
    model, batch = model_and_batch(dtype=torch.float32)
    ref, ref_g = run(model, batch, "reference", pooled=pooled, grad=True)
    out, g = run(model, batch, "flex", pooled=pooled, grad=True)
    assert_close_rel(out, ref, 1e-4)
    for n in ref_g:
        assert_close_rel(g[n], ref_g[n], 1e-3)


def test_bf16_close_to_fp32():
    model, batch = model_and_batch(dtype=torch.float32)
    ref, _ = run(model, batch, "reference")
    out, _ = run(model.to(torch.bfloat16), batch, "reference")
    assert out.dtype == torch.float32
    assert_close_rel(out, ref, 5e-2)


@pytest.mark.parametrize("compiled", [False, True])
def test_flex_training_step_never_waits_on_the_device(compiled):
    # The collator gives max_seq_len and the lengths on the host; masks are built from device
    # tensors ahead of the layers. Any synchronising call in forward or backward raises here.
    from trainer.parallel import apply_compile

    model, batch = model_and_batch(dtype=torch.bfloat16)
    model.args.attn_impl = "flex"
    model.select_kernels()
    model.train()
    if compiled:
        apply_compile(model)
    model(**batch).float().square().sum().backward()  # warm-up: compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(**batch).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_layers_match_eager_flex(dtype):
    from trainer.parallel import apply_activation_checkpointing, apply_compile

    model, batch = model_and_batch(dtype=dtype)
    ref, ref_g = run(model, batch, "flex", grad=True)
    apply_activation_checkpointing(model)
    apply_compile(model)
    out, g = run(model, batch, "flex", grad=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close_rel(out, ref, tol)
    for n in ref_g:
        assert_close_rel(g[n], ref_g[n], 10 * tol)
