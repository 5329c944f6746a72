"""Index snapshots and replicas: the change log keeps every service on one database current.

- A restart loads the snapshot written at shutdown, catches up from the change log what other processes
  wrote meanwhile, and checks itself against the database; a snapshot that disagrees is rebuilt.
- Two services on the same database: a write on one is found by the other within 2 s, a delete
  disappears within 2 s (the poll runs every second, REID_INDEX_SYNC_SECONDS' default).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from app.gallery import store
from app.main import create_app
from tests.service.helpers import (
    FILTER_CASES,
    crop,
    enroll,
    enroll_for_filters,
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
        enroll_for_filters(client, people)
        agree(client)
    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "snapshot"
        agree(client)
    for path in snapshot_manifests(settings.data_dir):
        path.unlink()
    with TestClient(create_app(settings)) as client:
        assert client.app.state.gallery.started_from == "rebuilt"
        agree(client)


def age_change_log(url: str, days: int) -> None:
    """Make every change-log row ``days`` older, as if written then."""
    engine = create_engine(url)
    older = (
        f"created_at - INTERVAL '{days} days'"
        if engine.dialect.name == "postgresql"
        else f"datetime(created_at, '-{days} days')"
    )
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE gallery_changes SET created_at = {older}"))
    engine.dispose()


def test_the_change_log_is_pruned_and_a_snapshot_older_than_it_is_rebuilt(
    bundles, database_url, tmp_path, people, caplog
):
    """Rows past REID_CHANGE_LOG_DAYS are pruned (the last one stays: it is the position). A snapshot
    whose later changes were pruned cannot be caught up (here: a delete it never saw) and is rebuilt."""
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url)
    assert settings.change_log_days == 7
    with TestClient(create_app(settings)) as client:
        ids = [enroll(client, crop(p))[0]["id"] for p in people[:3]]
    update = {"data_dir": tmp_path / "other", "index_snapshots": False, "index_sync_seconds": 0}
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        assert client.delete(f"/gallery/{ids[0]}").status_code == 200
        new = enroll(client, crop(people[4]))[0]["id"]
        gallery = client.app.state.gallery
        with gallery.sessions() as session:
            last, logged = (
                store.change_position(session),
                len(store.changes_after(session, position=0, limit=99)),
            )
        assert logged == 5
        assert gallery.prune_change_log() == 0  # nothing old enough
        age_change_log(settings.database, 8)
        assert gallery.prune_change_log() == logged - 1
        with gallery.sessions() as session:
            assert store.change_position(session) == last  # kept
            assert store.changes_after(session, position=0, limit=99) == [(last, new)]
    with (
        caplog.at_level(logging.WARNING, logger="app.gallery.gallery"),
        TestClient(create_app(settings)) as client,
    ):
        gallery = client.app.state.gallery
        assert gallery.started_from == "rebuilt"
        assert "older than the change log's retention" in caplog.text  # not loaded, then found wrong
        assert gallery.index.fingerprints() == {"default": (3, ids[1] + ids[2] + new)}
        assert ids[0] not in [m["entry_id"] for m in query(client, crop(people[0]), top_k=10)]


def test_a_replica_behind_the_pruned_change_log_rebuilds_its_index(bundles, database_url, tmp_path, people):
    """A replica that was stalled past the retention while another wrote and pruned: its next poll finds
    the changes after its position gone, rebuilds from the database and holds what the other wrote."""
    a = make_settings(bundles, tmp_path / "a", database_url=database_url, index_sync_seconds=0)
    b = make_settings(bundles, tmp_path / "b", database_url=database_url, index_sync_seconds=0)
    with TestClient(create_app(a)) as one, TestClient(create_app(b)) as two:
        kept = enroll(one, crop(people[0]))[0]["id"]
        gone = enroll(one, crop(people[1]))[0]["id"]
        stalled = two.app.state.gallery
        assert stalled.sync_index() == 2
        assert one.delete(f"/gallery/{gone}").status_code == 200  # a change it will never read
        late = enroll(one, crop(people[2]))[0]["id"]
        age_change_log(a.database, 30)
        assert one.app.state.gallery.prune_change_log() == 3  # of 4: the last stays
        assert stalled.gap_rebuilds == 0
        stalled.sync_index()
        assert stalled.gap_rebuilds == 1
        assert stalled.index.fingerprints() == {"default": (2, kept + late)}
        assert best(two, crop(people[2])) == late
        assert stalled.sync_index() == 0 and stalled.gap_rebuilds == 1  # current again


def test_a_gap_in_the_log_reads_as_pruned_only_when_nothing_before_it_survives(tmp_path):
    """``store.pruned_after``: ids skipped by a rolled-back transaction are no gap while older rows
    remain; once the rows before the gap are pruned, a position before it can no longer be caught up."""
    engine = store.open_engine(f"sqlite:///{tmp_path / 'log.sqlite3'}")
    store.prepare_schema(engine)
    with engine.begin() as conn:
        conn.execute(
            store.Change.__table__.insert(),
            [
                {"id": i, "entry_id": i, "kind": "added", "created_at": datetime(2026, 1, 1)}
                for i in (1, 2, 3, 5, 6)
            ],
        )
    with Session(engine) as session:
        assert [store.pruned_after(session, position=p) for p in (0, 1, 3, 6)] == [False] * 4
        session.execute(store.Change.__table__.delete().where(store.Change.id <= 2))
        assert not store.pruned_after(session, position=3)  # 3 survives: 4 never was
        assert store.pruned_after(session, position=1)  # 2 is gone
        session.execute(store.Change.__table__.delete().where(store.Change.id == 3))
        assert store.pruned_after(session, position=3)  # 4 may have been (it never was: a needless rebuild)
        assert not store.pruned_after(session, position=5)
    engine.dispose()
