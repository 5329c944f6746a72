"""Gallery writes through HTTP: idempotency, deletes, persistence, bundle versions; on SQLite and
(when REID_TEST_POSTGRES_URL is set) PostgreSQL, and on both vector backends (FAISS, Milvus Lite)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.service.helpers import BACKENDS, backend_settings, crop, enroll, files, make_settings, query


@pytest.fixture(params=BACKENDS)
def settings(request, bundles, database_url, tmp_path) -> Settings:
    """Each test here runs on both vector backends (FAISS in the process, Milvus Lite in a file)."""
    overrides = backend_settings(request.param, tmp_path)
    return make_settings(bundles, tmp_path / "data", database_url=database_url, **overrides)


def test_reenrolling_the_same_bytes_is_idempotent_per_collection(client, people):
    blob = crop(people[0])
    first = client.post("/gallery", files=files(blob), data={"identity": "a"})
    assert first.status_code == 201 and first.json()["entries"][0]["status"] == "created"
    again = client.post("/gallery", files=files(blob), data={"identity": "a"})
    assert again.status_code == 200
    body = again.json()
    assert body["created"] == 0 and body["existing"] == 1
    assert body["entries"][0]["status"] == "existing"
    assert body["entries"][0]["id"] == first.json()["entries"][0]["id"]
    # The same bytes twice in one request, and in another collection.
    both = client.post("/gallery", files=files(blob, blob), data={"collection": "other"}).json()
    assert both["created"] == 1 and both["entries"][0]["id"] == both["entries"][1]["id"]
    assert both["entries"][0]["id"] != first.json()["entries"][0]["id"]
    stats = client.get("/gallery/stats").json()
    assert stats["entries"] == 2 and stats["collections"]["default"]["entries"] == 1


def test_a_narrow_filter_still_finds_its_best_match(client, people):
    """Top-1 with a filter that only one far-away entry passes: a post-filtered top-k would miss it."""
    for k, person in enumerate(people[:10]):
        enroll(client, crop(person, 1), camera_id="busy", identity=f"p{k}")
    (lonely,) = enroll(client, crop(people[20], 3), camera_id="quiet", identity="lonely")
    (got,) = query(client, crop(people[0], 1), top_k=1, camera_id="quiet")
    assert got["entry_id"] == lonely["id"]
    (got,) = query(client, crop(people[0], 1), top_k=1, exclude_camera_id="busy")
    assert got["entry_id"] == lonely["id"]
    body = client.post(
        "/reid/query", files=files(crop(people[0]), field="image"), data={"camera_id": "nowhere"}
    ).json()
    assert body["matches"] == [] and body["candidates"] == 0


def test_delete_and_erase_by_identity(client, people):
    entries = {}
    for person in people[:5]:
        for cam in (1, 2):
            (entries[(person.pid, cam)],) = enroll(
                client, crop(person, cam), identity=f"person-{person.pid}", camera_id=f"cam-{cam}"
            )
    n = len(entries)
    target = entries[(people[1].pid, 1)]
    assert client.delete(f"/gallery/{target['id']}").json() == {"deleted": 1, "ids": [target["id"]]}
    assert client.get(f"/gallery/{target['id']}").status_code == 404
    assert client.delete(f"/gallery/{target['id']}").status_code == 404
    matches = query(client, crop(people[1], 1), top_k=n)
    assert target["id"] not in {m["entry_id"] for m in matches}
    assert len(matches) == n - 1

    identity = f"person-{people[2].pid}"
    erased = client.delete("/gallery", params={"identity": identity}).json()
    assert erased["deleted"] == 2
    assert sorted(erased["ids"]) == sorted(entries[(people[2].pid, c)]["id"] for c in (1, 2))
    matches = query(client, crop(people[2], 1), top_k=n)
    assert identity not in {m["identity"] for m in matches}
    assert client.get("/gallery", params={"identity": identity}).json()["total"] == 0
    # Erasing in another collection touches nothing here.
    other = client.delete("/gallery", params={"identity": f"person-{people[3].pid}", "collection": "x"})
    assert other.json()["deleted"] == 0
    stats = client.get("/gallery/stats").json()
    assert stats["entries"] == stats["searchable"] == stats["index_size"] == n - 3


def test_collections_are_searched_apart(client, people):
    enroll(client, crop(people[0]), identity="in-default")
    enroll(client, crop(people[1]), identity="in-north", collection="north")
    (only,) = query(client, crop(people[0]), collection="north")
    assert only["identity"] == "in-north"
    assert query(client, crop(people[0]), collection="empty") == []


def test_a_new_app_over_the_same_database_gives_the_same_answers(settings, people):
    with TestClient(create_app(settings)) as first:
        for person in people[:8]:
            enroll(first, crop(person, 1), identity=f"p{person.pid}", camera_id="c1")
        enroll(first, crop(people[0], 2), identity="gone")
        first.delete("/gallery", params={"identity": "gone"})
        before = [query(first, crop(p, 1), top_k=4) for p in people[:3]]
        stats_before = first.get("/gallery/stats").json()
    with TestClient(create_app(settings)) as second:
        assert second.get("/gallery/stats").json() == stats_before
        after = [query(second, crop(p, 1), top_k=4) for p in people[:3]]
        assert after == before
        again = client_enroll_status(second, crop(people[0], 1))
        assert again == "existing"


def client_enroll_status(client, blob: bytes) -> str:
    return client.post("/gallery", files=files(blob)).json()["entries"][0]["status"]


def test_entries_of_another_reid_bundle_are_reported_and_never_searched(
    bundles, other_reid_bundle, database_url, tmp_path, people
):
    old = make_settings(bundles, tmp_path / "data", database_url=database_url)
    with TestClient(create_app(old)) as client:
        old_entries = [enroll(client, crop(p), identity=f"old{p.pid}")[0] for p in people[:3]]
        old_version = old_entries[0]["model_version"]
    new = make_settings(bundles, tmp_path / "data", database_url=database_url, reid_bundle=other_reid_bundle)
    with TestClient(create_app(new)) as client:
        new_entries = [
            enroll(client, crop(p), identity=f"new{p.pid}", collection="b")[0] for p in people[3:5]
        ]
        stats = client.get("/gallery/stats").json()
        assert stats["model_version"] != old_version
        assert stats["entries"] == 5 and stats["searchable"] == 2 and stats["index_size"] == 2
        assert stats["excluded_other_versions"] == {old_version: 3}
        assert stats["collections"]["default"] == {
            "entries": 3,
            "searchable": 0,
            "other_versions": {old_version: 3},
        }
        assert query(client, crop(people[0])) == []  # the old entries are not mixed in
        assert query(client, crop(people[0]), camera_id="x") == []
        assert {m["entry_id"] for m in query(client, crop(people[3]), collection="b")} == {
            e["id"] for e in new_entries
        }
        stored = client.get(f"/gallery/{old_entries[0]['id']}").json()
        assert stored["searchable"] is False and stored["model_version"] == old_version
        # Enrolling the same bytes again re-embeds the old entry with the loaded bundle.
        response = client.post("/gallery", files=files(crop(people[0])))
        assert response.status_code == 201
        (entry,) = response.json()["entries"]
        assert entry["status"] == "refreshed" and entry["id"] == old_entries[0]["id"]
        assert entry["identity"] == f"old{people[0].pid}" and entry["searchable"] is True
        assert query(client, crop(people[0]), top_k=1)[0]["entry_id"] == entry["id"]
        assert client.get("/gallery/stats").json()["excluded_other_versions"] == {old_version: 2}
