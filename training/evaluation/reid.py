"""Re-ID evaluation: the query/gallery protocol on validation identities, ranking metrics, the threshold.

Protocol (:func:`split_query_gallery`). The validation identities of the shared identity-disjoint
split never appear in training. Among their images, one image per (identity, camera) pair, chosen at
random with a fixed seed, is a query; every other image is in the gallery. A query whose identity has
no gallery image from another camera cannot be matched under the Market-1501 rules below; it is not
scored (as in the official Market-1501 code) and ``num_queries`` reports how many were scored.

Ranking (:func:`evaluate_ranking`), the Market-1501 protocol (Zheng et al. 2015): for each query the
gallery is sorted by distance; gallery images of the query's identity taken by the query's camera, and
junk images (pid -1), are removed from that query's list. On the remaining list of N images, with
``rel(i) = 1`` when the i-th image is a true match and R true matches in all:

- CMC rank-k: the fraction of queries with a true match among the first k.
- AP = (1/R) * sum_i P(i) rel(i), with P(i) the precision of the first i; mAP is its mean.
- INP = R / (position of the last true match); mINP is its mean (Ye et al. 2021): how much of the
  list an operator must inspect to find every match.
- The report's course metric, ``mAP@80``: the average precision truncated at the first 80 results,
  AP@80 = (1 / min(R, 80)) * sum_{i<=80} P(i) rel(i) (the usual ``apk``). It equals AP when every true
  match is in the first 80 and punishes matches beyond 80 by leaving them out. The report chose 80
  because no identity has more than 72 images. It is given twice: on the Market-1501 lists above
  (``map80``) and on lists that keep same-camera matches (``map80_all_cameras``), which is closer to
  how the report evaluated (a random 10% of validation images as queries, no camera rule) and is
  always higher.

Match threshold (:func:`match_threshold`): over all (query, gallery) pairs of different identities,
the cosine similarity t such that at most 1% of those impostor pairs have similarity >= t: the
false-match rate of the rule "same person if similarity >= t" is at most 1% on validation. The
true-match rate at t (over pairs of the same identity from different cameras) is reported next to it.
A bundle trained on every identity has no unseen labelled identities left: :func:`unlabelled_threshold`
estimates the same t from a folder of other people's crops alone (the course ``test/`` folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

COURSE_CUTOFF = 80


def split_query_gallery(
    pids: Sequence[int], camids: Sequence[int], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Query and gallery indices: one random image per (identity, camera) is a query, the rest gallery."""
    pids, camids = np.asarray(pids), np.asarray(camids)
    rng = np.random.default_rng(seed)
    is_query = np.zeros(len(pids), dtype=bool)
    keys = np.stack([pids, camids], axis=1)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.ravel()
    for g in range(group.max() + 1 if len(group) else 0):
        members = np.flatnonzero(group == g)
        is_query[rng.choice(members)] = True
    return np.flatnonzero(is_query), np.flatnonzero(~is_query)


def cosine_distance(query: torch.Tensor | np.ndarray, gallery: torch.Tensor | np.ndarray) -> np.ndarray:
    """1 - cosine similarity of L2-normalised embeddings, as a float32 (Q, G) array."""
    q = torch.as_tensor(query).float()
    g = torch.as_tensor(gallery).float()
    return (1.0 - q @ g.T).numpy()


def evaluate_ranking(
    distmat: np.ndarray,
    q_pids: Sequence[int],
    g_pids: Sequence[int],
    q_camids: Sequence[int],
    g_camids: Sequence[int],
    *,
    max_rank: int = 50,
    cutoff: int = COURSE_CUTOFF,
) -> dict[str, object]:
    """CMC, mAP, mINP and the course mAP@cutoff under the Market-1501 protocol (see module doc).

    Returns scalars (``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP``, ``map80``,
    ``map80_all_cameras``, ``num_queries``) and the CMC curve (``cmc``, a list of ``max_rank``
    floats).
    """
    distmat = np.asarray(distmat, dtype=np.float32)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_g = distmat.shape[1]
    max_rank = min(max_rank, num_g)
    cmcs, aps, inps, ap80s, ap80_all = [], [], [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        junk = pids == -1
        same = pids == q_pids[i]
        keep = ~((same & (cams == q_camids[i])) | junk)
        matches = same[keep]
        if not matches.any():
            continue
        hits = np.cumsum(matches)
        positions = np.flatnonzero(matches)
        num_rel = matches.sum()
        precision = hits / np.arange(1, len(matches) + 1)
        cmc = (hits >= 1).astype(np.float64)
        if len(cmc) < max_rank:  # a short list keeps its last value
            cmc = np.pad(cmc, (0, max_rank - len(cmc)), mode="edge")
        cmcs.append(cmc[:max_rank])
        aps.append(float((precision * matches).sum() / num_rel))
        inps.append(float(num_rel / (positions[-1] + 1)))
        ap80s.append(_ap_at(matches, cutoff))
        ap80_all.append(_ap_at(same[~junk], cutoff))
    if not cmcs:
        raise ValueError("no query has a true match in the gallery from another camera")
    curve = np.mean(cmcs, axis=0)
    return {
        "rank1": float(curve[0]),
        "rank5": float(curve[min(4, max_rank - 1)]),
        "rank10": float(curve[min(9, max_rank - 1)]),
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "map80": float(np.mean(ap80s)),
        "map80_all_cameras": float(np.mean(ap80_all)),
        "num_queries": len(cmcs),
        "cmc": [float(x) for x in curve],
    }


def _ap_at(matches: np.ndarray, cutoff: int) -> float:
    """AP over the first ``cutoff`` results, divided by min(R, cutoff); 0 when R = 0."""
    num_rel = int(matches.sum())
    if num_rel == 0:
        return 0.0
    top = matches[:cutoff]
    precision = np.cumsum(top) / np.arange(1, len(top) + 1)
    return float((precision * top).sum() / min(num_rel, cutoff))


def match_threshold(
    similarity: np.ndarray,
    q_pids: Sequence[int],
    g_pids: Sequence[int],
    q_camids: Sequence[int],
    g_camids: Sequence[int],
    false_match_rate: float = 0.01,
) -> dict[str, float]:
    """The similarity t with at most ``false_match_rate`` of impostor pairs at or above it.

    Impostor pairs: query and gallery of different identities (junk left out). Genuine pairs: same
    identity, different cameras. Returns ``threshold``, the measured ``false_match_rate`` and
    ``true_match_rate`` at it.
    """
    sim = np.asarray(similarity, dtype=np.float32)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    same = q_pids[:, None] == g_pids[None, :]
    impostor = np.sort(sim[~same & (g_pids != -1)[None, :]])[::-1]
    genuine = sim[same & (np.asarray(q_camids)[:, None] != np.asarray(g_camids)[None, :])]
    if len(impostor) == 0:
        raise ValueError("no impostor pairs: the threshold needs at least two identities")
    k = int(np.floor(false_match_rate * len(impostor)))
    # Everything strictly above impostor[k] is at most k pairs; the next float up makes '>=' exact.
    t = float(np.nextafter(impostor[min(k, len(impostor) - 1)], np.float32(np.inf)))
    return {
        "threshold": t,
        "false_match_rate": float((impostor >= t).mean()),
        "true_match_rate": float((genuine >= t).mean()) if len(genuine) else float("nan"),
    }


def unlabelled_threshold(
    features: np.ndarray,
    *,
    query_expansion: int = 0,
    gallery_side: bool = False,
    queries: int = 2000,
    false_match_rate: float = 0.01,
    seed: int = 0,
) -> dict[str, float]:
    """The match threshold estimated on embeddings of unlabelled crops of many people.

    A seeded sample of ``queries`` crops is ranked against the rest (optionally after query
    expansion against them, and with ``gallery_side`` every pair scored as the service's default query
    path scores the entries it returns, ``app.retrieval.augmented_scores`` of the queries it expands)
    and every pair counts as an impostor.
    With 750 people of about 26 crops each (the course ``test/`` folder) about 0.13% of those pairs
    are the same person, mostly near the top, so the threshold sits where about 0.87% of true impostor
    pairs pass instead of 1%: slightly strict. On a bundle trained without those identities it can be
    compared with the labelled one.
    """
    from app.retrieval import QE_NEIGHBOURS, expand_against

    feats = np.asarray(features, dtype=np.float32)
    if len(feats) < 4:
        raise ValueError("the threshold estimate needs at least 4 unlabelled crops")
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(feats), dtype=bool)
    chosen[rng.choice(len(feats), min(queries, len(feats) // 2), replace=False)] = True
    query, gallery = feats[chosen], feats[~chosen]
    if gallery_side:  # the service's default query path (it expands the query itself)
        from app.retrieval import augmented_scores, rescore_shortlists

        _, _, expanded = rescore_shortlists(query, gallery, expansion=query_expansion or QE_NEIGHBOURS)
        flat = augmented_scores(expanded, gallery).ravel()
    else:
        if query_expansion:
            query = expand_against(query, gallery, k=query_expansion)
        flat = (query @ gallery.T).ravel()
    k = int(np.floor(false_match_rate * len(flat)))
    top = np.partition(flat, len(flat) - 1 - k)[len(flat) - 1 - k]  # the (k+1)-th largest
    t = float(np.nextafter(top, np.float32(np.inf)))
    return {"threshold": t, "pairs": len(flat), "false_match_rate": float((flat >= t).mean())}


def track_embeddings(
    features: np.ndarray, pids: np.ndarray, camids: np.ndarray, queries: np.ndarray
) -> np.ndarray:
    """Per query, the normalised mean embedding of every image of its identity and camera: what the
    service's track query (several crops of one person from one camera) sends. Those images are in the
    gallery, but the protocol already removes same-identity same-camera images from each query's list,
    so no query sees its own track's images ranked."""
    out = np.empty((len(queries), features.shape[1]), dtype=np.float32)
    for row, i in enumerate(queries):
        mean = features[(pids == pids[i]) & (camids == camids[i])].mean(axis=0)
        out[row] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return out


@dataclass
class ReIDEvaluator:
    """Collects embeddings batch by batch, then scores them: ``reset`` / ``process`` / ``evaluate``.

    ``process`` takes L2-normalised embeddings with their pids, camera ids and query flags (from
    :func:`split_query_gallery`). ``evaluate`` returns the metrics of :func:`evaluate_ranking` plus the
    match threshold, and keeps the distance matrix in ``self.last`` for plots.
    """

    max_rank: int = 50
    rerank: bool = False
    query_expansion: int = 0  # neighbours of alpha-QE (app.retrieval); 0 = off
    track_queries: bool = False  # also rank with each query's (identity, camera) images averaged
    gallery_side: bool = False  # with query_expansion: also the service's gallery-side rescoring
    features: list[torch.Tensor] = field(default_factory=list)
    pids: list[np.ndarray] = field(default_factory=list)
    camids: list[np.ndarray] = field(default_factory=list)
    is_query: list[np.ndarray] = field(default_factory=list)
    last: dict[str, object] = field(default_factory=dict)

    def reset(self) -> None:
        self.features.clear()
        self.pids.clear()
        self.camids.clear()
        self.is_query.clear()
        self.last = {}

    def process(
        self,
        embeddings: torch.Tensor,
        pids: Sequence[int] | torch.Tensor,
        camids: Sequence[int] | torch.Tensor,
        is_query: Sequence[bool] | torch.Tensor,
    ) -> None:
        self.features.append(embeddings.detach().float().cpu())
        self.pids.append(np.asarray(pids))
        self.camids.append(np.asarray(camids))
        self.is_query.append(np.asarray(is_query, dtype=bool))

    def _gallery_side(
        self,
        queries: np.ndarray,
        gallery: np.ndarray,
        q_pids: np.ndarray,
        g_pids: np.ndarray,
        q_camids: np.ndarray,
        g_camids: np.ndarray,
    ) -> dict[str, object]:
        """Metrics and match threshold of the service's default query path: gallery-side augmentation
        of each query's pool and query expansion (``app.retrieval.rescore_shortlists``), as the
        service ranks them; the threshold on every pair's augmented score for the expanded queries."""
        from app.retrieval import (
            GS_ALPHA,
            GS_NEIGHBOURS,
            GS_ORDER,
            GS_POOL,
            GS_SHORTLIST,
            GS_WEIGHT,
            augmented_scores,
            rescore_shortlists,
        )

        scores, inside, expanded = rescore_shortlists(queries, gallery, expansion=self.query_expansion)
        ranked = evaluate_ranking(
            np.where(inside, 1.0 - scores, 3.0 - scores),  # the shortlist first, as the service returns it
            q_pids,
            g_pids,
            q_camids,
            g_camids,
            max_rank=self.max_rank,
        )
        thr = match_threshold(augmented_scores(expanded, gallery), q_pids, g_pids, q_camids, g_camids)
        return {
            **{k: v for k, v in ranked.items() if k != "cmc"},
            "order": GS_ORDER,
            "neighbours": GS_NEIGHBOURS,
            "alpha": GS_ALPHA,
            "weight": GS_WEIGHT,
            "shortlist": GS_SHORTLIST,
            "pool": GS_POOL,
            "match_threshold": thr["threshold"],
            "true_match_rate_at_threshold": thr["true_match_rate"],
        }

    def evaluate(self) -> dict[str, object]:
        feats = torch.cat(self.features)
        pids, camids = np.concatenate(self.pids), np.concatenate(self.camids)
        is_query = np.concatenate(self.is_query)
        q, g = np.flatnonzero(is_query), np.flatnonzero(~is_query)
        similarity = feats[q].numpy() @ feats[g].numpy().T  # numpy: fp32 even inside an autocast region
        distmat = 1.0 - similarity
        metrics = evaluate_ranking(distmat, pids[q], pids[g], camids[q], camids[g], max_rank=self.max_rank)
        thr = match_threshold(similarity, pids[q], pids[g], camids[q], camids[g])
        metrics["match_threshold"] = thr["threshold"]
        metrics["true_match_rate_at_threshold"] = thr["true_match_rate"]
        if self.query_expansion:
            from app.retrieval import QE_ALPHA, expand_against

            gallery = feats[g].numpy()
            expanded = expand_against(feats[q].numpy(), gallery, k=self.query_expansion)
            qe_sim = expanded @ gallery.T
            qe = evaluate_ranking(
                1.0 - qe_sim, pids[q], pids[g], camids[q], camids[g], max_rank=self.max_rank
            )
            qe_thr = match_threshold(qe_sim, pids[q], pids[g], camids[q], camids[g])
            metrics["query_expansion"] = {
                **{k: v for k, v in qe.items() if k != "cmc"},
                "neighbours": self.query_expansion,
                "alpha": QE_ALPHA,
                "match_threshold": qe_thr["threshold"],
                "true_match_rate_at_threshold": qe_thr["true_match_rate"],
            }
            if self.gallery_side:
                metrics["query_expansion"]["gallery_side"] = self._gallery_side(
                    feats[q].numpy(), gallery, pids[q], pids[g], camids[q], camids[g]
                )
        if self.track_queries:
            tracks = track_embeddings(feats.numpy(), pids, camids, q)
            tr = evaluate_ranking(
                1.0 - tracks @ feats[g].numpy().T,
                pids[q],
                pids[g],
                camids[q],
                camids[g],
                max_rank=self.max_rank,
            )
            metrics["track_queries"] = {k: v for k, v in tr.items() if k != "cmc"}
        if self.rerank:
            from training.evaluation.rerank import measured_rerank

            reranked, cost = measured_rerank(feats[q], feats[g])
            rr = evaluate_ranking(reranked, pids[q], pids[g], camids[q], camids[g], max_rank=self.max_rank)
            metrics["rerank"] = {**{k: v for k, v in rr.items() if k != "cmc"}, **cost}
            self.last["rerank_distmat"] = reranked
            self.last["rerank_cmc"] = rr["cmc"]
        self.last.update(
            distmat=distmat,
            query=q,
            gallery=g,
            features=feats,
            pids=pids,
            camids=camids,
        )
        return metrics
