"""k-reciprocal re-ranking: equal to the authors' reference implementation, and it helps on a clear case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.evaluation.reid import evaluate_ranking
from training.evaluation.rerank import measured_rerank, re_ranking


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al.'s published code (github.com/zhunzhong07/person-re-ranking), condensed."""
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)],
        axis=0,
    )
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)
    query_num = q_g_dist.shape[0]
    all_num = q_g_dist.shape[0] + q_g_dist.shape[1]
    for i in range(all_num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        fi = np.where(backward == i)[0]
        k_rec = forward[fi]
        expansion = k_rec
        for candidate in k_rec:
            c_forward = initial_rank[candidate, : int(np.around(k1 / 2.0)) + 1]
            c_backward = initial_rank[c_forward, : int(np.around(k1 / 2.0)) + 1]
            c_rec = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_rec, k_rec)) > 2.0 / 3 * len(c_rec):
                expansion = np.append(expansion, c_rec)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = 1.0 * weight / np.sum(weight)
    original_dist = original_dist[:query_num,]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        non_zero = np.where(V[i, :] != 0)[0]
        images = [inv_index[ind] for ind in non_zero]
        for j in range(len(non_zero)):
            temp_min[0, images[j]] += np.minimum(V[i, non_zero[j]], V[images[j], non_zero[j]])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original_dist * lambda_value
    return final[:query_num, query_num:]


def _clustered(n_ids=8, per_id=6, dim=16, noise=0.8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids, dim, generator=gen)
    pids = torch.arange(n_ids).repeat_interleave(per_id)
    feats = centres[pids] + noise * torch.randn(len(pids), dim, generator=gen)
    return torch.nn.functional.normalize(feats, dim=1), pids.numpy()


@pytest.mark.parametrize(("k1", "k2"), [(20, 6), (5, 3), (4, 1)])
def test_matches_reference(k1, k2):
    feats, _ = _clustered()
    q, g = feats[:10], feats[10:]
    qg, qq, gg = (torch.cdist(a, b).numpy() for a, b in ((q, g), (q, q), (g, g)))
    ours = re_ranking(qg, qq, gg, k1=k1, k2=k2)
    ref = reference_re_ranking(qg, qq, gg, k1=k1, k2=k2)
    assert ours.shape == (10, len(g))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_measured_rerank_reports_cost_and_does_not_hurt_clusters():
    feats, pids = _clustered(n_ids=10, per_id=8, noise=1.0, seed=1)
    cams = np.tile(np.arange(8), 10)
    q = np.arange(0, 80, 8)
    g = np.setdiff1d(np.arange(80), q)
    final, cost = measured_rerank(feats[q], feats[g], k1=6, k2=3)
    assert cost["rerank_seconds"] > 0 and cost["rerank_peak_mb"] > 0
    base = evaluate_ranking(torch.cdist(feats[q], feats[g]).numpy(), pids[q], pids[g], cams[q], cams[g])
    rr = evaluate_ranking(final, pids[q], pids[g], cams[q], cams[g])
    assert rr["mAP"] >= base["mAP"] - 0.02


@pytest.mark.parametrize(("k1", "k2"), [(20, 6), (5, 3), (4, 1)])
def test_the_sparse_version_matches_the_dense_one(k1, k2):
    """re_ranking_sparse (predict-reid's, memory linear in the images) equals re_ranking (the authors'
    dense algorithm), here with blocks smaller than the set so the blocked neighbour search is used."""
    from training.evaluation.rerank import re_ranking_sparse

    feats, _ = _clustered()
    q, g = feats[:10], feats[10:]
    qg, qq, gg = (torch.cdist(a, b).numpy() for a, b in ((q, g), (q, q), (g, g)))
    dense = re_ranking(qg, qq, gg, k1=k1, k2=k2)
    ours = re_ranking_sparse(q.numpy(), g.numpy(), k1=k1, k2=k2, block=7)
    assert ours.shape == dense.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, dense, rtol=1e-4, atol=1e-5)
