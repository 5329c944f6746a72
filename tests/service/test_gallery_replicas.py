"""Index snapshots and replicas: the change log keeps every service on one database current.

- A restart loads the snapshot written at shutdown, catches up from the change log what other processes
  wrote meanwhile, and checks itself against the database; a snapshot that disagrees is rebuilt.
- Two services on the same database: a write on one is found by the other within 2 s, a delete
  disappears within 2 s (the poll runs every second, REID_INDEX_SYNC_SECONDS' default).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.gallery import store
from app.main import create_app
from tests.service.helpers import (
    FILTER_CAMERAS,
    FILTER_CASES,
    FILTER_TIMES,
    crop,
    enroll,
    make_settings,
    query,
)


def snapshot_manifests(data_dir) -> list:
    return list((data_dir / "index").glob("*/manifest.json"))


def best(client: TestClient, blob: bytes) -> int | None:
    matches = query(client, blob, top_k=1)
    return matches[0]["entry_id"] if matches else None


def within(seconds: float, condition: Callable[[], bool]) -> float:
    """Seconds until ``condition`` held (fails after ``seconds``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_restart_loads_the_snapshot_and_catches_up_with_what_others_wrote(
    bundles, database_url, tmp_path, people
):
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "rebuilt"  # nothing to load yet
        first = [enroll(client, crop(p), identity=f"p{p.pid}")[0]["id"] for p in people[:4]]
    assert len(snapshot_manifests(settings.data_dir)) == 1  # written at shutdown

    # While it is down, another process (its own data folder, no snapshots) enrolls and deletes.
    other = settings.model_copy(update={"data_dir": tmp_path / "other", "index_snapshots": False})
    with TestClient(create_app(other)) as client:
        added = enroll(client, crop(people[5]), identity="late")[0]["id"]
        assert client.delete(f"/gallery/{first[0]}").status_code == 200

    with TestClient(create_app(settings)) as client:
        gallery = client.app.state.gallery
        assert gallery.started_from == "snapshot"
        assert client.get("/gallery/stats").json()["index_size"] == 4
        assert best(client, crop(people[5])) == added
        assert first[0] not in [m["entry_id"] for m in query(client, crop(people[0]), top_k=10)]
        assert best(client, crop(people[1])) == first[1]


def test_a_snapshot_that_disagrees_with_the_database_is_rebuilt(bundles, database_url, tmp_path, people):
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url)
    with TestClient(create_app(settings)) as client:
        ids = [enroll(client, crop(p))[0]["id"] for p in people[:3]]
    # A row removed behind the change log's back (a restore, a hand-made DELETE): count and id sum differ.
    engine = create_engine(settings.database)
    with engine.begin() as conn:
        for table in ("gallery_entry_attributes", "gallery_embeddings", "gallery_images"):
            conn.execute(text(f"DELETE FROM {table} WHERE entry_id = :id"), {"id": ids[2]})
        conn.execute(text("DELETE FROM gallery_entries WHERE id = :id"), {"id": ids[2]})
    engine.dispose()
    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "rebuilt"
        assert client.get("/gallery/stats").json()["index_size"] == 2
        assert ids[2] not in [m["entry_id"] for m in query(client, crop(people[2]), top_k=10)]
    # A manifest that cannot be read is rebuilt too (and written anew).
    (manifest,) = snapshot_manifests(settings.data_dir)
    manifest.write_text("{not json")
    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "rebuilt"
        assert best(client, crop(people[1])) == ids[1]
    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "snapshot"


def test_two_replicas_see_each_others_writes_and_deletes_within_2_seconds(
    bundles, database_url, tmp_path, people
):
    a = make_settings(bundles, tmp_path / "a", database_url=database_url)
    b = make_settings(bundles, tmp_path / "b", database_url=database_url)
    assert a.index_sync_seconds == 1.0
    with TestClient(create_app(a)) as one, TestClient(create_app(b)) as two:
        entry = enroll(one, crop(people[0]), identity="alice", camera_id="gate")[0]["id"]
        assert best(one, crop(people[0])) == entry  # the replica that took the write: at once
        waited = within(2.0, lambda: best(two, crop(people[0])) == entry)
        filtered = query(two, crop(people[0]), top_k=1, cameras="gate")
        assert [m["entry_id"] for m in filtered] == [entry]

        other = enroll(two, crop(people[1]), identity="bob")[0]["id"]
        within(2.0, lambda: best(one, crop(people[1])) == other)

        assert one.delete(f"/gallery/{entry}").status_code == 200
        # Never in a match again (matches are read from the database), and out of the index in 2 s.
        assert entry not in [m["entry_id"] for m in query(two, crop(people[0]), top_k=10)]
        within(2.0, lambda: two.get("/gallery/stats").json()["index_size"] == 1)
        assert two.app.state.gallery.index.fingerprints() == {"default": (1, other)}
        with two.app.state.gallery.sessions() as session:
            assert store.change_position(session) == two.app.state.gallery.position
    assert waited < 2.0


def test_camera_and_time_filters_from_the_index_admit_what_the_database_does(
    bundles, database_url, tmp_path, people
):
    """The index answers camera and time filters from the fields it holds per row (``select``): the same
    ids as the database's query, as enrolled, after a restart from the snapshot, and after a rebuild."""
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url)

    def agree(client: TestClient) -> None:
        gallery = client.app.state.gallery
        with gallery.sessions() as session:
            for f in FILTER_CASES:
                wanted = store.matching_ids(
                    session, collection="default", model_version=gallery.model_version, filters=f
                )
                assert sorted(gallery.index.select("default", f).tolist()) == sorted(wanted.tolist()), f

    with TestClient(create_app(settings)) as client:
        for i, person in enumerate(people[:12]):
            fields = {"camera_id": FILTER_CAMERAS[i % 3]} if FILTER_CAMERAS[i % 3] else {}
            if FILTER_TIMES[i % 4]:
                fields["captured_at"] = FILTER_TIMES[i % 4]
            enroll(client, crop(person), **fields)
        agree(client)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "snapshot"
        agree(client)
    for path in snapshot_manifests(settings.data_dir):
        path.unlink()
    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "rebuilt"
        agree(client)
