"""Parallelize a built model: activation checkpointing -> compile -> FSDP2, in that order.

Each decoder layer is one unit for all three (torchtitan's order: checkpointing wraps the
layer's forward, compile traces the checkpointed layer, and fully_shard puts the all-gather
hooks around the compiled layer). FSDP2 then wraps the embeddings and the root. The same code
runs on one CPU process (a world of one) and on many GPUs; HSDP (replicate across groups,
shard inside each) comes from a 2-D device mesh when dp_replicate > 1.

Both wrappers are composable (they hook the module in place), so parameter names never
change: checkpoints, HF export and optimizer groups see the plain model's names.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from .adapters import nf4
from .distributed import DistInfo
from .dtypes import DTYPES
from .errors import ConfigError


def build_mesh(info: DistInfo, dp_replicate: int) -> DeviceMesh:
    device_type = info.device.type
    if dp_replicate <= 1:
        return init_device_mesh(device_type, (info.world_size,), mesh_dim_names=("dp_shard",))
    if info.world_size % dp_replicate:
        raise ValueError(f"parallel.dp_replicate={dp_replicate} does not divide world size {info.world_size}")
    return init_device_mesh(device_type, (dp_replicate, info.world_size // dp_replicate),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them
    (non-reentrant; the RNG state is replayed, so dropout inside a layer would match)."""
    from torch.distributed._composable import checkpoint

    for layer in model.layers:
        checkpoint(layer)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each decoder layer's forward, with dynamic shapes (packed lengths vary).

    Only the layer's math is compiled: the module hooks around it (activation checkpointing,
    FSDP2's all-gather and reshard) stay eager, and the attention masks come in as inputs built
    ahead of the layers, so a checkpointed layer's recompute replays exactly its forward. The
    forward is replaced on the instance: parameter names do not change."""
    for layer in model.layers:
        layer.forward = _compiled(layer.forward, backend)


def _compiled(forward, backend: str):
    # dynamic=True: packed lengths change every step, so sizes (and host ints such as
    # max_seq_len) are symbolic from the first compile. Floats stay specialised: they are model
    # constants (the logit softcap, the attention scale), and flex attention's score_mod cannot
    # capture a symbolic float.
    compiled = torch.compile(forward, dynamic=True, backend=backend)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    return run


def parallelize(model: nn.Module, mesh: DeviceMesh, *, activation_checkpointing: bool = False,
                compile: bool = False, compile_backend: str = "inductor", **fsdp) -> nn.Module:
    """activation checkpointing -> compile -> fully_shard (``fsdp``: shard_model's options)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model, compile_backend)
    return shard_model(model, mesh, **fsdp)


def shard_model(model: nn.Module, mesh: DeviceMesh, *, param_dtype: str = "float32",
                reduce_dtype: str = "float32", reshard_after_forward: bool = True,
                cpu_offload: bool = False) -> nn.Module:
    """Apply fully_shard bottom-up. The model must expose `layers` and `embed_tokens`."""
    if cpu_offload and mesh.device_type == "cpu":
        raise ValueError("parallel.cpu_offload=true needs a CUDA device: on CPU the parameters already live in "
                         "host memory (set parallel.cpu_offload=false)")
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    common = dict(mesh=mesh, mp_policy=mp)
    quantized = {p for p in model.parameters() if nf4.is_nf4(p)}
    shards = mesh.size(mesh.ndim - 1)  # the dp_shard dimension (HSDP replicates over the other)
    if quantized and shards == 1:
        # Nothing to shard, and FSDP2's one-rank shortcut assumes one all-gather input per
        # parameter (NF4 has three): the NF4 weights stay plain, unmanaged tensors.
        common["ignored_params"] = quantized
    for p in quantized:
        _check_nf4_shardable(p, shards)
    if cpu_offload:
        common["offload_policy"] = CPUOffloadPolicy()
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        # The last layer's params are needed again right away by backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < n - 1, **common)
    fully_shard(model.embed_tokens, reshard_after_forward=reshard_after_forward, **common)
    fully_shard(model, reshard_after_forward=False, **common)
    return model


def _check_nf4_shardable(weight: torch.Tensor, shards: int) -> None:
    """FSDP2 cuts a weight into equal row chunks; an NF4 weight can only be cut where its rows,
    its scales and its double-quantisation blocks all divide evenly (no padding)."""
    rows, numel = weight.shape[0], weight.numel()
    per_factor = weight.block_size * weight.scaler_block_size
    if shards > 1 and (rows % shards or (numel // per_factor) % shards):
        raise ConfigError(f"a QLoRA weight of shape {tuple(weight.shape)} cannot be cut into {shards} FSDP shards: "
                         f"its rows ({rows}) and its {numel // per_factor} scale blocks of {per_factor} values must "
                         f"divide by {shards} (use another dp_shard size, or a smaller "
                         "model.adapter.nf4_scaler_block_size)")


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of this rank's shards of parameters (NF4 weights at their packed size), gradients
    and optimizer state."""

    nbytes = nf4.storage_bytes  # what the rank holds (NF4: codes and scales)

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            opt += sum(nbytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}
