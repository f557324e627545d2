"""LossBuffer and classification_metrics against hand-computed values (sklearn not installed)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from trainer.metrics import LossBuffer, classification_metrics
from trainer.tasks.arena import CLASS_NAMES as ARENA

LN2 = math.log(2)


def test_metrics_hand_computed_with_soft_label_and_never_predicted_class():
    # classes: a, b, tie
    labels = np.array(
        [
            [1.0, 0.0, 0.0],  # r0 true a
            [0.0, 1.0, 0.0],  # r1 true b
            [0.0, 0.0, 1.0],  # r2 true tie
            [0.7, 0.3, 0.0],  # r3 soft, argmax a
            [0.0, 1.0, 0.0],  # r4 true b
        ]
    )
    probs = np.array(
        [
            [0.50, 0.25, 0.25],  # r0 pred a
            [0.25, 0.50, 0.25],  # r1 pred b
            [0.50, 0.25, 0.25],  # r2 pred a   (tie is never predicted)
            [0.25, 0.50, 0.25],  # r3 pred b
            [0.25, 0.50, 0.25],  # r4 pred b
        ]
    )
    m = classification_metrics(probs, labels, class_names=ARENA)

    # Cross-entropy per row, -sum_c y_c ln p_c, with ln 0.25 = 2 ln 0.5:
    #   r0: ln2   r1: ln2   r2: 2 ln2   r3: 0.7*2ln2 + 0.3*ln2 = 1.7 ln2   r4: ln2
    #   mean = (1 + 1 + 2 + 1.7 + 1) ln2 / 5 = 1.34 ln2
    assert m["log_loss"] == pytest.approx(1.34 * LN2, rel=1e-12)

    # true [a, b, tie, a, b] vs pred [a, b, a, b, b]: r0, r1, r4 right -> 3/5
    assert m["accuracy"] == pytest.approx(0.6)

    # Confusion (rows true, cols pred): a -> {a: r0, b: r3}; b -> {b: r1, r4}; tie -> {a: r2}
    np.testing.assert_array_equal(m["confusion_matrix"], [[1, 1, 0], [0, 2, 0], [1, 0, 0]])

    # a:   TP=1 (r0), FP=1 (r2), FN=1 (r3): P=1/2, R=1/2, F1=0.5
    # b:   TP=2 (r1,r4), FP=1 (r3), FN=0:   P=2/3, R=1,   F1=2*(2/3)*1/(5/3)=0.8
    # tie: TP=0, FP=0, FN=1: precision 0/0 -> 0 (zero_division=0), recall 0 -> F1=0
    assert m["f1_a"] == pytest.approx(0.5)
    assert m["f1_b"] == pytest.approx(0.8)
    assert m["f1_tie"] == 0.0
    # tie occurs in y_true, so it counts in the macro mean (as in sklearn): (0.5+0.8+0)/3
    assert m["macro_f1"] == pytest.approx(1.3 / 3)
    assert m["n"] == 5


def test_log_loss_clips_and_renormalises_like_sklearn():
    eps = 1e-15
    labels = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    probs = np.array(
        [
            [1.0, 0.0, 0.0],  # true class has p=0 -> clipped to eps; row sum 1+eps after clipping
            [0.4, 0.2, 0.2],  # sums to 0.8: renormalised to [0.5, 0.25, 0.25]
        ]
    )
    m = classification_metrics(probs, labels, eps=eps, class_names=ARENA)
    # row0: clip -> [1-eps, eps, eps], sum 1+eps, p_b = eps/(1+eps); row1: -ln 0.5
    row0 = -math.log(eps / (1 + eps))
    assert row0 == pytest.approx(34.538776, rel=1e-6)
    assert m["log_loss"] == pytest.approx((row0 + LN2) / 2, rel=1e-9)
    assert m["accuracy"] == 0.5


def test_macro_f1_skips_classes_absent_from_truth_and_predictions():
    # 4 classes, the last one neither true nor predicted: sklearn's default labels leave it out.
    labels = np.eye(4)[[0, 1, 1]]
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]])
    m = classification_metrics(probs, labels, class_names=("a", "b", "tie", "x"))
    # a: TP=1, FP=1, FN=0 -> 2/3;  b: TP=1, FP=0, FN=1 -> 2/3;  tie, x: absent -> 0, not averaged
    assert m["f1_a"] == pytest.approx(2 / 3) and m["f1_b"] == pytest.approx(2 / 3)
    assert m["f1_tie"] == 0.0 and m["f1_x"] == 0.0
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError):
        classification_metrics(np.ones((2, 3)) / 3, np.ones((2, 2)), class_names=ARENA)
    with pytest.raises(ValueError):
        classification_metrics(np.zeros((0, 3)), np.zeros((0, 3)), class_names=ARENA)
    with pytest.raises(ValueError):
        classification_metrics(np.ones((1, 2)) / 2, np.eye(2)[:1], class_names=ARENA)  # 3 names, 2 classes


def test_loss_buffer_wraps_and_weights():
    buf = LossBuffer(3)
    assert len(buf) == 0 and math.isnan(buf.mean())
    for v in (1.0, 2.0, 3.0):
        buf.push(v)
    assert len(buf) == 3 and buf.mean() == pytest.approx(2.0)
    buf.push(torch.tensor(4.0))  # overwrites 1.0 -> {2, 3, 4}
    assert len(buf) == 3 and buf.mean() == pytest.approx(3.0)
    buf.push(10.0, weight=2.0)  # overwrites 2.0 -> {(3,1), (4,1), (10,2)}: (3+4+20)/4
    assert buf.mean() == pytest.approx(6.75)

    partial = LossBuffer(5)
    partial.push(1.0, weight=3.0)
    partial.push(5.0, weight=1.0)
    assert len(partial) == 2 and partial.mean() == pytest.approx((3 + 5) / 4)  # filled part only


def test_loss_buffer_state_dict_round_trip():
    buf = LossBuffer(3)
    for i, v in enumerate((1.0, 2.0, 3.0, 4.0, 5.0)):
        buf.push(v, weight=i + 1)  # entries now (3,3), (4,4), (5,5)

    f = io.BytesIO()
    torch.save(buf.state_dict(), f)
    f.seek(0)
    state = torch.load(f, weights_only=True)  # plain tensors/ints only, no pickled objects

    same = LossBuffer(3)
    same.load_state_dict(state)
    assert len(same) == 3 and same.mean() == pytest.approx(buf.mean())
    for b in (buf, same):  # continuing overwrites the same (oldest) slot in both
        b.push(7.0, weight=1.0)
    assert same.mean() == pytest.approx(buf.mean()) == pytest.approx((16 + 25 + 7) / 10)

    small = LossBuffer(2)  # a smaller buffer keeps the newest entries
    small.load_state_dict(buf.state_dict())
    assert len(small) == 2 and small.mean() == pytest.approx((25 + 7) / 6)
    with pytest.raises(ValueError):
        LossBuffer(0)
