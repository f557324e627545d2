"""Will a job fit, and how busy will its GPUs be? Planned from the composed config at the real
world size, on this machine, without a GPU.

State bytes come from the real thing: the model is built on the meta device (no allocation),
adapters applied as the trainer applies them, and sharded by the real ``parallelize`` (FSDP2,
HSDP when configured) over a *fake* process group of the real world size, so every parameter's
shard is what rank 0 of the job will hold (FSDP2 pads dim 0 to a multiple of the shard count:
rank 0 holds the ceiling). Gradients: the trainable shards, in the weight dtype. Optimizer:
per trainable element, AnyPrecisionAdamW's momentum + variance (+ Kahan compensation) dtypes, or
AdamW's two moments in the weight dtype. QLoRA's targeted base weights: NF4's packed size.

The rest is arithmetic, each term documented in docs/planner.md:
- FSDP buffers: the largest unit's unsharded weights in the compute dtype, twice (the unit in
  use and the one prefetched), and its unsharded gradients in the reduce dtype;
- activations of one micro-batch of the token budget, with and without activation
  checkpointing (per-token, per-layer bytes of what autograd keeps with flash/flex attention);
- tokens per GPU per step and the budget fill from the training file's real lengths cut by the
  real sampler at this world size; FLOPs per step (trainer.flops); FSDP's all-gather and
  reduce-scatter bytes per GPU per step; a step time from a peak FLOP/s, an assumed MFU and link
  bandwidths (all overridable), compute and communication overlapping, the larger one the bound.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from .adapters import LoRALinear, LoRASpec
from .dtypes import to_dtype
from .errors import ConfigError

log = logging.getLogger(__name__)

GB = 10**9
GiB = 2**30
# Autograd keeps, per token and layer, with flash / flex attention (no [L, L] scores kept):
# RMSNorm (fp32 math): its fp32 input copy and normalised output, 8 bytes per hidden value, x4
# norms; the attention block's normed input, q / k / v after RoPE, the attention output (+ its
# fp32 log-sum-exp per head) and o_proj's input; the MLP's normed input, gate, gelu(gate), up
# and their product (four [I] tensors). See docs/planner.md.
NORM_BYTES_PER_HIDDEN = 8 * 4


@dataclass
class PlanResult:
    world_size: int
    nodes: int
    gpus_per_node: int
    mesh: list[int]
    adapter: str
    architecture: dict[str, Any]
    per_device: dict[str, int]
    fits: bool
    gpu_memory_bytes: int
    peak_moment: str
    activation_checkpointing: bool
    trainable_params: int
    total_params: int
    budget_fill: float | None
    tokens_per_gpu_per_step: float | None
    micro_batches_per_step: float | None
    flops_per_gpu_per_step: float | None
    comm_bytes_per_gpu_per_step: float
    compute_s: float | None
    comm_s: float
    step_time_s: float | None
    bound: str | None
    export_host_bytes: int
    assumptions: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- the fake world ----------------------------------------------------------------------
@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """A fake process group of ``world_size`` ranks (this process is rank 0): collectives are
    no-ops, DeviceMesh and FSDP2 see the real sizes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner needs a process of its own (a process group is already initialised)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mesh(world: int, dp_replicate: int):
    from torch.distributed.device_mesh import init_device_mesh

    if dp_replicate <= 1:
        return init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    if world % dp_replicate:
        raise ConfigError(f"parallel.dp_replicate={dp_replicate} does not divide the world size {world}")
    return init_device_mesh("cpu", (dp_replicate, world // dp_replicate), mesh_dim_names=("dp_replicate", "dp_shard"))


def nf4_bytes_per_weight(spec: LoRASpec, dtype: torch.dtype) -> float:
    """4-bit codes, an int8 scale per block, a scale factor (weight dtype) per scale block."""
    return 0.5 + 1 / spec.nf4_block_size + dtype.itemsize / (spec.nf4_block_size * spec.nf4_scaler_block_size)


# ---- the model at its real size, sharded for real ----------------------------------------
def sharded_model(cfg: DictConfig, args, world: int):
    """The meta model with its adapters, parallelized over a fake world (inside fake_world)."""
    from .build import apply_adapters
    from .model import Gemma2Classifier
    from .parallel import parallelize

    with torch.device("meta"):
        model = Gemma2Classifier(args).to(to_dtype(cfg.model.dtype))
    model = apply_adapters(model, cfg)  # on meta: adapters on meta, nothing quantised
    mesh = _mesh(world, int(cfg.parallel.dp_replicate))
    pcfg = cfg.parallel
    model = parallelize(model, mesh, param_dtype=pcfg.param_dtype, reduce_dtype=pcfg.reduce_dtype,
                        reshard_after_forward=pcfg.reshard_after_forward)
    return model, mesh


def _rank0_numel(p: torch.Tensor, shards: int) -> int:
    """Elements rank 0 holds: FSDP2 shards dim 0 into ceil(dim0 / shards) rows (padded)."""
    if not hasattr(p, "to_local"):  # unmanaged (QLoRA's NF4 weights at one shard)
        return p.numel()
    rows = math.ceil(p.shape[0] / shards) if p.dim() else 1
    return rows * (p[0].numel() if p.dim() > 1 else 1)


def state_bytes(model: nn.Module, cfg: DictConfig, shards: int) -> dict[str, int]:
    """Rank 0's parameter, gradient and optimizer-state bytes (the meta model, sharded)."""
    spec = LoRASpec.from_config(cfg.model.adapter)
    nf4_weights = set()
    if spec is not None and spec.quantize_base:
        nf4_weights = {id(m.weight) for m in model.modules() if isinstance(m, LoRALinear)}
    ocfg = cfg.optim
    if ocfg.name == "anyprecision_adamw":
        per_element = to_dtype(ocfg.momentum_dtype).itemsize + to_dtype(ocfg.variance_dtype).itemsize
        if ocfg.use_kahan_summation:
            per_element += to_dtype(ocfg.compensation_dtype).itemsize
    else:  # torch AdamW: exp_avg, exp_avg_sq in the weight dtype
        per_element = 2 * to_dtype(cfg.model.dtype).itemsize
    params = nf4 = grads = optim = 0
    for p in model.parameters():
        n = _rank0_numel(p, shards)
        if id(p) in nf4_weights:
            b = int(math.ceil(n * nf4_bytes_per_weight(spec, p.dtype)))
            nf4 += b
            params += b
            continue
        params += n * p.dtype.itemsize
        if p.requires_grad:
            grads += n * p.dtype.itemsize
            optim += n * per_element
    adapters = sum(_rank0_numel(p, shards) * p.dtype.itemsize for n, p in model.named_parameters()
                   if ".lora_" in n)
    return {"params_bytes": params, "nf4_base_bytes": nf4, "adapter_bytes": adapters, "grads_bytes": grads,
            "optimizer_bytes": optim}


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """FSDP2's units as trainer.parallel cuts them, in forward order: the embedding, then each
    decoder layer (the root's own final norm and head are counted apart: small, gathered first)."""
    return [("embed_tokens", model.embed_tokens), *((f"layers.{i}", m) for i, m in enumerate(model.layers))]


def gathered_bytes(unit: nn.Module, cfg: DictConfig, shards: int = 1, padded: bool = False) -> int:
    """What an all-gather of ``unit`` delivers: its weights in the compute dtype (QLoRA's NF4
    weights travel packed and are dequantised per matmul; with one shard they are not FSDP's
    and are not gathered at all). ``padded``: dim 0 rounded up to a multiple of ``shards``, as
    FSDP2's flat all-gather output is."""
    compute = to_dtype(cfg.parallel.param_dtype)
    spec = LoRASpec.from_config(cfg.model.adapter)
    nf4 = {id(m.weight) for m in unit.modules() if isinstance(m, LoRALinear)} if spec and spec.quantize_base else set()
    total = 0
    for p in unit.parameters(recurse=True):
        n = _rank0_numel(p, shards) * shards if padded else p.numel()
        if id(p) in nf4:
            total += int(n * nf4_bytes_per_weight(spec, p.dtype)) if shards > 1 else 0
        else:
            total += n * compute.itemsize
    return total


def grad_bytes(unit: nn.Module, cfg: DictConfig, shards: int = 1, dtype: str = "reduce") -> int:
    """Unsharded gradients of ``unit``'s trainable weights in the reduce dtype (the reduce-scatter
    input: dim 0 padded to a multiple of ``shards``) or in the compute dtype (as autograd makes them)."""
    d = to_dtype(cfg.parallel.reduce_dtype if dtype == "reduce" else cfg.parallel.param_dtype)
    return sum(_rank0_numel(p, shards) * shards for p in unit.parameters() if p.requires_grad) * d.itemsize


def sharded_grad_bytes(unit: nn.Module, shards: int) -> int:
    return sum(_rank0_numel(p, shards) * p.dtype.itemsize for p in unit.parameters() if p.requires_grad)


def _backend(cfg: DictConfig) -> str:
    backend = cfg.parallel.backend
    if backend != "auto":
        return backend
    return "gloo" if cfg.trainer.device == "cpu" else "nccl"


def optimizer_step_temporaries(model: nn.Module, cfg: DictConfig, shards: int, optimizer_bytes: int) -> int:
    """Transient bytes of the optimizer step. AnyPrecisionAdamW updates in slices of CHUNK
    elements: at most four fp32 temporaries of a slice alive at once (the Kahan path). torch's
    AdamW on a GPU runs its foreach path, which takes a copy of every second moment (sqrt)."""
    if cfg.optim.name == "anyprecision_adamw":
        from .optim.anyprecision_adamw import CHUNK

        largest = max((_rank0_numel(p, shards) for p in model.parameters() if p.requires_grad), default=0)
        return 4 * 4 * min(largest, CHUNK)
    return optimizer_bytes // 2


def peak_schedule(model: nn.Module, cfg: DictConfig, shards: int, state: dict[str, int], activations: int
                  ) -> dict[str, Any]:
    """The highest moment of a steady training step (the optimizer state exists), walking FSDP2's
    schedule unit by unit (torch.distributed.fsdp._fully_shard, torch 2.11-2.13):

    - forward of unit k: the flat all-gather output of k-1 (kept until k's copy-out, to overlap
      the two), k's flat output and its unsharded parameters (one shard: no flat output, the
      unsharded copy only);
    - backward of unit k, later units' gradients already reduced and sharded, the largest of:
      (a) k's unsharded parameters, k-1's prefetched, k's unsharded gradients as autograd makes
      them, and k+1's reduce-scatter input (FSDP2 keeps one in flight);
      (b) the prefetch of k-1: its flat all-gather output beside its unsharded copy;
      (c) the reduce-scatter copy-in: k's gradients and its reduce-scatter input (k's
      parameters resharded, k+1's input released);
    - the optimizer step: all state, every gradient, and the step's temporaries.
    Activations (one micro-batch, as configured) are counted at every moment of forward and
    backward. Returns the peak, its moment, and the buffer bytes at that moment."""
    units = []
    for name, m in _units(model):
        units.append({"name": name, "G": gathered_bytes(m, cfg), "flat": gathered_bytes(m, cfg, shards, padded=True)
                      if shards > 1 else 0, "R": grad_bytes(m, cfg, 1, "compute"), "RS": grad_bytes(m, cfg, shards),
                      "g": sharded_grad_bytes(m, shards)})
    unit_ids = {id(p) for _, m in _units(model) for p in m.parameters()}
    root = [p for p in model.parameters() if id(p) not in unit_ids]  # final norm, head: gathered all step
    compute = to_dtype(cfg.parallel.param_dtype).itemsize
    root_gathered = sum(p.numel() for p in root) * compute
    root_grads = sum(p.numel() for p in root if p.requires_grad) * compute
    held = state["params_bytes"] + state["optimizer_bytes"] + root_gathered
    # gloo (CPU) copies in its collectives (measured, torch 2.13): all_gather_into_tensor one
    # output-sized buffer, reduce_scatter_tensor its input and one output. NCCL copies nothing.
    gloo = _backend(cfg) == "gloo" and shards > 1
    moments = []  # (where, gathered, gradient buffers, total)
    for k, u in enumerate(units):
        prev_flat = units[k - 1]["flat"] if k else 0
        gathered = prev_flat + u["flat"] * (2 if gloo else 1) + u["G"]
        moments.append((f"forward of {u['name']}", gathered, 0, held + gathered + activations))
    reduced = 0
    for k in reversed(range(len(units))):
        u, prev = units[k], units[k - 1] if k else None
        rs_after = units[k + 1]["RS"] if k + 1 < len(units) else 0
        g_prev = prev["G"] if prev else 0
        rs_out = u["RS"] // shards
        cases = [(u["G"] + g_prev, u["R"] + rs_after),  # (a) k's backward computes
                 (u["G"] + g_prev + (prev["flat"] * (2 if gloo else 1) if prev else 0), rs_after),  # (b) prefetch
                 (g_prev, u["R"] + u["RS"]),  # (c) reduce-scatter copy-in
                 (g_prev, u["RS"] + rs_out + ((u["RS"] + rs_out) if gloo else 0))]  # (d) the reduce-scatter
        gathered, grads = max(cases, key=sum)
        grads += root_grads
        moments.append((f"backward of {u['name']}", gathered, grads,
                        held + reduced + gathered + grads + activations))
        reduced += u["g"]
    temps = optimizer_step_temporaries(model, cfg, shards, state["optimizer_bytes"])
    moments.append(("optimizer step", 0, 0, held + state["grads_bytes"] + temps))
    where, gathered, grads, peak = max(moments, key=lambda m: m[3])
    return {"peak_bytes": peak, "peak_moment": where, "allgather_bytes": gathered + root_gathered,
            "reduce_scatter_bytes": grads, "optimizer_step_bytes": temps}


def activation_bytes(args, tokens: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Autograd's saved tensors for one micro-batch of ``tokens`` (flash / flex attention)."""
    d = dtype.itemsize
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    per_token_layer = (NORM_BYTES_PER_HIDDEN * h  # four RMSNorms, fp32 math
                       + 2 * d * h  # the normed inputs of attention and MLP
                       + d * (q + 2 * kv)  # q, k, v after RoPE
                       + 2 * d * q + 4 * args.num_attention_heads  # attention output / o_proj input, lse
                       + 4 * d * i)  # gate, gelu(gate), up, gate * up
    layers = args.num_hidden_layers
    embed = d * h  # the embedding output
    if checkpointing:
        # each layer keeps its input; one layer at a time is recomputed in backward, and its
        # activation gradients (the largest: two [I] tensors) live beside it
        return tokens * (embed + layers * d * h + per_token_layer + 2 * d * i)
    return tokens * (embed + layers * per_token_layer + 2 * d * i)


# ---- data: what a step really carries ------------------------------------------------------
def step_shape(cfg: DictConfig, world: int, steps: int = 32) -> dict[str, Any]:
    """Tokens per GPU per step, micro-batches and sequence lengths per rank, from the training
    file's real lengths and the real sampler at this world size (the first ``steps`` steps)."""
    from .datasets import load_split, resolve_task, train_sampler

    dcfg = cfg.data
    task = resolve_task(dcfg)
    ds = load_split(dcfg, task, "train", None, seed=cfg.trainer.seed)
    sampler = train_sampler(ds, dcfg, world_size=world, rank=0, seed=cfg.trainer.seed)
    n = min(steps, sampler.steps_per_epoch)
    tokens, micro, fill, seqs = [], [], [], []
    for s in range(n):
        plan = sampler.plan_global(0, s)
        for rank_plan in plan:
            t = [sum(int(ds.lengths[j]) for j, w in zip(mb.indices, mb.weights) if w > 0) for mb in rank_plan]
            tokens.append(sum(t))
            micro.append(len(rank_plan))
            fill += [x / dcfg.max_tokens for x in t]
        seqs.append([int(ds.lengths[j]) for mb in plan[0] for j, w in zip(mb.indices, mb.weights) if w > 0])
    return {"rows": len(ds), "tokens_per_gpu_per_step": float(np.mean(tokens)), "micro_batches": float(np.mean(micro)),
            "budget_fill": float(np.mean(fill)), "rank0_seq_lens": seqs, "median_length": float(np.median(ds.lengths))}


# ---- the plan ------------------------------------------------------------------------------
def _architecture(cfg: DictConfig, notes: list[str]):
    from .build import model_args
    from .datasets import resolve_task

    task = resolve_task(cfg.data)
    try:
        return model_args(cfg.model, task)
    except ConfigError as e:
        if not cfg.model.name_or_path:
            raise
        notes.append(f"architecture from the model preset {cfg.model.name!r}: {e}")
        mcfg = OmegaConf.merge(cfg.model, {"name_or_path": None})
        return model_args(mcfg, task)


def plan(cfg: DictConfig) -> PlanResult:
    """The plan of ``cfg`` at ``plan.world_size`` (default: launcher.nodes x GPUs per node)."""
    pc, lc = cfg.plan, cfg.launcher
    gpus_per_node = int(lc.nproc_per_node or lc.gpus_per_node or 1)
    world = int(pc.world_size or lc.nodes * gpus_per_node)
    nodes = max(1, math.ceil(world / gpus_per_node))
    notes: list[str] = []
    args = _architecture(cfg, notes)
    dp_replicate = int(cfg.parallel.dp_replicate)
    shards = world // max(dp_replicate, 1)
    with fake_world(world):
        model, mesh = sharded_model(cfg, args, world)
        state = state_bytes(model, cfg, shards)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        gathered_full = sum(gathered_bytes(u, cfg, max(shards, 2)) for _, u in _units(model))
        trainable_full = grad_bytes(model, cfg)
        mesh_shape = list(mesh.shape)
        args_dtype = to_dtype(cfg.parallel.param_dtype)
        ac = bool(cfg.model.activation_checkpointing)
        act = activation_bytes(args, cfg.data.max_tokens, args_dtype, ac)
        act_other = activation_bytes(args, cfg.data.max_tokens, args_dtype, not ac)
        schedule = peak_schedule(model, cfg, shards, state, act)
        del model

    try:
        shape = step_shape(cfg, world)
    except Exception as e:  # noqa: BLE001 - a plan without the data is still a plan
        shape = None
        notes.append(f"training data not readable here ({str(e).splitlines()[0][:200]}): budget fill, tokens and "
                     "FLOPs per step are computed for full micro-batches of data.max_tokens")
    overhead = int(pc.overhead_gb * GB)
    per_device = {**state, "allgather_bytes": schedule["allgather_bytes"],
                  "reduce_scatter_bytes": schedule["reduce_scatter_bytes"],
                  "optimizer_step_bytes": schedule["optimizer_step_bytes"], "activations_bytes": act,
                  f"activations_{'without' if ac else 'with'}_checkpointing_bytes": act_other,
                  "overhead_bytes": overhead, "peak_bytes": schedule["peak_bytes"] + overhead}
    capacity = int(pc.gpu_memory_gb * GB)
    fits = per_device["peak_bytes"] <= capacity

    # work and traffic per GPU per step
    from .flops import flops_breakdown

    micro = shape["micro_batches"] if shape else 1.0
    seqs = [x for step in shape["rank0_seq_lens"] for x in step] if shape else [cfg.data.max_length] * max(
        1, cfg.data.max_tokens // cfg.data.max_length)
    n_steps = len(shape["rank0_seq_lens"]) if shape else 1
    fb = flops_breakdown(args, seqs, training=True, last_layer_pooled_only=args.last_layer_pooled_only)
    adapter = cfg.model.adapter.name
    linear = fb["linear"] * (2 / 3 if adapter != "none" else 1)  # frozen weights: no weight gradients
    flops = (linear + fb["attention"] + fb["head"]) / n_steps
    ring = (shards - 1) / shards if shards > 1 else 0.0
    reshard = bool(cfg.parallel.reshard_after_forward)
    comm = micro * ring * (gathered_full * (2 if reshard else 1) + trainable_full)
    if dp_replicate > 1:  # HSDP: gradients all-reduced across replicas once per micro-batch
        comm += micro * 2 * (dp_replicate - 1) / dp_replicate * trainable_full / shards
    bw = (pc.intra_node_gb_s if nodes == 1 else pc.inter_node_gb_s) * GB
    comm_s = comm / bw if comm else 0.0
    peak = pc.peak_tflops * 1e12 if pc.peak_tflops else (cfg.trainer.peak_flops_per_device or 989e12)
    compute_s = flops / (peak * pc.mfu)
    step_s = max(compute_s, comm_s)
    bound = "communication" if comm_s > compute_s else "compute"

    warnings = []
    if not fits:
        warnings.append(f"does not fit: peak {per_device['peak_bytes'] / GB:.1f} GB > {pc.gpu_memory_gb:g} GB per GPU; "
                        + ("lower data.max_tokens, use more GPUs, or train adapters (model/adapter=lora|qlora)" if ac
                           else "set model.activation_checkpointing=true (activations "
                           f"{act / GB:.1f} -> {act_other / GB:.1f} GB), lower data.max_tokens or use more GPUs"))
    if shape and shape["budget_fill"] < 0.5:
        rows = math.ceil(cfg.data.global_batch_rows * 0.9 / max(shape["budget_fill"], 1e-3))
        fewer = max(1, math.floor(world * shape["budget_fill"] / 0.9))
        warnings.append(f"low budget fill {shape['budget_fill']:.0%}: each GPU gets "
                        f"~{shape['tokens_per_gpu_per_step']:,.0f} tokens per step of a {cfg.data.max_tokens:,}-token "
                        f"budget, while every step still moves the whole model; use fewer GPUs (~{fewer}) or more rows "
                        f"per step (data.global_batch_rows={rows})")
    if bound == "communication":
        warnings.append(f"communication-bound: {comm / GB:.1f} GB of FSDP traffic per GPU per step take "
                        f"{comm_s:.2f} s against {compute_s:.2f} s of compute; use fewer GPUs, more tokens per GPU per "
                        "step (data.global_batch_rows), or HSDP across nodes (parallel.dp_replicate=<nodes>)")
    dtype = to_dtype(cfg.model.dtype)
    export_host = (max(5 * GB, max(p.numel() for p in _shapes(args)) * dtype.itemsize) if adapter == "none"
                   else total * dtype.itemsize)
    return PlanResult(
        world_size=world, nodes=nodes, gpus_per_node=gpus_per_node, mesh=mesh_shape, adapter=adapter,
        architecture=args.architecture(), per_device=per_device, fits=fits, gpu_memory_bytes=capacity,
        peak_moment=schedule["peak_moment"], activation_checkpointing=ac, trainable_params=trainable,
        total_params=total,
        budget_fill=shape["budget_fill"] if shape else None,
        tokens_per_gpu_per_step=shape["tokens_per_gpu_per_step"] if shape else None,
        micro_batches_per_step=shape["micro_batches"] if shape else None,
        flops_per_gpu_per_step=flops, comm_bytes_per_gpu_per_step=comm, compute_s=compute_s, comm_s=comm_s,
        step_time_s=step_s, bound=bound, export_host_bytes=int(export_host),
        assumptions={"peak_flops": peak, "mfu": pc.mfu, "link_gb_s": bw / GB,
                     "link": "intra-node" if nodes == 1 else "inter-node", "overhead_gb": pc.overhead_gb},
        warnings=warnings, notes=notes)


def _shapes(args) -> list[torch.Size]:
    from .model import Gemma2Classifier

    with torch.device("meta"):
        return [p.shape for p in Gemma2Classifier(args).parameters()]


def verdict(p: PlanResult) -> str:
    """One line: fits or not, peak, step time and its bound, the budget fill."""
    head = "fits" if p.fits else "DOES NOT FIT"
    fill = f", budget fill {p.budget_fill:.0%}" if p.budget_fill is not None else ""
    return (f"plan: {head} ({p.per_device['peak_bytes'] / GB:.1f} of {p.gpu_memory_bytes / GB:.0f} GB per GPU at "
            f"{p.world_size} GPUs), ~{p.step_time_s:.2f} s/step {p.bound}-bound{fill}"
            + (f"; {len(p.warnings)} warning(s)" if p.warnings else ""))


def report(p: PlanResult) -> str:
    d = p.per_device
    rows = [("parameters", d["params_bytes"]), ("  of which NF4 base", d["nf4_base_bytes"]),
            ("  of which adapters", d["adapter_bytes"]), ("gradients", d["grads_bytes"]),
            ("optimizer state", d["optimizer_bytes"]),
            ("optimizer step temporaries", d["optimizer_step_bytes"]),
            ("gathered weights at the peak", d["allgather_bytes"]),
            ("unsharded gradients at the peak", d["reduce_scatter_bytes"]),
            (f"activations (checkpointing {'on' if p.activation_checkpointing else 'off'})", d["activations_bytes"]),
            *[(k.removesuffix("_bytes").replace("_", " "), v) for k, v in d.items() if k.startswith("activations_w")],
            ("overhead (context, allocator, NCCL)", d["overhead_bytes"]),
            (f"peak ({p.peak_moment})", d["peak_bytes"])]
    lines = [f"world size {p.world_size} ({p.nodes} node(s) x {p.gpus_per_node}), mesh {p.mesh}, adapter {p.adapter}; "
             f"{p.trainable_params:,} of {p.total_params:,} parameters train",
             "per GPU:"] + [f"  {name:48s} {b / GB:9.2f} GB" for name, b in rows]
    if p.budget_fill is not None:
        lines.append(f"tokens per GPU per step {p.tokens_per_gpu_per_step:,.0f} in {p.micro_batches_per_step:.1f} "
                     f"micro-batch(es); budget fill {p.budget_fill:.0%}")
    lines += [f"FLOPs per GPU per step {p.flops_per_gpu_per_step:.3g}; FSDP traffic per GPU per step "
              f"{p.comm_bytes_per_gpu_per_step / GB:.2f} GB",
              f"step time ~{p.step_time_s:.2f} s (compute {p.compute_s:.2f} s at {p.assumptions['mfu']:.0%} MFU of "
              f"{p.assumptions['peak_flops'] / 1e12:.0f} TFLOP/s; communication {p.comm_s:.2f} s at "
              f"{p.assumptions['link_gb_s']:g} GB/s {p.assumptions['link']}): {p.bound}-bound",
              f"export host memory ~{p.export_host_bytes / GB:.1f} GB", *[f"note: {n}" for n in p.notes],
              *[f"warning: {w}" for w in p.warnings], verdict(p)]
    return "\n".join(lines)
