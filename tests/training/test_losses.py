"""Loss values on hand-computed examples: the report's triplet, batch-hard triplet, identity CE."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    MultiHeadCrossEntropy,
    batch_hard_triplet_loss,
    cosface_loss,
    identity_loss,
    pairwise_distances,
    triplet_loss,
)


def test_report_triplet_squared_euclidean_margin_10():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    n = torch.tensor([[2.0, 0.0], [5.0, 0.0]])
    # Triplet 1: 1 - 4 + 10 = 7; triplet 2: 0 - 25 + 10 < 0 -> 0.
    assert triplet_loss(a, p, n).item() == pytest.approx(3.5)
    assert triplet_loss(a, p, n, margin=1.0).item() == pytest.approx(0.0)


def test_batch_hard_picks_farthest_positive_and_nearest_negative():
    x = torch.tensor([[0.0], [2.0], [3.0], [6.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    # Anchors: 2 - 3 + .3 -> 0; 2 - 1 + .3 = 1.3; 3 - 1 + .3 = 2.3; 3 - 4 + .3 -> 0.
    loss = batch_hard_triplet_loss(x, labels, margin=0.3)
    assert loss.item() == pytest.approx((1.3 + 2.3) / 4, abs=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_batch_hard_skips_anchors_without_positive_and_stays_finite():
    x = torch.zeros(3, 4, requires_grad=True)  # identical features: zero distances everywhere
    loss = batch_hard_triplet_loss(x, torch.tensor([0, 0, 1]), margin=0.3)
    assert loss.item() == pytest.approx(0.3, abs=1e-5)  # anchors 0 and 1 only; anchor 2 has no positive
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert batch_hard_triplet_loss(x, torch.tensor([0, 1, 2])).item() == 0.0


def test_pairwise_distances():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert pairwise_distances(x, squared=True)[0, 1].item() == pytest.approx(25.0)
    assert pairwise_distances(x)[0, 1].item() == pytest.approx(5.0)


def test_identity_loss_and_label_smoothing():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    label = torch.tensor([1])
    assert identity_loss(logits, label).item() == pytest.approx(-math.log(0.75))
    smoothed = 0.9 * -math.log(0.75) + 0.1 * 0.5 * (-math.log(0.25) - math.log(0.75))
    assert identity_loss(logits, label, label_smoothing=0.1).item() == pytest.approx(smoothed)


def test_cosface_subtracts_the_margin_from_the_true_class_only():
    cosines = torch.tensor([[0.5, 0.2], [0.1, 0.9]])
    labels = torch.tensor([0, 1])
    s, m = 10.0, 0.35
    # sample 0: logits s * (0.5 - m, 0.2); sample 1: s * (0.1, 0.9 - m)
    expected = 0.5 * (
        -math.log(math.exp(s * 0.15) / (math.exp(s * 0.15) + math.exp(s * 0.2)))
        - math.log(math.exp(s * 0.55) / (math.exp(s * 0.1) + math.exp(s * 0.55)))
    )
    assert cosface_loss(cosines, labels, scale=s, margin=m).item() == pytest.approx(expected, rel=1e-5)
    # no margin: plain cross-entropy of the scaled cosines
    plain = identity_loss(s * cosines, labels)
    assert cosface_loss(cosines, labels, scale=s, margin=0.0).item() == pytest.approx(plain.item())
    assert cosface_loss(cosines, labels, scale=s, margin=m) > plain


def test_multi_head_loss_sums_groups_and_smooths_labels():
    logits = {"a": torch.tensor([[0.0, math.log(3.0)]]), "b": torch.tensor([[math.log(3.0), 0.0, 0.0]])}
    targets = {"a": torch.tensor([1]), "b": torch.tensor([0])}  # p = 3/4 and 3/5
    weights = {"a": torch.ones(2), "b": torch.ones(3)}
    plain = MultiHeadCrossEntropy(weights)(logits, targets)
    assert plain["a"].item() == pytest.approx(-math.log(0.75))
    assert plain["loss"].item() == pytest.approx(-math.log(0.75) - math.log(0.6))
    smoothed = MultiHeadCrossEntropy(weights, label_smoothing=0.3)(logits, targets)
    expect_b = 0.7 * -math.log(0.6) + 0.3 / 3 * (-math.log(0.6) - 2 * math.log(0.2))
    assert smoothed["b"].item() == pytest.approx(expect_b)
