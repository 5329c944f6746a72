"""Invariants of the report's triplet sampler and the P x K identity sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from training.data.samplers import PKSampler, TripletSampler, label_to_indices

# 7 identities with 1, 2, 3, 4, 5, 9 and 12 images, interleaved.
SIZES = {10: 1, 11: 2, 12: 3, 13: 4, 14: 5, 15: 9, 16: 12}
LABELS = [lab for lab, n in SIZES.items() for _ in range(n)]
LABELS = list(np.random.default_rng(0).permutation(LABELS))


def test_label_to_indices():
    groups = label_to_indices([3, 1, 3, 2, 1])
    assert {k: v.tolist() for k, v in groups.items()} == {3: [0, 2], 1: [1, 4], 2: [3]}


def test_triplets_positive_same_identity_negative_other():
    sampler = TripletSampler(LABELS, batch_size=8, seed=1)
    labels = np.asarray(LABELS)
    seen = []
    for anchors, positives, negatives in sampler:
        assert len(anchors) == len(positives) == len(negatives) == 8
        assert (labels[positives] == labels[anchors]).all()
        assert (labels[negatives] != labels[anchors]).all()
        single = np.asarray([(labels == labels[a]).sum() == 1 for a in anchors])
        assert (positives[~single] != anchors[~single]).all()  # another image whenever there is one
        assert (positives[single] == anchors[single]).all()
        seen.extend(anchors.tolist())
    assert len(sampler) == len(LABELS) // 8 and len(seen) == len(set(seen)) == len(sampler) * 8


def test_triplets_reproducible_and_vary_by_epoch():
    a, b = TripletSampler(LABELS, 8, seed=3), TripletSampler(LABELS, 8, seed=3)
    first = [np.concatenate(t) for t in a]
    assert all((x == y).all() for x, y in zip(first, (np.concatenate(t) for t in b), strict=True))
    a.set_epoch(1)
    assert any((x != y).any() for x, y in zip(first, (np.concatenate(t) for t in a), strict=True))


@pytest.mark.parametrize(("p", "k"), [(4, 4), (3, 2), (7, 3)])
def test_pk_batches_hold_p_identities_times_k(p, k):
    sampler = PKSampler(LABELS, p=p, k=k, seed=0)
    labels = np.asarray(LABELS)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == p * k
        counts = Counter(labels[batch].tolist())
        assert len(counts) == p and set(counts.values()) == {k}
    # Identities with fewer than K images are topped up with repeats, the others never repeat.
    for lab, idx in label_to_indices(LABELS).items():
        used = [i for b in batches for i in b if labels[i] == lab]
        if len(idx) >= k:
            assert len(used) == len(set(used))
        assert set(used) <= set(idx.tolist())


def test_pk_epoch_covers_most_images_and_is_deterministic():
    sampler = PKSampler(LABELS, p=3, k=2, seed=5)
    used = {i for b in sampler for i in b.tolist()}
    assert len(used) >= 0.7 * len(LABELS)
    again = PKSampler(LABELS, p=3, k=2, seed=5)
    assert all((x == y).all() for x, y in zip(sampler, again, strict=True))
    again.set_epoch(1)
    assert any((x != y).any() for x, y in zip(sampler, again, strict=False))


def test_pk_needs_p_identities():
    with pytest.raises(ValueError, match="at least P=8"):
        PKSampler(LABELS, p=8, k=4)
