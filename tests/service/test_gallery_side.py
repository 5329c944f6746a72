"""Gallery-side augmentation in POST /reid/query: the index's neighbour lists, the rescoring, and the
settings and form field that turn it off (app.retrieval, docs/service.md)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.bundle import MANIFEST
from app.gallery.store import SearchFilters
from app.main import create_app
from app.retrieval import expand_queries, neighbourhood_scores, rescore_shortlists
from tests.service.helpers import (
    BACKENDS,
    Bundles,
    backend_settings,
    crop,
    enroll,
    files,
    make_settings,
    sqlite_url,
)

SPEC = {"neighbours": 3, "alpha": 1.0, "weight": 0.75, "shortlist": 6, "pool": 50, "match_threshold": 0.97}


def recorded(bundles, folder, spec) -> Bundles:
    """The test re-ID bundle with query expansion and gallery-side augmentation ``spec`` recorded."""
    reid = shutil.copytree(bundles.reid, folder / "reid")
    manifest = json.loads((reid / MANIFEST).read_text())
    manifest["query_expansion"] = {"neighbours": 2, "match_threshold": 0.95, "gallery_side": spec}
    (reid / MANIFEST).write_text(json.dumps(manifest))
    return Bundles(bundles.attributes, reid)


@pytest.fixture(scope="module")
def validated(bundles, tmp_path_factory) -> Bundles:
    """As recorded before 2026-12-02: no order in the spec, so the query is expanded first."""
    return recorded(bundles, tmp_path_factory.mktemp("gs"), SPEC)


@pytest.fixture(scope="module")
def augment_first(bundles, tmp_path_factory) -> Bundles:
    return recorded(bundles, tmp_path_factory.mktemp("gs-first"), {**SPEC, "order": "augment_first"})


def ask(client, blob: bytes, **data) -> dict:
    response = client.post("/reid/query", files=files(blob, field="image"), data=data)
    assert response.status_code == 200, response.text
    return response.json()


def populate(client, people) -> np.ndarray:
    """Three crops each of eight people; their entry ids, sorted."""
    ids = []
    for person in people[:8]:
        made = enroll(client, crop(person, 1), crop(person, 2), crop(person, 4), identity=f"p{person.pid}")
        ids += [entry["id"] for entry in made]
    return np.sort(ids)


def search_an_entry(
    bundles: Bundles, backend, tmp_path, people, top_k: int = 4
) -> tuple[np.ndarray, np.ndarray, list]:
    """A service with ``bundles`` and eight people enrolled; their ids, their vectors, and the top
    ``top_k`` of a search with the sixth entry's vector."""
    overrides = backend_settings(backend, tmp_path)
    settings = make_settings(bundles, tmp_path / "data", database_url=sqlite_url(tmp_path), **overrides)
    with TestClient(create_app(settings)) as client:
        ids = populate(client, people)
        gallery = client.app.state.gallery
        vectors = gallery.index.vectors("default", ids)
        _, matches = gallery.search_vector(
            collection="default", vector=vectors[5], top_k=top_k, filters=SearchFilters()
        )
    return ids, vectors, matches


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_query_path_rescores_as_a_brute_force_computation_does(backend, validated, tmp_path, people):
    """Query expansion (2 neighbours, sim^3), then the top 6 rescored with their 3 nearest other
    entries of the pool (all 24 entries here), weights sim^1, weight 0.75."""
    ids, vectors, matches = search_an_entry(validated, backend, tmp_path, people)
    sims = vectors @ vectors[5]
    near = np.argsort(-sims)[:2]  # the entry itself among them
    query = expand_queries(vectors[5][None], vectors[near][None], sims[near][None], alpha=3.0)[0]
    pool = np.argsort(-(vectors @ query))
    between = vectors @ vectors.T
    np.fill_diagonal(between, -np.inf)
    expected = {}
    for i in pool[:6]:  # the shortlist, rescored
        others = np.argsort(-between[i])[:3]
        expected[int(ids[i])] = neighbourhood_scores(
            query, vectors[i : i + 1], vectors[others][None], between[i, others][None], alpha=1.0
        )[0]
    best = sorted(expected, key=lambda i: -expected[i])[:4]
    assert [m["entry_id"] for m in matches] == best
    np.testing.assert_allclose([m["score"] for m in matches], [expected[i] for i in best], atol=1e-5)
    assert all(m["is_match"] == (m["score"] >= SPEC["match_threshold"]) for m in matches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_augment_first_expands_with_augmented_entries_as_a_brute_force_computation_does(
    backend, augment_first, tmp_path, people
):
    """The plain query's pool (all 24 entries), each augmented with its 3 nearest others (sim^1); the
    first 6 scored 0.25 x own + 0.75 x augmented similarity, the query expanded with the 2
    best of them (weights score^3), the 6 scored again and returned best first."""
    ids, vectors, matches = search_an_entry(augment_first, backend, tmp_path, people)
    query = vectors[5]
    shortlist = np.argsort(-(vectors @ query))[:6]
    between = vectors @ vectors.T
    np.fill_diagonal(between, -np.inf)
    augmented = {}
    for i in shortlist:
        others = np.argsort(-between[i])[:3]
        augmented[i] = expand_queries(
            vectors[i][None], vectors[others][None], between[i, others][None], alpha=1.0
        )[0]

    def score(q: np.ndarray, i: int) -> float:
        return float(0.25 * vectors[i] @ q + 0.75 * augmented[i] @ q)

    first = sorted(shortlist, key=lambda i: -score(query, i))[:2]
    weights = np.array([score(query, i) for i in first]) ** 3
    expanded = query + weights @ np.array([augmented[i] for i in first])
    expanded /= np.linalg.norm(expanded)
    best = sorted(shortlist, key=lambda i: -score(expanded, i))[:4]
    assert [m["entry_id"] for m in matches] == [int(ids[i]) for i in best]
    np.testing.assert_allclose([m["score"] for m in matches], [score(expanded, i) for i in best], atol=1e-5)


@pytest.mark.parametrize("order", ["augment_first", "expand_first"])
def test_a_top_k_past_the_pool_ranks_as_validation_does(order, bundles, tmp_path, people):
    """top_k 20 with a pool of 10 and a shortlist of 6: the service's ranking and scores are those of
    the evaluation's ``rescore_shortlists`` (the 6 rescored with neighbours from the top 10, the rest
    by similarity to the expanded query, sorted together), not a rescoring of all 20."""
    spec = {**SPEC, "pool": 10, "order": order}
    ids, vectors, matches = search_an_entry(recorded(bundles, tmp_path, spec), "faiss", tmp_path, people, 20)
    options = {key: spec[key] for key in ("pool", "shortlist", "neighbours", "alpha", "weight")}
    scores = rescore_shortlists(
        vectors[5][None], vectors, order=order, expansion=2, expansion_alpha=3.0, **options
    )[0][0]
    best = np.argsort(-scores, kind="stable")[:20]
    assert [m["entry_id"] for m in matches] == [int(ids[i]) for i in best]
    np.testing.assert_allclose([m["score"] for m in matches], scores[best], atol=1e-5)


def test_the_bundle_decides_and_a_setting_or_the_form_field_turns_it_off(validated, tmp_path, people):
    url = sqlite_url(tmp_path)
    with TestClient(create_app(make_settings(validated, tmp_path / "data", database_url=url))) as client:
        populate(client, people)
        rescored = ask(client, crop(people[0], 3), top_k=4)
        plain = ask(client, crop(people[0], 3), top_k=4, query_expansion="false")
    settings = make_settings(validated, tmp_path / "data", database_url=url, gallery_side=False)
    with TestClient(create_app(settings)) as client:
        expanded = ask(client, crop(people[0], 3), top_k=4)
    assert rescored["model"]["gallery_side"] and rescored["model"]["match_threshold"] == 0.97
    assert not expanded["model"]["gallery_side"] and expanded["model"]["match_threshold"] == 0.95
    assert not plain["model"]["gallery_side"] and plain["model"]["query_expansion"] == 0
    assert len(rescored["matches"]) == 4  # the shortlist (6) is rescored, top_k come back
    assert all(m["is_match"] == (m["score"] >= 0.97) for m in rescored["matches"])
    scores = [m["score"] for m in rescored["matches"]]
    assert scores == sorted(scores, reverse=True)
    assert scores != [m["score"] for m in expanded["matches"]]
