"""Query expansion (app.retrieval): the arithmetic, and that it pulls a query towards its identity."""

from __future__ import annotations

import numpy as np

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
