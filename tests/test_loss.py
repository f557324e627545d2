"""The training loss (trainer/loss.py) against hand-computed formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.errors import ConfigError
from trainer.loss import RowLoss, build_loss, soft_cross_entropy


def _batch(seed=0, b=6, c=3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=torch.float64).to(torch.bfloat16)
    labels = torch.softmax(torch.randn(b, c, generator=g), -1)
    labels[0] = torch.tensor([1.0, 0.0, 0.0])  # a hard label
    teacher = torch.softmax(2 * torch.randn(b, c, generator=g), -1)
    teacher[1] = torch.tensor([0.0, 0.25, 0.75])  # a class the teacher rules out
    return logits, labels, teacher


def _by_hand(logits, labels, teacher, w, t):
    """(1 - w) CE + w T^2 KL(q_T || p_T), row by row in float64 with math only."""
    out = []
    for z, y, q in zip(logits.float().tolist(), labels.tolist(), teacher.tolist()):
        lse = math.log(sum(math.exp(v) for v in z))
        ce = -sum(yc * (zc - lse) for yc, zc in zip(y, z))
        zt = [v / t for v in z]
        lse_t = math.log(sum(math.exp(v) for v in zt))
        log_p = [v - lse_t for v in zt]
        powers = [qc ** (1 / t) for qc in q]  # softmax(log q / T) = q^(1/T) / sum
        q_t = [p / sum(powers) for p in powers]
        kl = sum(qc * (math.log(qc) - lp) for qc, lp in zip(q_t, log_p) if qc > 0)
        out.append((1 - w) * ce + w * t * t * kl)
    return np.array(out)


@pytest.mark.parametrize("w,t", [(0.5, 1.0), (0.7, 2.0), (1.0, 0.5), (0.25, 3.0)])
def test_distill_is_the_mixture_of_ce_and_temperature_scaled_kl(w, t):
    logits, labels, teacher = _batch()
    got = RowLoss("distill", w, t)(logits, labels, teacher)
    assert got.dtype == torch.float32 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), _by_hand(logits, labels, teacher, w, t), rtol=1e-5, atol=1e-6)


def test_teacher_weight_zero_is_todays_loss_bitwise():
    logits, labels, teacher = _batch(1)
    ce = -(labels * torch.nn.functional.log_softmax(logits.float(), dim=-1)).sum(-1)  # wave 1's loss
    for loss in (RowLoss("ce"), RowLoss("distill", 0.0, 2.0), build_loss({"kind": "distill", "teacher_weight": 0.0,
                                                                          "temperature": 1.0})):
        assert torch.equal(loss(logits, labels, teacher), ce)
        assert torch.equal(loss(logits, labels, None), ce)  # needs no teacher
    assert torch.equal(soft_cross_entropy(logits, labels), ce)


def test_kl_term_is_zero_when_student_matches_teacher_and_gradients_flow():
    logits = torch.randn(4, 3, dtype=torch.float32, requires_grad=True)
    teacher = torch.softmax(logits.detach(), -1)
    labels = teacher.clone()
    pure_kl = RowLoss("distill", 1.0, 2.0)(logits, labels, teacher)
    assert pure_kl.abs().max() < 1e-6
    other = torch.softmax(torch.randn(4, 3), -1)
    RowLoss("distill", 0.5, 2.0)(logits, labels, other).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_distill_without_teacher_and_bad_kind_are_refused():
    logits, labels, _ = _batch()
    with pytest.raises(ValueError, match="no teacher probabilities"):
        RowLoss("distill", 0.5, 1.0)(logits, labels, None)
    with pytest.raises(ConfigError, match="loss.kind"):
        RowLoss("kl")


@pytest.mark.parametrize("override,key", [("loss.kind=mse", "loss.kind"),
                                          ("loss.teacher_weight=1.5", "loss.teacher_weight"),
                                          ("loss.temperature=0", "loss.temperature")])
def test_loss_config_is_validated(override, key):
    from trainer.config import compose

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(["+experiment=cpu_demo", override])
