"""/healthz, /readyz, /models, /metrics and the OpenAPI document; /healthz answers during inference."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.service.helpers import DATABASES, crop, database_for, enroll, files, make_settings, sqlite_url


@pytest.fixture(scope="module", params=DATABASES)
def client(request, bundles, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ops")
    settings = make_settings(bundles, tmp / "data", database_url=database_for(request.param, tmp))
    with TestClient(create_app(settings)) as c:
        yield c


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ok"}


def test_readyz_is_503_before_start(bundles, tmp_path):
    app = create_app(make_settings(bundles, tmp_path / "data", database_url=sqlite_url(tmp_path)))
    client = TestClient(app)  # not entered: the lifespan has not run
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200
    assert client.get("/models").status_code == 503


def test_models_describes_both_bundles(client):
    body = client.get("/models").json()
    assert body["attributes"]["task"] == "attributes" and body["reid"]["task"] == "reid"
    assert len(body["reid"]["version"]) == 12
    assert body["reid"]["embedding_dim"] == 256 and body["reid"]["match_threshold"] == 0.9
    assert body["reid"]["metrics"]["note"].startswith("random weights")
    assert body["attributes"]["input_size"] == [64, 32]


def test_metrics(client, people):
    (entry,) = enroll(client, crop(people[0]))
    client.get(f"/gallery/{entry['id']}")
    client.post("/attributes", files=files(crop(people[1]), crop(people[2])))
    text = client.get("/metrics").text
    assert 'reid_http_requests_total{method="GET",route="/gallery/{entry_id}",status="200"} 1.0' in text
    assert 'reid_http_request_duration_seconds_count{method="POST",route="/gallery"}' in text
    assert 'reid_inference_crops_total{task="attributes"} 3.0' in text
    assert 'reid_inference_seconds_count{task="reid"}' in text
    assert "reid_gallery_searchable_entries 1.0" in text


def test_openapi_documents_the_endpoints_with_examples(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("/attributes", "post"),
        ("/gallery", "post"),
        ("/gallery", "get"),
        ("/gallery", "delete"),
        ("/gallery/stats", "get"),
        ("/gallery/{entry_id}", "get"),
        ("/gallery/{entry_id}", "delete"),
        ("/gallery/{entry_id}/image", "get"),
        ("/admin/reembed", "post"),
        ("/reid/query", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/models", "get"),
    }
    assert {(p, m) for p, ops in paths.items() for m in ops} == expected  # the console (/ui) is left out
    schemas = spec["components"]["schemas"]
    for name in ("QueryResponse", "EnrollResponse", "AttributesResponse", "GalleryStats"):
        assert schemas[name]["examples"], name
    # Opened without keys: no security scheme (the keyed document is in test_api_contract.py).
    assert "securitySchemes" not in spec["components"]


@pytest.mark.anyio
async def test_healthz_answers_while_inference_is_busy(bundles, tmp_path, people):
    app = create_app(
        make_settings(bundles, tmp_path / "data", database_url=sqlite_url(tmp_path), inference_workers=1)
    )
    heavy = files(*[crop(p, cam) for p in people[:16] for cam in (1, 2, 3, 4)])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            busy = [asyncio.create_task(client.post("/attributes", files=heavy)) for _ in range(4)]
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            health = await client.get("/healthz")
            health_seconds = time.perf_counter() - start
            still_busy = sum(not task.done() for task in busy)
            results = await asyncio.gather(*busy)
    assert health.status_code == 200
    assert all(r.status_code == 200 and len(r.json()["crops"]) == 64 for r in results)
    assert still_busy > 0, "inference finished before /healthz was asked; the test proves nothing"
    assert health_seconds < 2.0  # generous: other processes may share the cores
