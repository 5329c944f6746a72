"""Attributes from a crop and its re-ID neighbours: each crop's class probabilities averaged with those of
its nearest crops in the same set, weighted by their cosine similarity.

Market-1501's attributes are labelled per identity, and one crop often hides what another shows (a
backpack seen from the front, a colour in shadow). Crops of one person are each other's nearest
neighbours under the re-ID embedding, so averaging over them votes the person's attributes into every
crop of that person, while a lone look-alike carries a weight of one among many. Offline only (it needs
the whole set of crops, as k-reciprocal re-ranking does): ``predict-attributes --neighbours-from``.
``evaluate-neighbours`` measures it on the distractor validation and records the rule in the attribute
bundle's manifest (``neighbour_smoothing``), including per-group logit adjustments re-chosen for the
averaged probabilities (docs/models.md, *Attributes from several crops*).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from training.evaluation.attributes import (
    AttributeEvaluator,
    adjust_logits,
    adjusted_metrics,
    logit_adjustment_tradeoff,
    per_group_taus,
)

NEIGHBOURS = 20  # the distractor validation's best of 10 / 20 / 30 (docs/models.md)
ALPHA = 1.0
# Neighbours must be more similar than all but this share of different-person pairs: with a lower floor
# a folder with few crops per person fills the places with other people and loses mA, with this one it
# keeps the dense folder's gain (docs/models.md, benchmarks/attribute_neighbours.py).
FALSE_MATCH_RATE = 1e-4


def nearest_neighbours(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar other rows (inner product of the L2-normalised embeddings), exact.

    Returns ``(indices, similarities)``, both (N, k), most similar first; with fewer than k + 1 rows the
    missing places hold index -1 and similarity 0.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, idx = index.search(x, min(k + 1, n))
    # Drop each row's own entry; a duplicate crop can tie with it and come first, so drop by index and,
    # where the row is not among its own results at all, drop the last (least similar) column.
    own = idx == np.arange(n)[:, None]
    own[~own.any(1), -1] = True
    keep = ~own
    idx = idx[keep].reshape(n, -1)
    sims = sims[keep].reshape(n, -1)
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        sims = np.pad(sims, ((0, 0), (0, pad)))
    return idx, sims


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def impostor_similarity(
    labelled: np.ndarray, others: np.ndarray, rate: float = FALSE_MATCH_RATE, chunk: int = 512
) -> float:
    """The cosine similarity that a share ``rate`` of the pairs (labelled crop, crop of another person)
    exceed: the similarity floor of the neighbours."""
    a = labelled / np.linalg.norm(labelled, axis=1, keepdims=True)
    b = others / np.linalg.norm(others, axis=1, keepdims=True)
    total = len(a) * len(b)
    keep = max(1, int(np.ceil(rate * total)))
    # The ``keep`` largest similarities over all pairs, without holding every pair's value at once.
    best = np.empty(0, dtype=np.float32)
    for start in range(0, len(a), chunk):
        sims = (a[start : start + chunk] @ b.T).ravel()
        best = np.concatenate([best, sims if len(sims) <= keep else np.partition(sims, -keep)[-keep:]])
        if len(best) > keep:
            best = np.partition(best, -keep)[-keep:]
    return float(best.min())


def smoothed_log_probs(
    logits: Mapping[str, np.ndarray],
    indices: np.ndarray,
    similarities: np.ndarray,
    alpha: float = ALPHA,
    min_similarity: float = 0.0,
) -> dict[str, np.ndarray]:
    """Per group, the log of each crop's class probabilities averaged with its neighbours' (weights:
    1 for the crop itself, ``similarity ** alpha`` for each neighbour more similar than
    ``min_similarity`` (and than 0), 0 for the others and for index -1)."""
    positive = (indices >= 0) & (similarities > max(min_similarity, 0.0))
    weights = np.where(positive, np.clip(similarities, 1e-12, None) ** alpha, 0.0)
    rows = np.where(indices >= 0, indices, 0)
    total = 1.0 + weights.sum(axis=1, keepdims=True)
    out = {}
    for name, value in logits.items():
        p = softmax(value)
        mixed = p + np.einsum("nk,nkc->nc", weights, p[rows])
        out[name] = np.log(np.maximum(mixed / total, 1e-12)).astype(np.float32)
    return out


def track_log_probs(logits: Mapping[str, np.ndarray], tracks: np.ndarray) -> dict[str, np.ndarray]:
    """Per group, the log of each row's class probabilities averaged over the rows of its track."""
    _, inverse, counts = np.unique(tracks, return_inverse=True, return_counts=True)
    out = {}
    for name, value in logits.items():
        p = softmax(value)
        total = np.zeros((len(counts), p.shape[1]))
        np.add.at(total, inverse, p)
        out[name] = np.log(np.maximum(total[inverse] / counts[inverse, None], 1e-12)).astype(np.float32)
    return out


def adjust(
    scores: Mapping[str, np.ndarray], taus: Mapping[str, float], log_priors: Mapping[str, list[float]]
) -> dict[str, np.ndarray]:
    """``scores - tau * log prior`` for the groups ``taus`` names (others unchanged)."""
    return {
        name: value - taus.get(name, 0.0) * np.asarray(log_priors[name], dtype=value.dtype)
        if taus.get(name, 0.0)
        else value
        for name, value in scores.items()
    }


def measure(
    logits: Mapping[str, np.ndarray],
    embeddings: np.ndarray,
    labels: np.ndarray,
    identities: np.ndarray,
    log_priors: Mapping[str, list[float]],
    neighbours: int = NEIGHBOURS,
    alpha: float = ALPHA,
    tracks: np.ndarray | None = None,
    min_similarity: float | None = None,
) -> dict[str, Any]:
    """Validation of the smoothing: the first ``len(labels)`` rows are labelled, the rest (distractors)
    only lend neighbours; the neighbours' similarity floor is ``min_similarity``, by default the
    :func:`impostor_similarity` of the labelled rows against the distractors. For the bundle's own
    outputs and the averaged ones: the metrics as they are (the bundle's rule), with per-group taus
    chosen on these labels (and those taus), and with taus chosen on the other half of the identities
    (two folds; an estimate free of that choice). With ``tracks`` (a group id per labelled row, e.g.
    identity and camera), also each labelled crop's probabilities averaged over its track alone: what
    ``POST /attributes`` answers with track=true."""
    import torch

    n = len(labels)
    if min_similarity is None:
        min_similarity = impostor_similarity(embeddings[:n], embeddings[n:])
    indices, sims = nearest_neighbours(embeddings, neighbours)
    smoothed = smoothed_log_probs(logits, indices, sims, alpha, min_similarity)
    y = torch.as_tensor(labels, dtype=torch.long)
    priors = {name: torch.tensor(v, dtype=torch.float32) for name, v in log_priors.items()}
    fold = np.isin(identities, np.unique(identities)[::2])
    result: dict[str, Any] = {
        "labelled": n,
        "crops": len(embeddings),
        "neighbours": neighbours,
        "alpha": alpha,
        "min_similarity": min_similarity,
    }
    variants = [("plain", logits), ("smoothed", smoothed)]
    if tracks is not None:
        variants.append(("track", track_log_probs({k: v[:n] for k, v in logits.items()}, tracks)))
    for key, scores in variants:
        t = {
            name: torch.from_numpy(np.ascontiguousarray(v[:n], dtype=np.float32))
            for name, v in scores.items()
        }
        tradeoff = logit_adjustment_tradeoff(t, y, priors)
        taus = per_group_taus(tradeoff)
        result[key] = {
            "as_is": tradeoff[0],
            "per_group": adjusted_metrics(t, y, priors, taus),
            "per_group_two_fold": _two_fold(t, y, priors, torch.from_numpy(fold)),
            "taus": taus,
        }
    return result


def _two_fold(logits: Mapping[str, Any], labels: Any, priors: Mapping[str, Any], fold: Any) -> dict[str, Any]:
    """Metrics of the per-group rule with each half's taus chosen on the other half."""
    evaluator = AttributeEvaluator()
    for held in (fold, ~fold):
        chosen = per_group_taus(
            logit_adjustment_tradeoff({k: v[~held] for k, v in logits.items()}, labels[~held], priors)
        )
        evaluator.process(
            adjust_logits({k: v[held] for k, v in logits.items()}, priors, chosen), labels[held]
        )
    return evaluator.evaluate()
