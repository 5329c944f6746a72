"""Query expansion (app.retrieval): the arithmetic, and that it pulls a query towards its identity."""

from __future__ import annotations

import numpy as np
import pytest

from app.retrieval import expand_against, expand_queries


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_weights_are_similarity_to_the_alpha():
    q = np.array([[1.0, 0.0]])
    neighbours = np.array([[[0.0, 1.0], [0.0, -1.0]]])
    out = expand_queries(q, neighbours, np.array([[0.5, -0.2]]), alpha=3.0)
    np.testing.assert_allclose(out, unit(np.array([[1.0, 0.125]])), atol=1e-6)  # negative: weight 0
    assert np.allclose(expand_against(q, np.zeros((0, 2)), k=5), q)
    # alpha 0 is a plain average of the neighbours that are similar at all: still none of the negative
    out = expand_queries(q, neighbours, np.array([[0.5, -0.2]]), alpha=0.0)
    np.testing.assert_allclose(out, unit(np.array([[1.0, 1.0]])), atol=1e-6)


def test_expansion_moves_a_hard_query_closer_to_its_identity():
    rng = np.random.default_rng(0)
    centre, other = unit(rng.normal(size=(2, 64)))
    same = unit(centre + 0.08 * rng.normal(size=(6, 64)))  # one identity, several views
    distractors = unit(rng.normal(size=(200, 64)))
    query = unit(centre + 0.15 * rng.normal(size=(1, 64)) + 0.8 * other)  # a poor view of it
    gallery = np.concatenate([same, distractors])
    expanded = expand_against(query, gallery, k=3)
    assert np.isclose(np.linalg.norm(expanded), 1.0)
    assert (expanded @ same.T).mean() > (query @ same.T).mean()


def test_gallery_side_rescoring_is_the_blend_of_entry_and_neighbourhood():
    from app.retrieval import augmented_scores, neighbourhood_scores, rescore_shortlists

    rng = np.random.default_rng(1)
    gallery = unit(rng.normal(size=(40, 16)))
    query = unit(rng.normal(size=(2, 16)))
    options = {"neighbours": 4, "alpha": 2.0, "weight": 0.5, "order": "expand_first", "expansion": 0}
    scores, inside, expanded = rescore_shortlists(query, gallery, pool=12, shortlist=7, **options)
    np.testing.assert_allclose(expanded, query, atol=1e-6)  # no expansion asked for
    plain = query @ gallery.T
    assert inside.sum(axis=1).tolist() == [7, 7]
    assert set(np.flatnonzero(inside[0])) == set(np.argsort(-plain[0])[:7])  # the best plain ones
    np.testing.assert_allclose(scores[~inside], plain[~inside], atol=1e-6)
    pool = np.argsort(-plain[1])[:12]
    for i in np.flatnonzero(inside[1]):  # neighbours: the nearest others among the query's top 12
        others = [j for j in pool[np.argsort(-(gallery[pool] @ gallery[i]))] if j != i][:4]
        sims = gallery[others] @ gallery[i]
        one = neighbourhood_scores(
            query[1], gallery[i : i + 1], gallery[others][None], sims[None], alpha=2.0, weight=0.5
        )
        assert scores[1, i] == pytest.approx(one[0], abs=1e-6)
    # with the whole gallery as the pool, the shortlist scores are those thresholds are calibrated on
    full, inside, _ = rescore_shortlists(query, gallery, pool=40, shortlist=7, **options)
    blend = {k: options[k] for k in ("neighbours", "alpha", "weight")}
    np.testing.assert_allclose(full[inside], augmented_scores(query, gallery, **blend)[inside], atol=1e-6)
    # weight 0 is the plain similarity; an entry without similar neighbours keeps its score
    unchanged = rescore_shortlists(query, gallery, weight=0.0, order="expand_first", expansion=0)[0]
    assert np.allclose(unchanged, plain, atol=1e-6)
    lonely = neighbourhood_scores(query[0], gallery[:1], -gallery[None, :1], np.array([[-0.5]]), weight=1.0)
    assert np.allclose(lonely, plain[0, :1])


def test_gallery_side_lifts_the_views_of_a_tight_identity_over_a_lone_look_alike():
    from app.retrieval import rescore_shortlists

    rng = np.random.default_rng(0)
    centre = unit(rng.normal(size=64))
    views = unit(centre + 0.8 * unit(rng.normal(size=(6, 64))))  # one person, six noisy views
    off = unit(rng.normal(size=64))
    query = unit(centre + 0.8 * off)
    look_alike = unit(off + 0.3 * unit(rng.normal(size=64)))  # like the query, unlike the person
    gallery = np.concatenate([views, look_alike[None], unit(rng.normal(size=(100, 64)))])
    plain = query @ gallery.T
    margin = lambda s: s[:6].mean() - s[6]  # noqa: E731
    for order in ("expand_first", "augment_first"):
        scores, _, _ = rescore_shortlists(
            query[None], gallery, neighbours=5, alpha=1.0, weight=0.75, shortlist=20, pool=60, order=order
        )
        assert margin(scores[0]) > margin(plain) + 0.05, order


def test_augment_first_expands_the_query_with_the_best_augmented_entries():
    from app.retrieval import augment_then_expand, augmented_gallery, rescore_shortlists

    rng = np.random.default_rng(2)
    gallery = unit(rng.normal(size=(30, 8)))
    query = unit(rng.normal(size=8))
    pool = gallery[np.argsort(-(gallery @ query))[:10]]
    options = {"neighbours": 3, "alpha": 2.0, "weight": 0.6}
    expanded, scores = augment_then_expand(
        query, pool, shortlist=10, expansion=2, expansion_alpha=1.0, **options
    )
    # by hand: the pool's own augmentation, the first scores, expansion with the two best, rescored
    augmented = augmented_gallery(pool, neighbours=3, alpha=2.0)
    first = 0.4 * (pool @ query) + 0.6 * (augmented @ query)
    best = np.argsort(-first)[:2]
    by_hand = unit(query + first[best] @ augmented[best])
    np.testing.assert_allclose(expanded, by_hand, atol=1e-6)
    np.testing.assert_allclose(scores, 0.4 * (pool @ by_hand) + 0.6 * (augmented @ by_hand), atol=1e-6)
    # without expansion the query is unchanged; the evaluation's loop gives the same as one call
    same, _ = augment_then_expand(query, pool, shortlist=10, expansion=0, **options)
    np.testing.assert_allclose(same, query, atol=1e-6)
    all_scores, inside, all_expanded = rescore_shortlists(
        query[None], gallery, pool=10, shortlist=10, expansion=2, expansion_alpha=1.0, **options
    )
    np.testing.assert_allclose(all_expanded[0], by_hand, atol=1e-6)
    assert inside.sum() == 10
    np.testing.assert_allclose(np.sort(all_scores[0][inside[0]]), np.sort(scores), atol=1e-6)
    np.testing.assert_allclose(all_scores[0][~inside[0]], (gallery @ by_hand)[~inside[0]], atol=1e-6)
    with pytest.raises(ValueError, match="order must be one of"):
        rescore_shortlists(query[None], gallery, order="sideways")
