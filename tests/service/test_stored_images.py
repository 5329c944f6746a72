"""Stored crops: enrollment keeps the bytes, GET /gallery/{id}/image serves them back unchanged, deletes
remove them from the database; REID_STORE_IMAGES=false keeps none. On SQLite and PostgreSQL."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from app.gallery.store import StoredImage
from app.main import create_app
from tests.service.helpers import crop, enroll, files, make_settings, query


def stored_rows(url: str) -> dict[int, bytes]:
    """The gallery_images table as it is in the database (not through the API)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {i: d for i, d in conn.execute(select(StoredImage.entry_id, StoredImage.data))}
    finally:
        engine.dispose()


def test_the_bytes_served_back_are_the_bytes_enrolled(client, settings, people):
    png, jpeg = crop(people[0], fmt="PNG"), crop(people[1], fmt="JPEG")
    by_format = {}
    for blob, kind in ((png, "image/png"), (jpeg, "image/jpeg")):
        # The client's claimed type is ignored: the JPEG is sent as "image/png" too (helpers.files).
        (entry,) = enroll(client, blob, identity=kind, expect=201)
        assert entry["image_url"] == f"/gallery/{entry['id']}/image"
        response = client.get(entry["image_url"])
        assert response.status_code == 200
        assert response.content == blob
        assert response.headers["content-type"] == kind
        assert response.headers["x-content-type-options"] == "nosniff"
        by_format[kind] = entry
    assert stored_rows(settings.database) == {
        by_format["image/png"]["id"]: png,
        by_format["image/jpeg"]["id"]: jpeg,
    }
    # Entries, pages and matches all carry the URL.
    entry = by_format["image/png"]
    assert client.get(f"/gallery/{entry['id']}").json()["image_url"] == entry["image_url"]
    assert {e["image_url"] for e in client.get("/gallery").json()["items"]} == {
        e["image_url"] for e in by_format.values()
    }
    best = query(client, png, top_k=1)[0]
    assert best["entry_id"] == entry["id"] and best["image_url"] == entry["image_url"]
    stats = client.get("/gallery/stats").json()
    assert stats["stored_images"] == 2 and stats["outdated"] == 0


def test_the_image_is_revalidated_by_its_sha256(client, people):
    (entry,) = enroll(client, crop(people[0]))
    first = client.get(entry["image_url"])
    assert first.headers["etag"] == f'"{entry["image_sha256"]}"'
    assert "no-cache" in first.headers["cache-control"]
    again = client.get(entry["image_url"], headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_unknown_entry_or_no_image_is_a_404_that_says_which(client):
    response = client.get("/gallery/999/image")
    assert response.status_code == 404
    assert response.json()["detail"] == "no gallery entry with id 999"
    assert client.get("/gallery/0/image").status_code == 422


def test_deleting_an_entry_or_erasing_an_identity_removes_the_bytes(client, settings, people):
    kept = enroll(client, crop(people[0]), identity="kept")[0]
    one = enroll(client, crop(people[1]), identity="one")[0]
    erased = [enroll(client, crop(people[2], cam), identity="erased")[0] for cam in (1, 2, 3)]
    assert set(stored_rows(settings.database)) == {kept["id"], one["id"], *(e["id"] for e in erased)}

    assert client.delete(f"/gallery/{one['id']}").status_code == 200
    assert set(stored_rows(settings.database)) == {kept["id"], *(e["id"] for e in erased)}
    assert client.get(one["image_url"]).status_code == 404

    assert client.delete("/gallery", params={"identity": "erased"}).json()["deleted"] == 3
    assert set(stored_rows(settings.database)) == {kept["id"]}
    assert all(client.get(e["image_url"]).status_code == 404 for e in erased)
    assert client.get(kept["image_url"]).content == crop(people[0])


def test_store_images_off_keeps_none_and_turning_it_on_fills_them_in(bundles, database_url, tmp_path, people):
    blob = crop(people[0])
    off = make_settings(bundles, tmp_path / "data", database_url=database_url, store_images=False)
    with TestClient(create_app(off)) as client:
        (entry,) = enroll(client, blob, identity="private")
        assert entry["image_url"] is None
        assert client.get(f"/gallery/{entry['id']}").json()["image_url"] is None
        assert query(client, blob, top_k=1)[0]["image_url"] is None
        response = client.get(f"/gallery/{entry['id']}/image")
        assert response.status_code == 404
        assert response.json()["detail"] == f"gallery entry {entry['id']} has no stored image"
        assert client.get("/gallery/stats").json()["stored_images"] == 0
    assert stored_rows(off.database) == {}

    on = off.model_copy(update={"store_images": True})
    with TestClient(create_app(on)) as client:
        # The same bytes again: the entry is unchanged ("existing") and keeps its crop from now on.
        response = client.post("/gallery", files=files(blob))
        assert response.status_code == 200
        (again,) = response.json()["entries"]
        assert again["status"] == "existing" and again["id"] == entry["id"]
        assert again["image_url"] == f"/gallery/{entry['id']}/image"
        assert client.get(again["image_url"]).content == blob
    assert stored_rows(on.database) == {entry["id"]: blob}


def test_the_same_bytes_twice_in_a_request_are_stored_once(client, settings, people):
    blob = crop(people[0])
    body = client.post("/gallery", files=files(blob, blob)).json()
    assert body["created"] == 1
    engine = create_engine(settings.database)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(StoredImage)) == 1
    engine.dispose()
