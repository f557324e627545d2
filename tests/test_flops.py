"""FLOPs accounting: hand counts on a tiny config, and mask semantics vs transformers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trainer.flops import (
    PEAK_FLOPS,
    attention_pairs,
    flops_6n,
    flops_breakdown,
    flops_per_step,
    layer_windows,
    mfu,
    num_params_nonembedding,
    peak_flops,
)


def tiny(**kw) -> SimpleNamespace:
    base = dict(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        sliding_window=3,
        num_labels=3,
        head="linear",
    )
    base.update(kw)
    return SimpleNamespace(**base)


SEQ_LENS = [5, 2]  # T = 7 tokens, B = 2 sequences


def test_hand_count_tiny_config():
    # Linear layers, multiply-adds per token per layer:
    #   q 8*(2*4)=64, k 8*(1*4)=32, v 32, o (2*4)*8=64, gate 8*16=128, up 128, down 16*8=128
    macs_per_token = 64 + 32 + 32 + 64 + 128 + 128 + 128
    assert macs_per_token == 576
    linear_fwd = 2 * 7 * macs_per_token * 2  # 2 FLOPs/MAC * 7 tokens * 576 * 2 layers
    assert linear_fwd == 16128

    # Attention (query, key) pairs:
    #   layer 0 sliding w=3: L=5 -> 1+2+3+3+3 = 12, L=2 -> 1+2 = 3   => 15
    #   layer 1 full causal: L=5 -> 5*6/2 = 15,     L=2 -> 2*3/2 = 3 => 18
    # each pair: (QK^T + PV) * 2 FLOPs * head_dim 4 * 2 query heads = 32 FLOPs
    attn_fwd = 32 * (15 + 18)
    assert attn_fwd == 1056

    # linear head 8 -> 3 on the 2 pooled rows
    head_fwd = 2 * 2 * 8 * 3
    assert head_fwd == 96

    fwd = linear_fwd + attn_fwd + head_fwd
    assert fwd == 17280
    assert flops_per_step(tiny(), SEQ_LENS, training=False) == 17280
    assert flops_per_step(tiny(), SEQ_LENS, training=True) == 3 * 17280 == 51840
    assert flops_breakdown(tiny(), SEQ_LENS, training=False) == {
        "linear": 16128,
        "attention": 1056,
        "head": 96,
        "total": 17280,
    }


def test_hand_count_mlp_head():
    # mlp head 8 -> 4 -> 3: 32 + 12 = 44 MACs per pooled row, 2 rows
    assert flops_breakdown(tiny(head="mlp"), SEQ_LENS, training=False)["head"] == 2 * 2 * 44 == 176
    # no head attribute -> transformers' linear score head
    args = tiny()
    del args.head
    assert flops_breakdown(args, SEQ_LENS, training=False)["head"] == 96


def test_hand_count_last_layer_pooled_only():
    # layer 0 unchanged: linear 2*7*576 = 8064, attention 32*15 = 480
    # layer 1 (last, full attention), only the 2 pooled query rows:
    #   k,v on all 7 tokens: 2*7*(32+32) = 896
    #   q,o,gate,up,down on 2 rows: 2*2*(64+64+128+128+128) = 2048
    #   attention: last query of each sequence sees L keys: 5 + 2 = 7 pairs -> 32*7 = 224
    # head: 96
    fwd = 8064 + 480 + 896 + 2048 + 224 + 96
    assert fwd == 11808
    assert flops_per_step(tiny(), SEQ_LENS, training=False, last_layer_pooled_only=True) == 11808
    assert flops_per_step(tiny(), SEQ_LENS, last_layer_pooled_only=True) == 3 * 11808


def test_pooled_last_layer_sliding():
    # 1 layer => the last layer is sliding (w=3): last query sees min(L, 3) keys: 3 + 2 = 5 pairs
    args = tiny(num_hidden_layers=1)
    b = flops_breakdown(args, SEQ_LENS, training=False, last_layer_pooled_only=True)
    assert b["attention"] == 32 * 5


def test_attention_pairs_closed_form():
    assert attention_pairs(0, 3) == 0
    assert attention_pairs(1, 3) == 1
    assert attention_pairs(5, None) == 15
    assert attention_pairs(5, 3) == 12
    assert attention_pairs(5, 5) == 15 and attention_pairs(5, 100) == 15
    assert attention_pairs(5, 1) == 5  # each query sees only itself
    for L in range(0, 40):
        for w in (1, 2, 3, 7, 16, 64):
            assert attention_pairs(L, w) == sum(min(i + 1, w) for i in range(L))


def test_window_semantics_match_transformers_mask():
    """Count pairs with transformers' own Gemma 2 mask functions (5.x masking_utils)."""
    torch = pytest.importorskip("torch")
    masking_utils = pytest.importorskip("transformers.masking_utils")

    def count(fn, L):  # mask functions take index tensors and broadcast
        q, kv = torch.arange(L)[:, None], torch.arange(L)[None, :]
        zero = torch.tensor(0)
        return int(fn(zero, zero, q, kv).expand(L, L).sum())

    for w in (1, 2, 3, 5, 8):
        fn = masking_utils.sliding_window_causal_mask_function(w)
        for L in (1, 2, 3, 4, 7, 12):
            assert count(fn, L) == attention_pairs(L, w), (L, w)
        # explicitly: key j attended by query i iff 0 <= i - j < w
        L = 12
        q, kv = torch.arange(L)[:, None], torch.arange(L)[None, :]
        expect = ((q - kv) >= 0) & ((q - kv) < w)
        assert torch.equal(fn(torch.tensor(0), torch.tensor(0), q, kv).expand(L, L), expect)
    for L in (1, 5, 9):
        assert count(masking_utils.causal_mask_function, L) == attention_pairs(L)


def test_layer_types_gemma2():
    assert layer_windows(tiny(num_hidden_layers=4)) == [3, None, 3, None]
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma2Config(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        sliding_window=3,
        vocab_size=32,
    )
    cfg.num_labels = 3
    assert layer_windows(cfg) == [3, None, 3, None]
    assert flops_per_step(cfg, SEQ_LENS) == flops_per_step(tiny(num_hidden_layers=4), SEQ_LENS)


def test_packing_is_additive_and_no_window():
    args = tiny()
    assert flops_per_step(args, [5, 2]) == flops_per_step(args, [5]) + flops_per_step(args, [2])
    assert flops_per_step(args, []) == 0
    assert flops_per_step(args, [0, 5, 0]) == flops_per_step(args, [5])
    no_window = tiny(sliding_window=None)
    assert flops_breakdown(no_window, SEQ_LENS, training=False)["attention"] == 32 * 18 * 2


def test_6n_estimate():
    # N = 2 layers * 576 + head 24 = 1176 matmul weights
    assert num_params_nonembedding(tiny()) == 1176
    assert flops_6n(tiny(), 7) == 6 * 1176 * 7
    assert flops_6n(tiny(), 7, training=False) == 2 * 1176 * 7
    # 6N overcounts the head (every token instead of 1/seq) and ignores attention
    exact = flops_breakdown(tiny(), SEQ_LENS)
    assert flops_6n(tiny(), 7) == exact["linear"] + 3 * 2 * 7 * 24


def test_peaks_and_mfu(monkeypatch):
    monkeypatch.delenv("ARENA_PEAK_FLOPS", raising=False)
    monkeypatch.delenv("ARENA_CPU_PEAK_FLOPS", raising=False)
    assert PEAK_FLOPS["h100_sxm_bf16"] == 989e12
    assert PEAK_FLOPS["h200_bf16"] == 989e12
    assert PEAK_FLOPS["a100_bf16"] == 312e12
    assert peak_flops("cpu") is None and mfu(1e9, None) is None
    assert peak_flops("cpu", override=2e11) == 2e11
    monkeypatch.setenv("ARENA_CPU_PEAK_FLOPS", "1e11")
    assert peak_flops("cpu") == 1e11
    assert peak_flops("a100_bf16") == 312e12
    monkeypatch.setenv("ARENA_PEAK_FLOPS", "5e12")
    assert peak_flops("a100_bf16") == 5e12
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)


@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("pooled", [False, True])
def test_matches_torch_flop_counter_on_the_model(head, pooled):
    """Linear + head FLOPs equal torch's FlopCounterMode mm/addmm counts on the real
    model, forward and forward+backward. (Its bmm count is not compared: the
    reference attention computes dense per-sequence L x L scores and masks them,
    while we count only the (query, key) pairs the mask keeps.)"""
    torch = pytest.importorskip("torch")
    from torch.utils.flop_counter import FlopCounterMode

    try:
        from trainer.model.gemma2 import Gemma2Classifier
        from trainer.model.testing import pack, tiny_args
    except ImportError as e:  # pragma: no cover
        pytest.skip(f"model not importable: {e}")

    torch.manual_seed(0)
    args = tiny_args(head=head, last_layer_pooled_only=pooled)
    model = Gemma2Classifier(args)
    lens = [11, 5, 20]
    batch = pack([torch.randint(1, 100, (n,)) for n in lens])

    def matmul_flops(counts):
        return sum(v for k, v in counts.items() if str(k) in ("aten.mm", "aten.addmm"))

    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(**batch)
    fwd = flops_breakdown(args, lens, training=False, last_layer_pooled_only=pooled)
    assert matmul_flops(fc.get_flop_counts()["Global"]) == fwd["linear"] + fwd["head"]

    model.train()
    with FlopCounterMode(display=False) as fc:
        model(**batch).float().sum().backward()
    train = flops_breakdown(args, lens, training=True, last_layer_pooled_only=pooled)
    assert matmul_flops(fc.get_flop_counts()["Global"]) == train["linear"] + train["head"]
