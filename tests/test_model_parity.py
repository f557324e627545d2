"""Packed Gemma2Classifier vs transformers' Gemma 2 (eager, one sequence at a time), on CPU in fp32."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.model import Gemma2Classifier, ModelArgs, count_params, parameter_name_map
from trainer.model.testing import pack, randomize_norms, tiny_args, to_transformers

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
TOL = 2e-5

CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, sliding_window=8),
    "mqa_scalar": dict(num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=4, sliding_window=5,
                       query_pre_attn_scalar=24, attn_logit_softcapping=5.0),
    "mha": dict(num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2, sliding_window=8, head_dim=32),
}
LENGTHS = [5, 12, 20, 1, 9, 8]  # shorter, equal and longer than the windows; a 1-token sequence


def make_pair(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Gemma2Classifier(tiny_args(**overrides)).eval()
    randomize_norms(model, seed=seed)
    return model, to_transformers(model)


def random_seqs(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]  # no pad id (0): HF pools on non-pad


def hf_per_sequence(hf, seqs):
    """transformers' logits and last-token final hidden, one unpadded sequence at a time."""
    logits, hidden = [], []
    for s in seqs:
        out = hf.model(input_ids=s[None], use_cache=False).last_hidden_state[0, -1]
        hidden.append(out)
        logits.append(hf.score(out))
        # sanity: the classification wrapper pools the same token
        torch.testing.assert_close(hf(input_ids=s[None], use_cache=False).logits[0], logits[-1])
    return torch.stack(logits), torch.stack(hidden)


@pytest.mark.parametrize("pooled_only", [True, False])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_forward_parity_random(cfg, pooled_only):
    model, hf = make_pair(**CONFIGS[cfg], last_layer_pooled_only=pooled_only)
    seqs = random_seqs(LENGTHS, model.args.vocab_size)
    with torch.no_grad():
        logits, pooled = model(**pack(seqs), return_hidden=True)
        ref_logits, ref_pooled = hf_per_sequence(hf, seqs)
    assert logits.dtype == torch.float32 and logits.shape == (len(seqs), 3)
    assert (pooled - ref_pooled).abs().max() < TOL
    assert (logits - ref_logits).abs().max() < TOL


def test_window_boundary_is_exact():
    """Off-by-one in the window changes the logits, so the parity above pins the semantics."""
    seqs = random_seqs([20, 15], 128)
    model, hf = make_pair(sliding_window=8)
    with torch.no_grad():
        ref, _ = hf_per_sequence(hf, seqs)
        for w in (7, 9):
            model.args.sliding_window = w
            for layer in model.layers:
                layer.self_attn.window = model.args.layer_window(layer.layer_idx)
            assert (model(**pack(seqs)) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("pooled_only", [True, False])
def test_grad_parity(pooled_only):
    model, hf = make_pair(seed=1, last_layer_pooled_only=pooled_only)
    seqs = random_seqs(LENGTHS, model.args.vocab_size, seed=1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    F.cross_entropy(model(**pack(seqs)), labels, reduction="sum").backward()
    ref_logits, _ = hf_per_sequence(hf, seqs)
    F.cross_entropy(ref_logits, labels, reduction="sum").backward()
    hf_params = dict(hf.named_parameters())
    names = parameter_name_map(model)
    worst = 0.0
    for name, p in model.named_parameters():
        ref = hf_params[names[name]].grad
        assert p.grad is not None, name
        err = ((p.grad - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
        worst = max(worst, err)
        assert err < 1e-4, (name, err)


@pytest.fixture(scope="module")
def arena_token_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURES / "gemma2-tokenizer")
    rows = []
    with open(FIXTURES / "arena" / "train.csv", newline="") as f:
        for row in csv.DictReader(f):
            text = "\n".join(json.loads(row["prompt"]) + json.loads(row["response_a"]) + json.loads(row["response_b"]))
            rows.append(torch.tensor(tok(text)["input_ids"]))
            if len(rows) == 5:
                break
    # keep the real ids, truncated to short CPU-friendly lengths around the window size
    return [ids[: n] for ids, n in zip(rows, [48, 7, 30, 16, 64])]


@pytest.mark.parametrize("pooled_only", [True, False])
def test_parity_real_arena_tokens(arena_token_ids, pooled_only):
    # full Gemma vocab (real ids, no remapping) with a tiny body
    model, hf = make_pair(seed=2, vocab_size=256000, hidden_size=32, intermediate_size=64, head_dim=16,
                          num_hidden_layers=2, sliding_window=16, last_layer_pooled_only=pooled_only)
    seqs = arena_token_ids
    assert all(s.max() < 256000 and s.min() > 0 for s in seqs)
    with torch.no_grad():
        logits, pooled = model(**pack(seqs), return_hidden=True)
        ref_logits, ref_pooled = hf_per_sequence(hf, seqs)
    assert (pooled - ref_pooled).abs().max() < TOL
    assert (logits - ref_logits).abs().max() < TOL


@pytest.mark.parametrize("pooled_only", [True, False])
def test_flex_forward_matches_reference(pooled_only):
    model, _ = make_pair(seed=3, last_layer_pooled_only=pooled_only)
    batch = pack(random_seqs(LENGTHS, model.args.vocab_size, seed=3))
    with torch.no_grad():
        ref = model(**batch)
        model.args.attn_impl = "flex"
        out = model(**batch)
    assert (out - ref).abs().max() < 1e-5


def test_flex_backward_on_cpu_raises_clearly():
    model, _ = make_pair(attn_impl="flex")
    with pytest.raises(RuntimeError, match="no backward on CPU.*reference"):
        model(**pack(random_seqs([4, 6], 128)))


def test_unavailable_backends_raise_clearly():
    batch = pack(random_seqs([4, 6], 128))
    with pytest.raises(RuntimeError, match="flash_attn.*CUDA"):
        Gemma2Classifier(tiny_args(attn_impl="flash_attn"))(**batch)
    with pytest.raises(RuntimeError, match="rope_impl='te' needs CUDA"):
        Gemma2Classifier(tiny_args(rope_impl="te"))(**batch)
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        tiny_args(attn_impl="xformers")


def test_sdpa_and_auto_resolve_to_reference_on_cpu():
    model, _ = make_pair()
    batch = pack(random_seqs([4, 9, 3], 128))
    with torch.no_grad():
        ref = model(**batch)
        assert model.select_kernels() == ("reference", "torch")
        for impl in ("sdpa", "auto"):
            model.args.attn_impl = impl
            assert model.select_kernels(torch.device("cpu"), torch.float32) == ("reference", "torch")
            assert torch.equal(model(**batch), ref)


def test_input_layouts():
    model, _ = make_pair()
    batch = pack(random_seqs([4, 9, 3], 128))
    with torch.no_grad():
        ref = model(**batch)
        flat = dict(batch, input_ids=batch["input_ids"][0], position_ids=batch["position_ids"][0], max_seq_len=None)
        assert torch.equal(model(**flat), ref)
        with pytest.raises(TypeError, match="seq_lens"):  # bookkeeping is never swallowed as an input
            model(**flat, seq_lens=[4, 9, 3])
        with pytest.raises(ValueError, match="one packed row"):
            model(**dict(batch, input_ids=batch["input_ids"].expand(2, -1)))


def test_activation_checkpointing_same_grads():
    from trainer.parallel import apply_activation_checkpointing

    seqs = random_seqs(LENGTHS, 128, seed=4)
    grads = []
    for ckpt in (False, True):
        model, _ = make_pair(seed=4)
        if ckpt:
            apply_activation_checkpointing(model)
        model.train()
        model(**pack(seqs)).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert list(grads[0]) == list(grads[1])  # parameter names unchanged by the wrapper
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0)


def test_mlp_head_and_bf16():
    torch.manual_seed(0)
    model = Gemma2Classifier(tiny_args(head="mlp"))
    assert [n for n, _ in model.head.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert model.head.fc1.out_features == 32
    batch = pack(random_seqs(LENGTHS, 128))
    model.train()
    assert not torch.equal(model(**batch), model(**batch))  # dropout active
    model.eval()
    with torch.no_grad():
        ref = model(**batch)
        out = model.to(torch.bfloat16)(**batch)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


def test_meta_init_and_count_params():
    args = tiny_args(head="mlp", pad_token_id=0)
    with torch.device("meta"):
        model = Gemma2Classifier(args)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    emb = model.embed_tokens.weight
    assert torch.all(emb[0] == 0) and abs(emb[1:].std().item() - args.initializer_range) < 0.02
    assert all(torch.all(p == 0) for n, p in model.named_parameters() if "norm" in n or n.endswith("bias"))
    assert torch.isfinite(model.eval()(**pack(random_seqs([5, 3], 128)))).all()

    h, i, L = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    qo = 2 * h * args.num_attention_heads * args.head_dim
    kv = 2 * h * args.num_key_value_heads * args.head_dim
    body = L * (qo + kv + 3 * h * i + 4 * h) + h
    head = h * (h // 2) + h // 2 + (h // 2) * 3 + 3
    assert count_params(model) == body + head
    assert count_params(model, exclude_embeddings=False) == body + head + args.vocab_size * h


@pytest.mark.parametrize("name", ["gemma-2-2b-it", "gemma-2-9b-it"])
def test_args_from_real_configs_round_trip(name):
    from transformers import Gemma2Config

    args = ModelArgs.from_hf_config(FIXTURES / "gemma2-configs" / name, head="linear")
    raw = json.loads((FIXTURES / "gemma2-configs" / name / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "sliding_window", "query_pre_attn_scalar", "vocab_size"):
        assert getattr(args, k) == raw[k], k
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args
    cfg = args.to_hf_config()
    cfg.pop("architectures")
    hf = Gemma2Config(**cfg)
    assert hf.layer_types[:2] == ["sliding_attention", "full_attention"] and hf.num_labels == 3
    assert hf.rope_parameters["rope_theta"] == args.rope_theta
    with pytest.raises(ValueError, match="model_type 'gemma2'.*'llama'"):
        ModelArgs.from_hf_config(dict(raw, model_type="llama"))
