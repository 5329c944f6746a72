"""API keys: every endpoint but /healthz and /readyz needs a configured key when keys are set."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.helpers import crop, files, make_settings, sqlite_url

KEYS = ["first-key-0123456789", "second-key-abcdef"]


@pytest.fixture(scope="module")
def client(bundles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    settings = make_settings(bundles, tmp / "data", database_url=sqlite_url(tmp), api_keys=",".join(KEYS))
    with TestClient(create_app(settings)) as c:
        yield c


def requests(client, people, headers):
    blob = crop(people[0])
    return {
        "attributes": client.post("/attributes", files=files(blob), headers=headers),
        "enroll": client.post("/gallery", files=files(blob), headers=headers),
        "query": client.post("/reid/query", files=files(blob, field="image"), headers=headers),
        "list": client.get("/gallery", headers=headers),
        "stats": client.get("/gallery/stats", headers=headers),
        "get": client.get("/gallery/1", headers=headers),
        "delete-identity": client.delete("/gallery", params={"identity": "nobody"}, headers=headers),
        "models": client.get("/models", headers=headers),
        "metrics": client.get("/metrics", headers=headers),
    }


def test_health_endpoints_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "missing X-API-Key header"), ({"X-API-Key": "first-key-012345678"}, "invalid API key")],
    ids=["missing", "wrong"],
)
def test_everything_else_needs_a_valid_key(client, people, headers, message):
    for name, response in requests(client, people, headers).items():
        assert response.status_code == 401, name
        assert response.json() == {"detail": message}, name
    assert client.get("/gallery/stats", headers={"X-API-Key": KEYS[0]}).json()["entries"] == 0


@pytest.mark.parametrize("key", KEYS)
def test_any_configured_key_works(client, people, key):
    for name, response in requests(client, people, {"X-API-Key": key}).items():
        assert response.status_code < 400 or (name == "get" and response.status_code == 404), name


def test_open_service_warns_at_start(bundles, tmp_path, caplog):
    settings = make_settings(bundles, tmp_path / "data", database_url=sqlite_url(tmp_path))
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings)) as client:
        assert client.get("/models").status_code == 200
    assert any("REID_API_KEYS is not set" in r.getMessage() for r in caplog.records)
