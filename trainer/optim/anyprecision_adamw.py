"""AdamW with configurable state precision and optional Kahan-compensated updates.

Why: the recipe trains Gemma 2 fully in bf16 with no fp32 master weights. At lr ~1e-6 most
per-step updates are far below half a bf16 ulp of the weight (bf16 has 8 mantissa bits, so a
weight of 1.0 only moves in steps of 2**-7), and a plain ``p += update`` rounds them away.
Kahan summation keeps the part lost to rounding in a small per-parameter compensation buffer
and feeds it back into the next update, so updates accumulate as if the weights had more
precision, at 2 bytes per parameter instead of the 4 of an fp32 master copy.

Semantics are torch.optim.AdamW's (decoupled weight decay, bias-corrected moments,
``denom = sqrt(v) / sqrt(1 - beta2**t) + eps``). With fp32 params and states and Kahan off the
update runs the same op sequence as torch's single-tensor AdamW, so results are bitwise equal.

Only elementwise ops on tensors shaped like the parameter are used, so DTensor parameters
(FSDP2 ``fully_shard``) work unchanged: the state made with ``zeros_like`` is a DTensor with the
parameter's placements, and the update runs on the local shards.

Memory: the update of a large tensor runs in slices of ``CHUNK`` elements, so its fp32
temporaries (up to five in the Kahan path) stay at a few tens of MiB instead of five fp32 copies of
the largest shard (a 256k x 3584 embedding on one GPU: 18 GB). Elementwise ops give the same
value per element whatever the slicing; the slices start at multiples of any SIMD width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["AnyPrecisionAdamW", "CHUNK"]

CHUNK = 1 << 22  # elements per slice of one update: <= 5 fp32 temporaries of 16 MiB

# State tensor name -> attribute holding the dtype it is kept in.
_STATE_DTYPE_ATTR = {
    "exp_avg": "momentum_dtype",
    "exp_avg_sq": "variance_dtype",
    "compensation": "compensation_buffer_dtype",
}


class AnyPrecisionAdamW(Optimizer):
    """AdamW whose moments (and Kahan compensation buffer) may be kept in bf16.

    Args:
        params: parameters or param-group dicts (groups may override ``lr``, ``betas``,
            ``eps``, ``weight_decay``).
        use_kahan_summation: compensate the rounding error of ``p += update`` (meant for
            bf16 parameters; harmless but pointless for fp32 ones).
        momentum_dtype / variance_dtype: storage dtypes of ``exp_avg`` / ``exp_avg_sq``.
        compensation_buffer_dtype: storage dtype of the Kahan buffer. bf16 suffices because it
            only holds the residual, which is below one ulp of the bf16 weight.

    The dtypes and the Kahan flag are optimizer-wide attributes, not param-group entries, so
    ``state_dict()["param_groups"]`` holds only numbers (checkpoint-friendly).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        use_kahan_summation: bool = False,
        momentum_dtype: torch.dtype = torch.float32,
        variance_dtype: torch.dtype = torch.float32,
        compensation_buffer_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid lr: {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        self.use_kahan_summation = bool(use_kahan_summation)
        self.momentum_dtype = momentum_dtype
        self.variance_dtype = variance_dtype
        self.compensation_buffer_dtype = compensation_buffer_dtype
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        # "step" is a CPU fp32 scalar tensor like torch.optim.AdamW's, so DCP treats it the same.
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(
            p, dtype=self.momentum_dtype, memory_format=torch.preserve_format
        )
        state["exp_avg_sq"] = torch.zeros_like(
            p, dtype=self.variance_dtype, memory_format=torch.preserve_format
        )
        if self.use_kahan_summation:
            state["compensation"] = torch.zeros_like(
                p, dtype=self.compensation_buffer_dtype, memory_format=torch.preserve_format
            )
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr = float(group["lr"])  # float() also accepts a 0-dim tensor lr
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            weight_decay = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AnyPrecisionAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state = self._init_state(p)
                self._update(p, state, lr, beta1, beta2, eps, weight_decay)
        return loss

    def _update(
        self,
        p: torch.Tensor,
        state: dict[str, Any],
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
    ) -> None:
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        step = state["step"].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1
        tensors = [_flat_local(t) for t in (p, p.grad, exp_avg, exp_avg_sq, state.get("compensation"))]
        if any(t is None for t in tensors[:4]) or (self.use_kahan_summation and tensors[4] is None):
            # not viewable as one flat run: update whole
            tensors = [p, p.grad, exp_avg, exp_avg_sq, state.get("compensation")]
            spans = [slice(None)]
        else:
            n = tensors[0].numel()
            spans = [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)] or [slice(None)]
        for span in spans:
            p_, g_, m_, v_, c_ = (t if t is None else t[span] for t in tensors)
            self._update_slice(p_, g_, m_, v_, c_, lr, beta1, beta2, eps, weight_decay, step_size,
                               bias_correction2_sqrt)

    def _update_slice(self, p, grad, exp_avg, exp_avg_sq, comp, lr, beta1, beta2, eps, weight_decay, step_size,
                      bias_correction2_sqrt) -> None:
        # Moments are updated in their own storage dtype (.to is a no-op when dtypes match).
        exp_avg.lerp_(grad.to(exp_avg.dtype), 1 - beta1)
        g2 = grad.to(exp_avg_sq.dtype)
        exp_avg_sq.mul_(beta2).addcmul_(g2, g2, value=1 - beta2)

        all_fp32 = p.dtype == exp_avg.dtype == exp_avg_sq.dtype == torch.float32
        if all_fp32 and not self.use_kahan_summation:
            # Exactly torch's single-tensor AdamW op sequence -> bitwise-identical results.
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
            return

        # Low-precision path: form the whole update in fp32. Weight decay is folded into the
        # update (p*(1-lr*wd) + u == p + (u - lr*wd*p)) because on its own lr*wd*p is far below
        # a bf16 ulp and would be rounded away unless it goes through the compensation too.
        denom = (exp_avg_sq.float().sqrt() / bias_correction2_sqrt).add_(eps)
        update = exp_avg.float().div_(denom).mul_(-step_size)
        del denom
        if weight_decay != 0:
            update.add_(p.float(), alpha=-lr * weight_decay)

        if not self.use_kahan_summation:
            p.add_(update)  # computed in fp32, rounded once to p.dtype
            return

        # Kahan: y = update + carried error; p_new = round(p + y); error = y - (p_new - p).
        update.add_(comp.float())
        p_old = p.to(torch.float32, copy=True)  # copy: .float() would alias an fp32 p
        p.add_(update)
        # For bf16 p, (p_new - p_old) is exact in fp32, so the residual is exactly what rounding
        # dropped. Out-of-place subtraction: p.float() aliases p when p is fp32.
        comp.copy_(update.sub_(p.float() - p_old))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state, keeping each buffer in this optimizer's configured dtype.

        torch's Optimizer.load_state_dict casts every floating state tensor to the parameter's
        dtype; for bf16 params with fp32 moments that would round the moments through bf16.
        So we re-take the saved tensors and cast them to the configured dtypes instead.
        """
        saved_state = state_dict["state"]
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params))
        super().load_state_dict(state_dict)
        for pid, saved in saved_state.items():
            p = id_to_param.get(pid)
            if p is None:
                continue
            state = self.state[p]
            for key, attr in _STATE_DTYPE_ATTR.items():
                if key in saved:
                    state[key] = saved[key].to(device=p.device, dtype=getattr(self, attr))
            if self.use_kahan_summation and "compensation" not in state and "exp_avg" in state:
                # Resuming a non-Kahan checkpoint with Kahan on: start with zero error.
                state["compensation"] = torch.zeros_like(p, dtype=self.compensation_buffer_dtype)


def _flat_local(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``'s local data (a DTensor's shard) as a flat view, or None when it has no flat view."""
    if t is None:
        return None
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.view(-1) if local.is_contiguous() else None
