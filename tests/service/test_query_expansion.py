"""Query expansion and track queries through POST /reid/query."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.bundle import MANIFEST
from app.main import create_app
from tests.service.helpers import Bundles, crop, enroll, files, make_settings, sqlite_url


def ask(client, *blobs: bytes, **data) -> dict:
    response = client.post("/reid/query", files=files(*blobs, field="image"), data=data)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def calibrated(bundles, tmp_path_factory) -> Bundles:
    """The test re-ID bundle with a recorded query-expansion section (2 neighbours, threshold 0.95)."""
    reid = shutil.copytree(bundles.reid, tmp_path_factory.mktemp("qe") / "reid")
    manifest = json.loads((reid / MANIFEST).read_text())
    manifest["query_expansion"] = {"neighbours": 2, "match_threshold": 0.95}
    (reid / MANIFEST).write_text(json.dumps(manifest))
    return Bundles(bundles.attributes, reid)


def populate(client, people) -> None:
    for person in people[:10]:
        enroll(client, crop(person, 1), crop(person, 2), identity=f"p{person.pid}")


def test_the_bundle_decides_and_a_request_can_opt_out(calibrated, tmp_path, people):
    settings = make_settings(calibrated, tmp_path / "data", database_url=sqlite_url(tmp_path))
    with TestClient(create_app(settings)) as client:
        populate(client, people)
        expanded = ask(client, crop(people[0], 3), top_k=20)
        plain = ask(client, crop(people[0], 3), top_k=20, query_expansion="false")
    assert expanded["model"]["query_expansion"] == 2 and expanded["model"]["match_threshold"] == 0.95
    assert plain["model"]["query_expansion"] == 0 and plain["model"]["match_threshold"] == 0.9
    assert all(m["is_match"] == (m["score"] >= 0.95) for m in expanded["matches"])
    assert all(m["is_match"] == (m["score"] >= 0.9) for m in plain["matches"])
    # the expanded query has taken in its neighbours: scores change, the best match stays
    assert [m["score"] for m in expanded["matches"]] != [m["score"] for m in plain["matches"]]
    assert expanded["matches"][0]["identity"] == plain["matches"][0]["identity"]
    for body in (expanded, plain):
        scores = [m["score"] for m in body["matches"]]
        assert scores == sorted(scores, reverse=True)


def test_the_bundles_alpha_weights_the_neighbours(bundles, tmp_path, people):
    """The neighbours are weighted by similarity**alpha with the alpha the manifest validated."""
    scores = {}
    for alpha in (0.0, 8.0):
        reid = shutil.copytree(bundles.reid, tmp_path / f"alpha{alpha}" / "reid")
        manifest = json.loads((reid / MANIFEST).read_text())
        manifest["query_expansion"] = {"neighbours": 3, "alpha": alpha, "match_threshold": 0.95}
        (reid / MANIFEST).write_text(json.dumps(manifest))
        settings = make_settings(
            Bundles(bundles.attributes, reid),
            tmp_path / f"data{alpha}",
            database_url=sqlite_url(tmp_path / f"data{alpha}"),
        )
        with TestClient(create_app(settings)) as client:
            populate(client, people)
            body = ask(client, crop(people[0], 3), top_k=20)
            plain = ask(client, crop(people[0], 3), top_k=20, query_expansion="false")
        scores[alpha] = [m["score"] for m in body["matches"]], [m["score"] for m in plain["matches"]]
    assert scores[0.0][1] == scores[8.0][1]  # the same gallery and plain query
    assert scores[0.0][0] != scores[8.0][0]


def test_the_setting_overrides_the_bundle(calibrated, tmp_path, people):
    url = sqlite_url(tmp_path)
    settings = make_settings(calibrated, tmp_path / "data", database_url=url, query_expansion=0)
    with TestClient(create_app(settings)) as client:
        populate(client, people)
        assert ask(client, crop(people[1], 3))["model"]["query_expansion"] == 0
    settings = make_settings(calibrated, tmp_path / "data", database_url=url, query_expansion=4)
    with TestClient(create_app(settings)) as client:
        assert ask(client, crop(people[1], 3))["model"]["query_expansion"] == 4


def test_an_empty_setting_leaves_it_to_the_bundle(monkeypatch):
    from app.settings import Settings

    monkeypatch.setenv("REID_QUERY_EXPANSION", "")
    assert Settings().query_expansion is None
    monkeypatch.setenv("REID_QUERY_EXPANSION", "3")
    assert Settings().query_expansion == 3
    monkeypatch.setenv("REID_QUERY_EXPANSION", "-1")
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings()


def test_a_track_query_averages_its_crops(bundles, tmp_path, people):
    settings = make_settings(bundles, tmp_path / "data", database_url=sqlite_url(tmp_path))
    with TestClient(create_app(settings)) as client:
        populate(client, people)
        one = ask(client, crop(people[2], 3), top_k=5)
        twice = ask(client, crop(people[2], 3), crop(people[2], 3), top_k=5)
        a, b = crop(people[2], 1), crop(people[2], 2)  # both enrolled views
        track = ask(client, a, b, top_k=20, query_expansion="false")
        from_a = ask(client, a, top_k=20, query_expansion="false")
    assert [m["entry_id"] for m in twice["matches"]] == [m["entry_id"] for m in one["matches"]]
    scores = np.array([[m["score"] for m in r["matches"]] for r in (one, twice)])
    assert np.allclose(scores[0], scores[1], atol=1e-5)
    # the query is the normalised mean m of the views a and b: sim(m, a) = sim(m, b) = sqrt((1 + a.b) / 2)
    own = [m["score"] for m in track["matches"] if m["identity"] == f"p{people[2].pid}"]
    a_dot_b = next(m["score"] for m in from_a["matches"][1:] if m["identity"] == f"p{people[2].pid}")
    assert len(own) == 2 and own[0] == pytest.approx(own[1], abs=1e-5)
    assert own[0] == pytest.approx(np.sqrt((1 + a_dot_b) / 2), abs=1e-4)
