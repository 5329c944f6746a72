"""The OpenAPI document keeps its word: every error status an operation declares is a problem
(application/problem+json), the keyed and open documents differ exactly by the X-API-Key scheme and
its 401s, and a 405's Allow header names the methods the document lists for that path."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.helpers import make_settings, sqlite_url

PROBES = {("get", "/healthz"), ("get", "/readyz")}
PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


@pytest.fixture(scope="module")
def clients(bundles, tmp_path_factory):
    """An open and a keyed service, each with its models loaded (the document lists attribute values)."""
    made = {}
    for name, keys in (("open", ""), ("keyed", "k1")):
        tmp = tmp_path_factory.mktemp(name)
        settings = make_settings(bundles, tmp / "data", database_url=sqlite_url(tmp), api_keys=keys)
        made[name] = TestClient(create_app(settings)).__enter__()
    yield made
    for client in made.values():
        client.__exit__(None, None, None)


def operations(document):
    return {(method, path): op for path, ops in document["paths"].items() for method, op in ops.items()}


@pytest.mark.parametrize("name", ["open", "keyed"])
def test_every_error_status_is_a_problem(clients, name):
    document = clients[name].get("/openapi.json").json()
    assert {"Problem", "FieldError"} <= set(document["components"]["schemas"])
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for (method, path), op in operations(document).items():
        errors = {int(s): r for s, r in op["responses"].items() if int(s) >= 400}
        for status, response in errors.items():
            assert response["content"] == PROBLEM, (method, path, status)
        assert 500 in errors, (method, path)  # every operation can fail unplanned, as a problem
        if 503 in errors:
            assert errors[503]["headers"]["Retry-After"]["required"] is True, (method, path)
        if method in ("post", "delete") and path.startswith("/gallery"):
            assert 507 in errors, (method, path)  # writes: the database's storage may be full
        has_input = bool(op.get("parameters") or op.get("requestBody"))
        assert (422 in errors) == has_input, (method, path)
        assert (404 in errors) == ("{entry_id}" in path), (method, path)
        if (method, path) not in PROBES:
            assert 503 in errors or path == "/metrics", (method, path)
        if op.get("requestBody"):
            assert {400, 413, 415} <= set(errors), (method, path)


def test_keyed_document_declares_the_scheme_and_401s_and_the_open_one_neither(clients):
    open_doc = clients["open"].get("/openapi.json").json()
    keyed_doc = clients["keyed"].get("/openapi.json").json()
    assert "securitySchemes" not in open_doc["components"]
    assert keyed_doc["components"]["securitySchemes"] == {
        "APIKeyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "Required when the service has REID_API_KEYS set.",
        }
    }
    open_ops, keyed_ops = operations(open_doc), operations(keyed_doc)
    assert set(open_ops) == set(keyed_ops)
    for key, op in open_ops.items():
        assert "security" not in op and "401" not in op["responses"], key
        keyed = keyed_ops[key]
        if key in PROBES:
            assert "security" not in keyed and "401" not in keyed["responses"], key
        else:
            assert keyed["security"] == [{"APIKeyHeader": []}], key
            assert keyed["responses"]["401"]["content"] == PROBLEM, key
            # Apart from the key, the two documents describe the same operation.
            rest = {k: v for k, v in keyed.items() if k != "security"}
            rest["responses"] = {s: r for s, r in keyed["responses"].items() if s != "401"}
            assert rest == op, key


def test_errors_are_problems_on_the_wire(clients):
    client = clients["keyed"]
    answers = {
        401: client.get("/gallery"),
        404: client.get("/gallery/123", headers={"X-API-Key": "k1"}),
        405: client.put("/gallery", headers={"X-API-Key": "k1"}),
        422: client.get("/gallery", params={"limit": 0}, headers={"X-API-Key": "k1"}),
    }
    for status, response in answers.items():
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["status"] == status and body["type"] == "about:blank" and body["detail"], body
        assert body["instance"] == response.request.url.path
        assert ("errors" in body) == (status == 422), body


@pytest.mark.parametrize("name", ["open", "keyed"])
def test_405_allow_lists_the_documented_methods(clients, name):
    client = clients[name]
    headers = {"X-API-Key": "k1"}
    documented = operations(client.get("/openapi.json").json())
    paths: dict[str, set[str]] = {}
    for method, path in documented:
        paths.setdefault(path, set()).add(method.upper())
    for path, methods in paths.items():
        url = path.replace("{entry_id}", "1")
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - methods:
            response = client.request(method, url, headers=headers)
            assert response.status_code == 405, (method, path, response.text)
            assert set(response.headers["allow"].split(", ")) == methods, (method, path)


def test_document_lists_the_loaded_attribute_values_and_top_k_limit(clients, bundles):
    document = clients["open"].get("/openapi.json").json()
    body = document["components"]["schemas"]["Body_query_reid_query_post"]["properties"]
    assert body["top_k"]["maximum"] == 1000
    groups = clients["open"].get("/models").json()["attributes"]["groups"]
    expected = [""] + [f"{g}={c}" for g, classes in groups.items() for c in classes]
    assert body["attribute"]["items"]["enum"] == expected
    for name in ("captured_after", "captured_before", "min_score"):
        assert "anyOf" not in body[name] and "null" not in str(body[name]), name


def test_metrics_is_declared_and_sent_as_plain_text(clients):
    client = clients["open"]
    ok = client.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]["200"]
    assert list(ok["content"]) == ["text/plain"]
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "text/plain"


def test_a_503_says_when_to_retry(bundles, tmp_path):
    """Before the lifespan has run (the models not loaded), the 503s carry Retry-After."""
    app = create_app(make_settings(bundles, tmp_path / "data", database_url=sqlite_url(tmp_path)))
    client = TestClient(app)  # not entered: no lifespan
    for response in (client.get("/readyz"), client.get("/gallery"), client.get("/models")):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.headers["content-type"] == "application/problem+json"
