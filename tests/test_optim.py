"""AnyPrecisionAdamW, parameter groups, LR schedule and build_optimizer (CPU, fast)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trainer.config import OptimConfig
from trainer.optim import (
    AnyPrecisionAdamW,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    build_scheduler_from_cfg,
    lr_lambda,
)


class TinyNet(nn.Module):
    """Embedding + norm + biased linears: one of each parameter kind the groups care about."""

    def __init__(self, vocab: int = 32, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed_tokens(ids).mean(dim=1))
        return self.fc2(torch.tanh(self.fc1(x)))


def _batches(steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 32, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(steps)
    ]


def _train(model, opt, batches, sched=None) -> None:
    for ids, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(ids).float(), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    return max(
        (full(p).float() - full(q).float()).abs().max().item()
        for p, q in zip(a.parameters(), b.parameters())
    )


# --------------------------------------------------------------------------- AdamW equivalence


def test_fp32_matches_torch_adamw_with_groups_and_schedule():
    torch.manual_seed(0)
    ref = TinyNet()
    init = copy.deepcopy(ref)
    ours = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW(
        build_param_groups(ref, 0.1), lr=3e-3, betas=(0.9, 0.99), eps=1e-6, foreach=False
    )
    opt = AnyPrecisionAdamW(build_param_groups(ours, 0.1), lr=3e-3, betas=(0.9, 0.99), eps=1e-6)
    sched_ref = build_scheduler(opt_ref, 20, warmup_steps=5, decay="cosine")
    sched = build_scheduler(opt, 20, warmup_steps=5, decay="cosine")
    batches = _batches(20)
    _train(ref, opt_ref, batches, sched_ref)
    _train(ours, opt, batches, sched)
    diff = _max_diff(ref, ours)
    print(f"\nfp32 AnyPrecisionAdamW vs torch.optim.AdamW, 20 steps: max |diff| = {diff:.3e}")
    assert diff < 1e-6
    assert _max_diff(ref, init) > 1e-3  # the models did train


def test_kahan_bf16_tracks_fp32_better_than_plain_bf16():
    """lr 1e-4 on O(1) weights: each update is ~1/80 of a bf16 ulp (2**-7 at 1.0), so plain
    bf16 rounds almost every update away; Kahan accumulates them in the compensation buffer."""
    torch.manual_seed(0)
    n, steps, lr = 4096, 300, 1e-4
    init = torch.randn(n).bfloat16()
    direction = torch.randn(n)
    g = torch.Generator().manual_seed(1)
    grads = [(direction + 0.5 * torch.randn(n, generator=g)).bfloat16() for _ in range(steps)]

    def run(dtype, **kw):
        p = nn.Parameter(init.to(dtype, copy=True))  # copy: must not alias init
        opt = AnyPrecisionAdamW([p], lr=lr, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, **kw)
        for grad in grads:
            p.grad = grad.to(dtype)
            opt.step()
        return p.detach().float()

    ref = run(torch.float32)  # fp32 params and states: the target trajectory
    bf16 = dict(momentum_dtype=torch.bfloat16, variance_dtype=torch.bfloat16)
    plain = run(torch.bfloat16, **bf16)
    kahan = run(
        torch.bfloat16,
        use_kahan_summation=True,
        compensation_buffer_dtype=torch.bfloat16,
        **bf16,
    )

    moved = (ref - init.float()).norm().item()
    plain_err = (plain - ref).norm().item() / moved
    kahan_err = (kahan - ref).norm().item() / moved
    # Floor: the error of merely storing the fp32 result in bf16.
    floor = (ref.bfloat16().float() - ref).norm().item() / moved
    print(
        f"\nbf16 vs fp32 AdamW after {steps} steps at lr={lr} (relative L2 error of the weights):"
        f" plain={plain_err:.4f} kahan={kahan_err:.4f} (bf16 storage floor {floor:.4f})"
    )
    assert kahan_err < 0.5 * plain_err
    assert kahan_err < 0.1


# --------------------------------------------------------------------------- state dict


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (torch.float32, {}),
        # bf16 params with fp32 moments: torch's default load would round moments to bf16.
        (torch.bfloat16, dict(use_kahan_summation=True)),
        (
            torch.bfloat16,
            dict(
                use_kahan_summation=True,
                momentum_dtype=torch.bfloat16,
                variance_dtype=torch.bfloat16,
            ),
        ),
    ],
)
def test_state_dict_round_trip_matches_uninterrupted(dtype, kw):
    torch.manual_seed(0)
    base = TinyNet().to(dtype)
    batches = _batches(10)

    def make(model):
        opt = AnyPrecisionAdamW(build_param_groups(model, 0.01), lr=1e-3, **kw)
        return opt, build_scheduler(opt, 10, warmup_ratio=0.2)

    full = copy.deepcopy(base)
    opt, sched = make(full)
    _train(full, opt, batches, sched)

    first = copy.deepcopy(base)
    opt, sched = make(first)
    _train(first, opt, batches[:4], sched)
    ckpt = copy.deepcopy(
        {"model": first.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}
    )

    resumed = copy.deepcopy(base)
    resumed.load_state_dict(ckpt["model"])
    opt, sched = make(resumed)
    opt.load_state_dict(ckpt["optim"])
    sched.load_state_dict(ckpt["sched"])
    state = opt.state[next(resumed.parameters())]
    assert state["exp_avg"].dtype == opt.momentum_dtype
    assert state["exp_avg_sq"].dtype == opt.variance_dtype
    assert state["step"].item() == 4
    _train(resumed, opt, batches[4:], sched)
    assert _max_diff(full, resumed) == 0.0


# --------------------------------------------------------------------------- FSDP2 / DTensor


@pytest.fixture
def gloo_world(tmp_path):
    """A 1-rank gloo process group (FileStore: no port race) torn down after the test."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield torch.distributed.device_mesh.init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype,kahan", [(torch.float32, False), (torch.bfloat16, True)])
def test_fsdp2_dtensor_matches_unsharded_and_dcp_round_trip(gloo_world, tmp_path, dtype, kahan):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    base = TinyNet().to(dtype)
    batches = _batches(8)
    kw = dict(lr=1e-3, weight_decay=0.01, use_kahan_summation=kahan)
    if dtype == torch.bfloat16:
        kw.update(momentum_dtype=torch.bfloat16, variance_dtype=torch.bfloat16)

    def sharded():
        model = copy.deepcopy(base)
        fully_shard(model.fc1, mesh=gloo_world)
        fully_shard(model, mesh=gloo_world)
        return model, AnyPrecisionAdamW(build_param_groups(model, 0.01), **kw)

    plain = copy.deepcopy(base)
    _train(plain, AnyPrecisionAdamW(build_param_groups(plain, 0.01), **kw), batches)

    model, opt = sharded()
    # Same names -> same groups as the unsharded model.
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in base.named_parameters()]
    _train(model, opt, batches)
    state = opt.state[model.fc1.weight]
    assert isinstance(model.fc1.weight, DTensor) and isinstance(state["exp_avg"], DTensor)
    if kahan:
        assert isinstance(state["compensation"], DTensor)
    diff = _max_diff(plain, model)
    print(f"\nFSDP2 ({dtype}, kahan={kahan}) vs unsharded after 8 steps: max |diff| = {diff:.3e}")
    assert diff < 1e-6

    # DCP round trip: 3 steps, save, load into a fresh sharded model + optimizer, 5 more.
    model, opt = sharded()
    _train(model, opt, batches[:3])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"))

    model, opt = sharded()
    msd, osd = get_state_dict(model, opt)  # initialises optimizer state as load targets
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    state = opt.state[model.fc1.weight]
    assert state["step"].item() == 3
    assert state["exp_avg"].dtype == opt.momentum_dtype
    _train(model, opt, batches[3:])
    diff = _max_diff(plain, model)
    assert diff < 1e-6, f"resumed via DCP differs by {diff}"


# --------------------------------------------------------------------------- schedule


def test_linear_schedule_key_steps():
    f = lambda s: lr_lambda(s, warmup_steps=10, total_steps=100, decay="linear")  # noqa: E731
    assert f(0) == pytest.approx(0.1)  # first step: 1/warmup, not 0
    assert f(9) == pytest.approx(1.0)  # last warmup step reaches the peak
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)  # halfway through the 90 decay steps
    assert f(100) == pytest.approx(0.0)
    assert f(150) == pytest.approx(0.0)  # clamped past the end
    g = lambda s: lr_lambda(  # noqa: E731
        s, warmup_steps=10, total_steps=100, decay="linear", min_lr_ratio=0.1
    )
    assert g(55) == pytest.approx(0.55) and g(100) == pytest.approx(0.1)


def test_cosine_and_constant_schedule_key_steps():
    f = lambda s: lr_lambda(s, warmup_steps=10, total_steps=110, decay="cosine")  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))  # a quarter in
    assert f(60) == pytest.approx(0.5)  # middle
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    h = lambda s: lr_lambda(  # noqa: E731
        s, warmup_steps=10, total_steps=110, decay="cosine", min_lr_ratio=0.2
    )
    assert h(60) == pytest.approx(0.6) and h(110) == pytest.approx(0.2)
    c = lambda s: lr_lambda(s, warmup_steps=4, total_steps=10, decay="constant")  # noqa: E731
    assert [c(s) for s in (0, 3, 9, 50)] == pytest.approx([0.25, 1.0, 1.0, 1.0])
    assert lr_lambda(0, warmup_steps=0, total_steps=10) == 1.0
    with pytest.raises(ValueError):
        lr_lambda(0, warmup_steps=0, total_steps=10, decay="step")


def test_build_scheduler_drives_group_lrs_and_round_trips():
    model = TinyNet()
    opt = AnyPrecisionAdamW(build_param_groups(model, 0.01), lr=1e-3)
    opt.param_groups[1]["lr"] = 5e-4  # per-group base lr is scaled independently
    sched = build_scheduler(opt, 100, warmup_ratio=0.1, decay="linear")
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 5e-5])  # step 0
    for _ in range(55):
        opt.step()  # no grads: a no-op, keeps LambdaLR's step-order check quiet
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2.5e-4])

    opt2 = AnyPrecisionAdamW(build_param_groups(model, 0.01), lr=1e-3)
    opt2.param_groups[1]["lr"] = 5e-4
    sched2 = build_scheduler(opt2, 100, warmup_ratio=0.1, decay="linear")
    sched2.load_state_dict(sched.state_dict())
    for o, s in ((opt, sched), (opt2, sched2)):
        o.step()
        s.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())


# --------------------------------------------------------------------------- param groups


def test_param_groups_split():
    model = TinyNet()
    model.register_parameter("pos_embedding", nn.Parameter(torch.zeros(4, 16)))
    decay, no_decay = build_param_groups(model, 0.05)
    name = {id(p): n for n, p in model.named_parameters()}
    assert sorted(name[id(p)] for p in decay["params"]) == ["fc1.weight", "fc2.weight"]
    assert sorted(name[id(p)] for p in no_decay["params"]) == [
        "embed_tokens.weight", "fc1.bias", "fc2.bias", "norm.bias", "norm.weight", "pos_embedding",
    ]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0

    model.fc2.requires_grad_(False)  # frozen parameters are left out
    decay, no_decay = build_param_groups(model, 0.05, no_decay_embeddings=False)
    assert sorted(name[id(p)] for p in decay["params"]) == [
        "embed_tokens.weight", "fc1.weight", "pos_embedding",
    ]
    no_decay_names = sorted(name[id(p)] for p in no_decay["params"])
    assert no_decay_names == ["fc1.bias", "norm.bias", "norm.weight"]


# --------------------------------------------------------------------------- build_optimizer


def test_build_optimizer_from_dataclass_and_omegaconf():
    model = TinyNet().bfloat16()
    cfg = OptimConfig()  # the schema the Hydra optim group is checked against
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, AnyPrecisionAdamW) and opt.use_kahan_summation
    assert opt.momentum_dtype == opt.variance_dtype == torch.bfloat16
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    sched = build_scheduler_from_cfg(opt, cfg, total_steps=50)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-6 / 5)

    omegaconf = pytest.importorskip("omegaconf")
    dcfg = omegaconf.OmegaConf.structured(OptimConfig(name="adamw", betas=[0.9, 0.95]))
    opt = build_optimizer(TinyNet(), dcfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.9, 0.95)

    # Missing optional fields fall back to defaults; unknown names are rejected.
    opt = build_optimizer(TinyNet(), SimpleNamespace(name="anyprecision_adamw", lr=1e-4))
    assert opt.momentum_dtype == torch.float32 and not opt.use_kahan_summation
    with pytest.raises(ValueError):
        build_optimizer(TinyNet(), SimpleNamespace(name="sgd"))
    assert sched.state_dict()["last_epoch"] == 0


@pytest.mark.parametrize("kw", [dict(), dict(use_kahan_summation=True, momentum_dtype=torch.bfloat16,
                                              variance_dtype=torch.bfloat16)], ids=["fp32", "bf16-kahan"])
def test_sliced_update_equals_the_whole_tensor_update(monkeypatch, kw):
    """Large tensors update in slices of CHUNK elements (bounded fp32 temporaries); the result
    is bitwise the whole-tensor update's, including a ragged last slice and weight decay."""
    import trainer.optim.anyprecision_adamw as apaw

    dtype = torch.bfloat16 if kw else torch.float32
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(37, 101, generator=g).to(dtype)
    grads = [torch.randn(37, 101, generator=g).to(dtype) for _ in range(3)]
    results = []
    for chunk in (1 << 22, 64):
        monkeypatch.setattr(apaw, "CHUNK", chunk)
        p = nn.Parameter(w0.clone())
        opt = AnyPrecisionAdamW([p], lr=1e-2, weight_decay=0.1, **kw)
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (p1, s1), (p2, s2) = results
    assert torch.equal(p1, p2) and not torch.equal(p1, w0)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
