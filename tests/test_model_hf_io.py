"""transformers checkpoint round trips, loader error cases, and the real 9B tensor index."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.model import Gemma2Classifier, ModelArgs, count_params, match_checkpoint_keys, parameter_name_map
from trainer.model.hf_io import load_pretrained, save_pretrained
from trainer.model.testing import pack, randomize_norms, tiny_args, to_transformers
from trainer.tasks import ArenaTask

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TOL = 2e-5


def seqs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g) for n in (7, 12, 3, 10)]


def hf_logits(hf, ss):
    with torch.no_grad():
        return torch.cat([hf(input_ids=s[None], use_cache=False).logits for s in ss])


def ours_logits(model, ss):
    with torch.no_grad():
        return model(**pack(ss))


@pytest.fixture
def hf_model():
    torch.manual_seed(0)
    model = Gemma2Classifier(tiny_args())
    randomize_norms(model)
    return to_transformers(model.eval()).eval()


def test_transformers_seqcls_to_ours(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path, head="linear")
    assert not model.training and model.args.sliding_window == 8
    assert (ours_logits(model, seqs()) - hf_logits(hf_model, seqs())).abs().max() < TOL


def test_transformers_sharded_and_bf16(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_pretrained(tmp_path, head="linear")
    assert (ours_logits(model, seqs()) - hf_logits(hf_model, seqs())).abs().max() < TOL
    bf16 = load_pretrained(tmp_path, head="linear", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


@pytest.mark.parametrize("cls_name", ["Gemma2ForCausalLM", "Gemma2Model"])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_backbone_checkpoints_get_fresh_head(hf_model, tmp_path, caplog, cls_name, head):
    import transformers

    backbone = getattr(transformers, cls_name)(hf_model.config)
    sd = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items() if k != "score.weight"}
    prefix = "model." if cls_name == "Gemma2ForCausalLM" else ""
    backbone.load_state_dict({prefix + k: v for k, v in sd.items()}, strict=False)
    backbone.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="trainer.model.hf_io"):
        model = load_pretrained(tmp_path, head=head)
    assert "head initialised fresh" in caplog.text
    with torch.no_grad():
        _, pooled = model(**pack(seqs()), return_hidden=True)
        ref = torch.stack([hf_model.model(input_ids=s[None], use_cache=False).last_hidden_state[0, -1] for s in seqs()])
    assert (pooled - ref).abs().max() < TOL
    assert all(torch.isfinite(p).all() for p in model.head.parameters())


def test_ours_linear_to_transformers(tmp_path):
    from transformers import Gemma2ForSequenceClassification

    torch.manual_seed(1)
    model = Gemma2Classifier(tiny_args()).eval()
    randomize_norms(model)
    save_pretrained(model, tmp_path, labels=ArenaTask().output_columns)
    assert set(load_file(tmp_path / "model.safetensors")) == set(parameter_name_map(model).values())
    hf = Gemma2ForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.num_labels == 3 and hf.config.id2label[2] == "winner_tie"
    assert (hf_logits(hf, seqs()) - ours_logits(model, seqs())).abs().max() < TOL
    back = load_pretrained(tmp_path)  # head recorded in config.json
    assert back.args.head == "linear" and torch.equal(ours_logits(back, seqs()), ours_logits(model, seqs()))


def test_ours_mlp_round_trip(tmp_path):
    torch.manual_seed(2)
    model = Gemma2Classifier(tiny_args(head="mlp", head_dropout=0.2)).eval()
    randomize_norms(model)
    save_pretrained(model, tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert {"head.fc1.weight", "head.fc1.bias", "head.fc2.weight", "head.fc2.bias"} <= keys
    back = load_pretrained(tmp_path)
    assert back.args.head == "mlp" and back.args.head_dropout == 0.2
    assert torch.equal(ours_logits(back, seqs()), ours_logits(model, seqs()))
    # the same file also loads with a linear head (fresh) and the identical backbone
    lin = load_pretrained(tmp_path, head="linear")
    torch.testing.assert_close(lin.embed_tokens.weight, model.embed_tokens.weight, rtol=0, atol=0)


def _saved(tmp_path):
    torch.manual_seed(3)
    save_pretrained(Gemma2Classifier(tiny_args()), tmp_path)
    return tmp_path


def test_error_missing_tensor(tmp_path):
    path = _saved(tmp_path)
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(KeyError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(path)


def test_error_shape_mismatch(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=80)))
    with pytest.raises(ValueError, match=r"shape mismatch for 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight'.*checkpoint \(\d+, \d+\), model expects \(\d+, \d+\)"):
        load_pretrained(path)


def test_error_not_gemma2(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(ValueError, match="model_type 'gemma2'.*'llama'"):
        load_pretrained(path)


def test_error_pickle_only_is_refused(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ValueError, match=r"only pickle checkpoint.*pytorch_model\.bin.*refusing to unpickle"):
        load_pretrained(path)


def test_real_9b_index_maps_onto_model():
    cfg_dir = FIXTURES / "gemma2-configs" / "gemma-2-9b-it"
    index = json.loads((cfg_dir / "model.safetensors.index.json").read_text())
    args = ModelArgs.from_hf_config(cfg_dir, head="linear")
    with torch.device("meta"):
        model = Gemma2Classifier(args)
    found, missing, unexpected = match_checkpoint_keys(parameter_name_map(model), index["weight_map"])
    assert missing == ["head.weight"] and unexpected == []
    assert len(found) == len([k for k in index["weight_map"] if not k.startswith("lm_head.")])

    h, inter, hd = 3584, 14336, 256
    expected = {
        "self_attn.q_proj.weight": (16 * hd, h), "self_attn.k_proj.weight": (8 * hd, h),
        "self_attn.v_proj.weight": (8 * hd, h), "self_attn.o_proj.weight": (h, 16 * hd),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,),
    }
    assert len(model.layers) == 42
    for name, p in model.named_parameters():
        if name.startswith("layers."):
            assert tuple(p.shape) == expected[name.split(".", 2)[2]], name
    assert model.embed_tokens.weight.shape == (256000, h) and model.norm.weight.shape == (h,)
    # bf16 checkpoint: total bytes / 2 = number of backbone parameters
    n_body = count_params(model, exclude_embeddings=False) - model.head.weight.numel()
    assert n_body * 2 == index["metadata"]["total_size"]


def test_9b_names_and_shapes_equal_transformers_meta_model():
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    cfg_dir = FIXTURES / "gemma2-configs" / "gemma-2-9b-it"
    args = ModelArgs.from_hf_config(cfg_dir, head="linear")
    with torch.device("meta"):
        ours = Gemma2Classifier(args)
        hf = Gemma2ForSequenceClassification(Gemma2Config.from_pretrained(cfg_dir, num_labels=3))
    names = parameter_name_map(ours)
    assert {names[n]: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in hf.named_parameters()
    }
