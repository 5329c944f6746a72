"""Index samplers for re-ID training: the report's random triplets and the P x K identity batches.

Both work on a list of identity labels (one per image) and yield image indices; the task turns
indices into pixels through the uint8 cache, so no sampler ever touches an image.

- :class:`TripletSampler` is the report's ``TripletDataset``: for every anchor (the images in a
  shuffled order, ``batch_size`` at a time) one random positive, an image of the same identity (a
  different image whenever the identity has one), and one random negative, a random image of a random
  other identity, both drawn through a ``label -> indices`` map. A batch of 32 anchors therefore costs
  96 forward passes.
- :class:`PKSampler` draws P identities and K images of each per batch for batch-hard mining (Hermans
  et al. 2017; torchreid's ``RandomIdentitySampler``). Every batch holds exactly P distinct identities
  with exactly K images each: an identity with fewer than K images is topped up by sampling its images
  with replacement. An epoch walks over each identity's images in chunks of K, so one epoch sees
  about every image once.

Both are deterministic given ``seed`` and the epoch number (:meth:`set_epoch`), so ``--resume``
replays exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np


def label_to_indices(labels: Sequence[int]) -> dict[int, np.ndarray]:
    """Map each label to the (sorted) indices of its images: the report's ``label_to_indices``."""
    groups: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        groups[int(label)].append(index)
    return {label: np.asarray(idx, dtype=np.int64) for label, idx in groups.items()}


class TripletSampler:
    """Yields ``(anchors, positives, negatives)`` index arrays, ``batch_size`` anchors at a time."""

    def __init__(
        self, labels: Sequence[int], batch_size: int = 32, seed: int = 0, drop_last: bool = True
    ) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.by_label = label_to_indices(self.labels)
        if len(self.by_label) < 2:
            raise ValueError("triplet sampling needs at least two identities")
        self.label_set = np.asarray(sorted(self.by_label), dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def triplets(self, anchors: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random positive and a random negative for each anchor index."""
        positives = np.empty_like(anchors)
        negatives = np.empty_like(anchors)
        for i, anchor in enumerate(anchors):
            label = int(self.labels[anchor])
            same = self.by_label[label]
            others = same[same != anchor]  # never the anchor itself when another image exists
            positives[i] = rng.choice(others) if len(others) else anchor
            other = self.label_set[self.label_set != label]
            negatives[i] = rng.choice(self.by_label[int(rng.choice(other))])
        return positives, negatives

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.labels))
        for b in range(len(self)):
            anchors = order[b * self.batch_size : (b + 1) * self.batch_size]
            positives, negatives = self.triplets(anchors, rng)
            yield anchors, positives, negatives


class PKSampler:
    """Yields index arrays of length ``p * k``: P distinct identities, K images each, grouped by identity."""

    def __init__(self, labels: Sequence[int], p: int = 16, k: int = 4, seed: int = 0) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.by_label = label_to_indices(self.labels)
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be positive, got P={p}, K={k}")
        if len(self.by_label) < p:
            raise ValueError(
                f"P x K sampling needs at least P={p} identities, the data has {len(self.by_label)}"
            )
        self.p, self.k, self.seed = p, k, seed
        self.epoch = 0
        self._plans: dict[int, list[np.ndarray]] = {}

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """All batches of one epoch (cached, so ``len`` and iteration agree)."""
        if epoch in self._plans:
            return self._plans[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        chunks: dict[int, list[np.ndarray]] = {}
        for label in sorted(self.by_label):
            idx = self.by_label[label]
            # Fewer than K images: top up with replacement; otherwise a fresh order each epoch.
            idx = rng.choice(idx, size=self.k) if len(idx) < self.k else rng.permutation(idx)
            n = len(idx) // self.k  # a trailing partial chunk is dropped; other epochs reshuffle
            chunks[label] = [idx[i * self.k : (i + 1) * self.k] for i in range(n)]
        batches = []
        while True:
            available = np.asarray([lab for lab, c in chunks.items() if c], dtype=np.int64)
            if len(available) < self.p:
                break
            # Identities with more chunks left are drawn more often, so big identities do not pile up
            # at the end of the epoch when too few distinct identities remain to fill a batch.
            left = np.asarray([len(chunks[int(lab)]) for lab in available], dtype=np.float64)
            chosen = rng.choice(available, size=self.p, replace=False, p=left / left.sum())
            batches.append(np.concatenate([chunks[int(lab)].pop() for lab in chosen]))
        self._plans = {epoch: batches}  # keep only the current epoch
        return batches

    def __len__(self) -> int:
        return len(self._plan(self.epoch))

    def __iter__(self) -> Iterator[np.ndarray]:
        yield from self._plan(self.epoch)
