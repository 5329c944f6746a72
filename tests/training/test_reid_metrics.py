"""Ranking metrics on hand-computed cases: Market-1501 exclusion, CMC, mAP, mINP, the course mAP@80."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.evaluation.reid import (
    ReIDEvaluator,
    _ap_at,
    evaluate_ranking,
    match_threshold,
    split_query_gallery,
    unlabelled_threshold,
)

G_PIDS = [1, 2, 1, 3, 1]
G_CAMS = [1, 2, 2, 1, 3]


def test_hand_case():
    # q0 = pid 1 cam 1: ranked g0 (same pid, same camera: excluded), g1 x, g2 ok, g3 x, g4 ok.
    # q1 = pid 2 cam 2: its only gallery image g1 is from its own camera, so it is not scored.
    # q2 = pid 3 cam 2: g3 first.
    dist = np.array(
        [
            [0.0, 0.1, 0.2, 0.3, 0.4],
            [0.5, 0.4, 0.3, 0.2, 0.1],
            [0.9, 0.8, 0.7, 0.05, 0.6],
        ]
    )
    m = evaluate_ranking(dist, [1, 2, 3], G_PIDS, [1, 2, 2], G_CAMS, max_rank=4)
    assert m["num_queries"] == 2
    # q0: list [0, 1, 0, 1] -> AP = (1/2 + 2/4) / 2 = 0.5, INP = 2 / 4; q2: AP = INP = 1.
    assert m["mAP"] == pytest.approx(0.75)
    assert m["mINP"] == pytest.approx(0.75)
    assert m["cmc"] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert m["rank1"] == pytest.approx(0.5) and m["rank5"] == pytest.approx(1.0)
    assert m["map80"] == pytest.approx(0.75)  # every match within 80: same as AP
    # Keeping the same-camera match, q0's list is [1, 0, 1, 0, 1]: AP = (1 + 2/3 + 3/5) / 3.
    assert m["map80_all_cameras"] == pytest.approx(((1 + 2 / 3 + 3 / 5) / 3 + 1) / 2)


def test_same_camera_exclusion_changes_rank1():
    dist = np.array([[0.0, 0.1, 0.2, 0.3, 0.4]])
    excluded = evaluate_ranking(dist, [1], G_PIDS, [1], G_CAMS, max_rank=3)
    other_cam = evaluate_ranking(dist, [1], G_PIDS, [5], G_CAMS, max_rank=3)  # query from camera 5
    assert excluded["rank1"] == 0.0 and other_cam["rank1"] == 1.0
    # From camera 5 all three pid-1 images count: list [1, 0, 1, 0, 1].
    assert other_cam["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert other_cam["mINP"] == pytest.approx(3 / 5)


def test_junk_is_ignored():
    dist = np.array([[0.0, 0.1, 0.2]])
    m = evaluate_ranking(dist, [1], [-1, 2, 1], [1], [2, 2, 2], max_rank=2)
    assert m["mAP"] == pytest.approx(0.5) and m["cmc"] == pytest.approx([0.0, 1.0])


def test_course_metric_truncates_at_cutoff():
    matches = np.array([1, 0, 0, 1], dtype=bool)
    assert _ap_at(matches, 80) == pytest.approx((1 + 2 / 4) / 2)
    assert _ap_at(matches, 2) == pytest.approx(1 / 2)  # the second match falls outside
    assert _ap_at(matches, 1) == pytest.approx(1.0)  # divided by min(R, cutoff) = 1
    assert _ap_at(np.zeros(3, dtype=bool), 80) == 0.0
    # 100 wrong images before the only match: AP = 1/101, AP@80 = 0.
    dist = np.arange(101, dtype=np.float32)[None]
    m = evaluate_ranking(dist, [1], [2] * 100 + [1], [1], [2] * 101)
    assert m["mAP"] == pytest.approx(1 / 101) and m["map80"] == 0.0


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no query"):
        evaluate_ranking(np.zeros((1, 2)), [1], [1, 2], [1], [1, 1])


def test_match_threshold_gives_one_percent_false_matches():
    impostors = np.arange(100) / 100.0  # 0.00 .. 0.99
    sim = np.concatenate([impostors, [0.995, 0.5, 0.999]])[None]
    g_pids = [2] * 100 + [1, 1, 1]
    g_cams = [1] * 100 + [2, 3, 1]  # the last genuine pair is from the query's camera
    thr = match_threshold(sim, [1], g_pids, [1], g_cams)
    assert 0.98 < thr["threshold"] <= 0.99
    assert thr["false_match_rate"] == pytest.approx(0.01)
    assert thr["true_match_rate"] == pytest.approx(0.5)


def _people(n_ids, per_id, dim=32, spread=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    x = np.repeat(centres, per_id, axis=0) + spread * rng.normal(size=(n_ids * per_id, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(
        np.arange(n_ids), per_id
    )


def test_unlabelled_threshold_matches_the_labelled_one():
    feats, pids = _people(300, 8)
    sim = feats @ feats.T
    off_diagonal = ~np.eye(len(feats), dtype=bool)
    labelled = np.quantile(sim[off_diagonal & (pids[:, None] != pids[None, :])], 0.99)
    est = unlabelled_threshold(feats, queries=600)
    assert est["pairs"] == 600 * (len(feats) - 600)
    assert est["false_match_rate"] == pytest.approx(0.01, abs=1e-4)
    # Same-person pairs (1 in 300) make the estimate slightly strict, never loose by much.
    assert labelled - 0.01 < est["threshold"] < labelled + 0.05
    expanded = unlabelled_threshold(feats, queries=600, query_expansion=5)
    assert expanded["threshold"] != est["threshold"]
    rescored = unlabelled_threshold(feats, queries=600, query_expansion=5, gallery_side=True)
    assert rescored["threshold"] != expanded["threshold"]
    assert rescored["false_match_rate"] == pytest.approx(0.01, abs=1e-4)
    with pytest.raises(ValueError, match="at least 4"):
        unlabelled_threshold(feats[:3])


def test_split_one_query_per_identity_and_camera():
    pids = [1, 1, 1, 1, 2, 2, 2, 3]
    cams = [1, 1, 2, 2, 1, 1, 1, 4]
    q, g = split_query_gallery(pids, cams, seed=0)
    assert sorted((pids[i], cams[i]) for i in q) == [(1, 1), (1, 2), (2, 1), (3, 4)]
    assert sorted(np.concatenate([q, g]).tolist()) == list(range(8))
    q2, _ = split_query_gallery(pids, cams, seed=0)
    assert (q == q2).all()
    assert any((split_query_gallery(pids, cams, seed=s)[0] != q).any() for s in range(1, 10))


def test_evaluator_accumulates_batches():
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(6), 8)
    cams = np.tile([1, 2, 3, 4], 12)
    feats = torch.nn.functional.normalize(torch.randn(48, 8) + 2 * torch.eye(8)[pids], dim=1)
    q, _ = split_query_gallery(pids, cams, seed=1)
    is_query = np.isin(np.arange(48), q)
    order = rng.permutation(48)
    ev = ReIDEvaluator(max_rank=5)
    for part in np.array_split(order, 3):
        ev.process(feats[part], pids[part], cams[part], is_query[part])
    m = ev.evaluate()
    qi, gi = np.flatnonzero(is_query), np.flatnonzero(~is_query)
    ref = evaluate_ranking(
        1 - (feats[qi] @ feats[gi].T).numpy(), pids[qi], pids[gi], cams[qi], cams[gi], max_rank=5
    )
    assert m["mAP"] == pytest.approx(ref["mAP"]) and m["mINP"] == pytest.approx(ref["mINP"])
    assert -1 <= m["match_threshold"] <= 1
    ev.reset()
    assert not ev.features


def test_track_queries_average_each_query_identity_and_camera():
    from training.evaluation.reid import track_embeddings

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 4)).astype(np.float32)
    pids = np.array([1, 1, 1, 2, 2, 0])
    cams = np.array([1, 1, 2, 1, 1, -1])
    tracks = track_embeddings(feats, pids, cams, np.array([0, 3]))
    expected = feats[[0, 1]].mean(0), feats[[3, 4]].mean(0)
    for row, mean in zip(tracks, expected, strict=True):
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-6)
