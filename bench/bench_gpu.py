"""GPU training throughput and MFU: Gemma 2 2B-shaped and 9B-shaped (fewer layers) classifiers, bf16.

Ours: trainer.model.Gemma2Classifier(ModelArgs(attn_impl=...)) in bf16 with activation checkpointing and the
pooled last layer, packed varlen micro-batches from TokenBudgetSampler (token budget 16,384, the recipe's),
weighted soft cross-entropy, AnyPrecisionAdamW with the recipe's settings (bf16 moments, Kahan).
Alternative: transformers' Gemma2ForSequenceClassification of the same shape, bf16, attn_implementation
flash_attention_2 (falls back to sdpa, then eager, when it cannot be used; the row says which and why),
gradient checkpointing, the same rows of every optimizer step cut into micro-batches of a fixed number of rows
(budget / max_length), right-padded to the longest row (HF Trainer-style), the same optimizer.
Lengths: every train.csv row as the trainer tokenizes it (judge prompt, max_length 4096); random token ids.

Timed: whole optimizer steps (all micro-batches + optimizer), ours and HF interleaved step by step,
torch.cuda.synchronize around each; medians over steps after warm-up steps (flex compiles, flash warms up).
tokens/s/GPU counts real tokens. MFU = trainer.flops.flops_per_step(real lengths) / step time / bf16 peak of
the detected device (the useful-work MFU; HF's padded tokens are not counted as work for either side).

Without CUDA it returns one skipped row and `python -m bench.bench_gpu` exits 0.

    python -m bench.bench_gpu [--quick | --smoke] [--attn auto|flash_attn|flex] [--configs 2b,9b]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import time

import numpy as np
import torch

BUDGET, MAX_LENGTH = 16384, 4096
HF_ROWS_PER_MICRO = BUDGET // MAX_LENGTH
# 2B: transformers' Gemma2Config defaults (gemma-2-2b). 9B: gemma-2-9b widths with fewer layers so that two
# models (ours + HF) with optimizer state fit on one 80 GB GPU at once.
SHAPES = {
    "2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
               num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    # CPU dry run of this file's code path (tests/test_bench.py): tiny widths, lengths scaled to a 256 cap
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
}
# mode: (9B layers, global batch rows, warm-up steps, timed steps)
MODES = {"smoke": (2, 16, 1, 2), "quick": (8, 32, 2, 4), "full": (10, 80, 3, 10)}


def skipped(reason: str) -> list[dict]:
    return [{"name": "gpu: Gemma 2 2B / 9B-shaped bf16 tokens/s/GPU and MFU vs transformers",
             "ours": None, "alternative": None, "ratio": None, "limit": None, "unit": "",
             "status": "skipped", "note": reason}]


def hf_attn_impl(requested: str = "flash_attention_2") -> tuple[str, str]:
    """The attention implementation transformers will get, and why if it is not the requested one."""
    if requested == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return "sdpa", "flash_attn not importable"
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return "sdpa", "transformers reports flash-attn 2 unavailable"
    return requested, ""


def build_hf(args, impl: str, device):
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    cfg = args.to_hf_config()
    cfg.pop("architectures")
    config = Gemma2Config(**cfg)
    tried = []
    for name in dict.fromkeys([impl, "sdpa", "eager"]):
        try:
            with torch.device(device):
                model = Gemma2ForSequenceClassification._from_config(config, attn_implementation=name,
                                                                      dtype=torch.bfloat16)
            return model, name, "; ".join(tried)
        except Exception as e:  # noqa: BLE001 - report and fall back
            tried.append(f"{name} refused ({type(e).__name__}: {str(e).split('. ')[0][:160]})")
    raise RuntimeError("; ".join(tried))


def make_optimizer(model):
    from trainer.optim import AnyPrecisionAdamW

    return AnyPrecisionAdamW(model.parameters(), lr=2.5e-6, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01,
                             use_kahan_summation=True, momentum_dtype=torch.bfloat16,
                             variance_dtype=torch.bfloat16, compensation_buffer_dtype=torch.bfloat16)


def bench_shape(shape: str, mode: str, attn: str, device) -> list[dict]:
    from bench.bench_train import arena_prompt_lengths, soft_ce
    from trainer.data.collate import Item, VarlenCollator
    from trainer.data.sampler import TokenBudgetSampler
    from trainer.flops import detect_peak_key, flops_per_step, mfu, peak_flops
    from trainer.model import Gemma2Classifier, ModelArgs
    from trainer.parallel import apply_activation_checkpointing

    layers_9b, G, warmup, timed = MODES[mode]
    cuda = device.type == "cuda"
    scale = 1 if shape != "tiny" else 16  # tiny: lengths / 16 (cap 256), budget / 16
    over = dict(SHAPES[shape])
    if shape == "9b":
        over["num_hidden_layers"] = layers_9b
    label = f"{shape.upper() if shape != 'tiny' else 'tiny'}-shaped" + (f", {over['num_hidden_layers']} layers" if shape == "9b" else "")
    args = ModelArgs(**over, head="mlp", attn_impl=attn, rope_impl="auto", last_layer_pooled_only=True)

    rng = np.random.default_rng(0)
    lengths = arena_prompt_lengths(MAX_LENGTH)
    n_steps = warmup + timed
    rows_needed = min(len(lengths), n_steps * G)
    pick = rng.choice(len(lengths), size=rows_needed, replace=False)
    lengths = np.maximum(2, lengths[pick] // scale)
    seqs = [rng.integers(1, args.vocab_size, size=int(n)).astype(np.int64) for n in lengths]
    labels = rng.dirichlet(np.ones(3), size=len(lengths)).astype(np.float32)
    sampler = TokenBudgetSampler(lengths, global_batch_rows=G, max_tokens=BUDGET // scale, world_size=1, rank=0, seed=0)
    collate = VarlenCollator(3)
    n_steps = min(n_steps, sampler.steps_per_epoch)

    torch.manual_seed(0)
    with torch.device(device):
        ours = Gemma2Classifier(args)
    ours = ours.to(torch.bfloat16).train()
    ours.select_kernels(device, torch.bfloat16)
    apply_activation_checkpointing(ours)
    hf, hf_impl, hf_note = build_hf(args, hf_attn_impl()[0], device)
    why = "; ".join(x for x in (hf_attn_impl()[1], hf_note) if x)
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5 name
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()
    ours_opt, hf_opt = make_optimizer(ours), make_optimizer(hf)

    steps = []
    for s in range(n_steps):
        mbs = [collate([Item(seqs[i], labels[i], int(i), float(w)) for i, w in zip(mb.indices, mb.weights)])
               for mb in sampler.plan_step(0, s)]
        rows = sampler.step_rows(0, s)
        hf_mbs, padded = [], 0
        for c in range(0, len(rows), HF_ROWS_PER_MICRO):
            chunk = rows[c:c + HF_ROWS_PER_MICRO]
            ids = torch.zeros(len(chunk), int(lengths[chunk].max()), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, i in enumerate(chunk):
                ids[b, :lengths[i]] = torch.from_numpy(seqs[i])
                mask[b, :lengths[i]] = 1
            hf_mbs.append((ids.to(device), mask.to(device), torch.from_numpy(labels[chunk]).to(device)))
            padded += ids.numel()
        real_lens = [int(x) for x in lengths[rows]]
        steps.append(([mb.to(device, non_blocking=True) for mb in mbs], hf_mbs, len(rows), real_lens, padded))

    def ours_step(k):
        mbs, _, num_rows, _, _ = steps[k]
        for mb in mbs:
            (soft_ce(ours(**mb.inputs), mb.labels) * mb.weights).sum().div(num_rows).backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def hf_step(k):
        _, hf_mbs, num_rows, _, _ = steps[k]
        for ids, mask, lab in hf_mbs:
            logits = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
            (soft_ce(logits, lab).mean() * (len(lab) / num_rows)).backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def timed_call(fn, k):
        sync()
        t0 = time.perf_counter()
        fn(k)
        sync()
        return time.perf_counter() - t0

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t_ours, t_hf = [], []
    for k in range(n_steps):  # interleaved, step by step
        a, b = timed_call(ours_step, k), timed_call(hf_step, k)
        if k >= warmup or n_steps <= warmup:
            t_ours.append((k, a))
            t_hf.append((k, b))
    peak_mem = torch.cuda.max_memory_allocated(device) if cuda else 0

    def per_step(times):
        tps = [sum(steps[k][3]) / t for k, t in times]
        fps = [flops_per_step(args, steps[k][3], training=True, last_layer_pooled_only=True) / t for k, t in times]
        return statistics.median(tps), statistics.median(fps)

    (tps_o, fps_o), (tps_h, fps_h) = per_step(t_ours), per_step(t_hf)
    pad_ratio = sum(steps[k][4] for k, _ in t_hf) / sum(sum(steps[k][3]) for k, _ in t_hf)
    key = detect_peak_key(device)
    peak = peak_flops(key)
    mfu_o, mfu_h = mfu(fps_o, peak), mfu(fps_h, peak)
    ours_impl = attn if attn != "auto" else "auto->" + _resolved(device)
    note = (f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}; ours attn {ours_impl}; HF attn {hf_impl}"
            + (f" ({why})" if why else "") + f"; peak mem both models {peak_mem / 2**30:.1f} GiB; "
            f"{len(t_ours)} timed steps of {G} rows; peak {key} {peak}")
    print(f"[bench_gpu] {label}: {note}")
    rows = [{"name": f"gpu {label} bf16 real tokens/s/GPU: ours {ours_impl} vs HF {hf_impl} padded",
             "ours": round(tps_o, 1), "alternative": round(tps_h, 1), "ratio": round(tps_o / tps_h, 3),
             "limit": round(pad_ratio, 3), "unit": "real tok/s/GPU; limit = HF padded/real tokens", "note": note}]
    if mfu_o is not None:
        rows.append({"name": f"gpu {label} MFU vs {key} peak: ours vs HF {hf_impl}", "ours": round(mfu_o, 4),
                     "alternative": round(mfu_h, 4), "ratio": round(mfu_o / mfu_h, 3), "limit": 1.0,
                     "unit": "model FLOPs (real tokens) / peak"})
    else:
        rows.append({"name": f"gpu {label} MFU", "ours": None, "alternative": None, "ratio": None, "limit": None,
                     "unit": "", "status": "skipped",
                     "note": f"unknown bf16 peak for device kind {key!r}: set ARENA_PEAK_FLOPS"})
    del ours, hf, ours_opt, hf_opt, steps
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def _resolved(device) -> str:
    try:
        from trainer.model.attention import resolve_attn_impl

        return str(resolve_attn_impl("auto", torch.device(device), torch.bfloat16))
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def run(quick: bool = True, smoke: bool = False, attn: str = "auto", configs: str = "2b,9b") -> list[dict]:
    if not torch.cuda.is_available():
        return skipped("no CUDA device (torch.cuda.is_available() is False); run on a GPU: "
                       "python -m bench.run --only gpu")
    mode = "smoke" if smoke else "quick" if quick else "full"
    rows = []
    for shape in configs.split(","):
        try:
            rows += bench_shape(shape.strip(), mode, attn, torch.device("cuda", torch.cuda.current_device()))
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            rows.append({"name": f"gpu {shape}-shaped", "ours": None, "alternative": None, "ratio": None,
                         "limit": None, "unit": "", "status": "error", "note": f"CUDA OOM: {str(e)[:120]}"})
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--attn", default="auto", choices=["auto", "flash_attn", "flex"])
    p.add_argument("--configs", default="2b,9b")
    a = p.parse_args()
    for row in run(quick=a.quick, smoke=a.smoke, attn=a.attn, configs=a.configs):
        print(json.dumps(row))
