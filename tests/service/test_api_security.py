"""API keys: every endpoint but /healthz and /readyz needs a configured key when keys are set."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.helpers import DATABASES, crop, database_for, files, make_settings, sqlite_url

KEYS = ["first-key-0123456789", "second-key-abcdef"]


@pytest.fixture(scope="module", params=DATABASES)
def client(request, bundles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    url = database_for(request.param, tmp)
    settings = make_settings(bundles, tmp / "data", database_url=url, api_keys=",".join(KEYS))
    with TestClient(create_app(settings)) as c:
        yield c


# Everything a client can reach without a key: liveness, readiness, and the documentation (a browser
# sends no X-API-Key for the pages' scripts, so the docs, their assets and the OpenAPI document stay open),
# and the web console's page and files, which hold no data (its script sends the key it is given).
OPEN = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("HEAD", "/openapi.json"),
    ("GET", "/static-offline-docs"),
    ("GET", "/ui"),
    ("GET", "/ui/static"),
}


def served(app) -> dict[tuple[str, str], str]:
    """(method, route path) -> a URL that reaches it, for every route of the app, included routers'
    and mounts' too; path parameters are filled with 1, a mount is asked for one of its files."""
    urls = {}
    for route in iter_route_contexts(app.routes):
        if route.methods is None:  # a Mount: StaticFiles of the docs
            directory = Path(route.original_route.app.directory)
            first = min(p.name for p in directory.iterdir() if p.is_file())
            urls[("GET", route.path)] = f"{route.path}/{first}"
            continue
        for method in route.methods:
            # The template as the document names it (no convertor: /gallery/{entry_id}).
            template = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            urls[(method, template)] = re.sub(r"\{[^}]+\}", "1", route.path)
    return urls


def answers(client, headers) -> dict[tuple[str, str], int]:
    """The status of a bare request (no body, no parameters) to every route."""
    return {
        key: client.request(key[0], url, headers=headers).status_code
        for key, url in served(client.app).items()
    }


def test_exactly_the_health_and_docs_routes_are_open(client):
    statuses = answers(client, {})
    assert {key for key, status in statuses.items() if status != 401} == OPEN
    assert all(statuses[key] == 200 for key in OPEN), statuses
    # The walk found the API itself, not just the open routes: every documented operation but the two
    # probes is guarded, DELETE /gallery/{entry_id} among them.
    documented = {
        (method.upper(), path)
        for path, ops in client.get("/openapi.json").json()["paths"].items()
        for method in ops
    }
    guarded = set(statuses) - OPEN
    assert guarded == documented - {("GET", "/healthz"), ("GET", "/readyz")}
    assert ("DELETE", "/gallery/{entry_id}") in guarded


def test_health_endpoints_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "missing X-API-Key header"), ({"X-API-Key": "first-key-012345678"}, "invalid API key")],
    ids=["missing", "wrong"],
)
def test_everything_else_needs_a_valid_key(client, people, headers, message):
    blob = crop(people[0])
    for (method, path), url in served(client.app).items():
        if (method, path) in OPEN:
            continue
        # With a body too: the key is checked before the upload is read.
        upload = {"files": files(blob, field="image" if path == "/reid/query" else "images")}
        response = client.request(method, url, headers=headers, **(upload if method == "POST" else {}))
        assert response.status_code == 401, (method, path)
        assert response.json()["detail"] == message, (method, path)
        assert response.headers["www-authenticate"] == "X-API-Key", (method, path)
    assert client.get("/gallery/stats", headers={"X-API-Key": KEYS[0]}).json()["entries"] == 0


@pytest.mark.parametrize("key", KEYS)
def test_any_configured_key_works(client, people, key):
    blob = crop(people[0])
    enrolled = client.post("/gallery", files=files(blob), headers={"X-API-Key": key})
    assert enrolled.status_code in (200, 201), enrolled.text
    assert client.post("/reid/query", files=files(blob, field="image"), headers={"X-API-Key": key}).json()[
        "matches"
    ]
    # Every route answers something other than 401 with the key (bare requests: 422s and 404s are fine).
    statuses = answers(client, {"X-API-Key": key})
    assert not [route for route, status in statuses.items() if status == 401]
    assert all(status < 500 for status in statuses.values()), statuses


def test_open_service_warns_at_start(bundles, tmp_path, caplog):
    settings = make_settings(bundles, tmp_path / "data", database_url=sqlite_url(tmp_path))
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings)) as client:
        assert client.get("/models").status_code == 200
    assert any("REID_API_KEYS is not set" in r.getMessage() for r in caplog.records)
