"""Gallery-side augmentation in POST /reid/query: the index's neighbour lists, the rescoring, and the
settings and form field that turn it off (app.retrieval, docs/service.md)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.bundle import MANIFEST, GallerySideSpec
from app.main import create_app
from app.retrieval import neighbourhood_scores
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

SPEC = {"neighbours": 3, "alpha": 1.0, "weight": 0.75, "shortlist": 6, "match_threshold": 0.97}


@pytest.fixture(scope="module")
def validated(bundles, tmp_path_factory) -> Bundles:
    """The test re-ID bundle with query expansion and gallery-side augmentation recorded."""
    reid = shutil.copytree(bundles.reid, tmp_path_factory.mktemp("gs") / "reid")
    manifest = json.loads((reid / MANIFEST).read_text())
    manifest["query_expansion"] = {"neighbours": 2, "match_threshold": 0.95, "gallery_side": SPEC}
    (reid / MANIFEST).write_text(json.dumps(manifest))
    return Bundles(bundles.attributes, reid)


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_neighbours_and_rescoring_match_a_brute_force_computation(backend, validated, tmp_path, people):
    overrides = backend_settings(backend, tmp_path)
    settings = make_settings(validated, tmp_path / "data", database_url=sqlite_url(tmp_path), **overrides)
    with TestClient(create_app(settings)) as client:
        ids = populate(client, people)
        gallery = client.app.state.gallery
        vectors = gallery.index.vectors("default", ids)
        sims, near = gallery.index.neighbours("default", ids[:5], 3)
        spec = GallerySideSpec(**SPEC)
        scores, found = gallery._rescored("default", vectors[0], vectors[:6] @ vectors[0], ids[:6], spec)
    full = vectors @ vectors.T
    np.fill_diagonal(full, -np.inf)  # each entry's neighbours are the others
    for row in range(5):
        best = np.argsort(-full[row])[:3]
        assert near[row].tolist() == ids[best].tolist()
        np.testing.assert_allclose(sims[row], full[row, best], atol=1e-5)
    expected = []
    for i in range(6):
        best = np.argsort(-full[i])[:3]
        expected.append(
            neighbourhood_scores(
                vectors[0], vectors[i : i + 1], vectors[best][None], full[i, best][None], alpha=1.0
            )[0]
        )
    order = np.argsort(-np.array(expected), kind="stable")
    assert found.tolist() == ids[:6][order].tolist()
    np.testing.assert_allclose(scores, np.array(expected)[order], atol=1e-5)


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
