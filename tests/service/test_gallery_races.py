"""Rare paths of the gallery, reached on purpose: races forced by patching the step they fall between,
an index update that fails after its commit, the widening of a search grouped by identity, and times
given in zones other than UTC. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.gallery import store
from app.gallery.gallery import Gallery
from app.settings import Settings
from tests.service.helpers import SIZE, crop, encode, enroll, files, make_settings, parse_time, query
from tests.synthetic import render


@pytest.fixture
def settings(bundles, database_url, tmp_path) -> Settings:
    # No periodic index sync: these tests look at the index between a failure and its repair.
    return make_settings(bundles, tmp_path / "data", database_url=database_url, index_sync_seconds=0)


@pytest.fixture
def gallery(client) -> Gallery:
    return client.app.state.gallery


def counts(client) -> tuple[int, int, int]:
    """(entries, searchable, index size), the index size counted in FAISS itself (an id added twice
    counts twice there)."""
    stats = client.get("/gallery/stats").json()
    held = sum(client.app.state.gallery.index.sizes().values())
    assert held == stats["index_size"], "the index's id map and its FAISS indexes disagree"
    return stats["entries"], stats["searchable"], stats["index_size"]


# -- enrollment races ---------------------------------------------------------------------------------


def test_same_bytes_inserted_by_another_process_meanwhile_are_retried_as_existing(
    client, gallery, people, monkeypatch
):
    """Between this request's read and its insert, another process commits the same bytes: the unique
    constraint refuses the insert, the retry finds that entry, and this process's index gets it."""
    blob = crop(people[0])
    real = store.add_entries
    inserted: list[list[str]] = []

    def racing(session, *, collection, items, **kwargs):
        inserted.append([item.image_sha256 for item in items])
        if len(inserted) == 1:
            with Session(gallery.engine) as other, other.begin():  # the other process's transaction
                theirs = [replace(item, identity="other process") for item in items]
                real(other, collection=collection, items=theirs, **kwargs)
        return real(session, collection=collection, items=items, **kwargs)

    monkeypatch.setattr(store, "add_entries", racing)
    response = client.post("/gallery", files=files(blob), data={"identity": "this process"})
    assert response.status_code == 200, response.text  # nothing created by this request
    (entry,) = response.json()["entries"]
    assert entry["status"] == "existing" and entry["identity"] == "other process"
    assert inserted == [[hashlib.sha256(blob).hexdigest()], []]  # the retry had nothing left to insert
    listed = client.get("/gallery").json()
    assert [item["id"] for item in listed["items"]] == [entry["id"]]
    # The other process's row is searchable here too (it was in no index of this process).
    assert query(client, blob, top_k=1)[0]["entry_id"] == entry["id"]
    assert counts(client) == (1, 1, 1)


def test_a_lasting_integrity_error_gives_up_after_three_attempts(client, gallery, people, monkeypatch):
    attempts = []

    def refusing(session, **kwargs):
        attempts.append(1)
        raise IntegrityError("INSERT INTO gallery_entries", {}, Exception("duplicate key"))

    monkeypatch.setattr(store, "add_entries", refusing)
    with pytest.raises(IntegrityError):
        client.post("/gallery", files=files(crop(people[1])))
    assert len(attempts) == 3
    assert counts(client) == (0, 0, 0)


def race_before_the_write(gallery: Gallery, monkeypatch, change) -> list[int]:
    """Run ``change`` once between enroll's first read (outside the write lock) and its write; returns
    the number of crops each ``_compute`` call embedded."""
    real_write, real_compute = gallery._write_enrollment, gallery._compute
    computed: list[int] = []

    def write(*args):
        change()
        monkeypatch.setattr(gallery, "_write_enrollment", real_write)
        return real_write(*args)

    def compute(crops, fields):
        computed.append(len(crops))
        return real_compute(crops, fields)

    monkeypatch.setattr(gallery, "_write_enrollment", write)
    monkeypatch.setattr(gallery, "_compute", compute)
    return computed


def test_an_entry_deleted_meanwhile_is_embedded_and_enrolled_again(client, gallery, people, monkeypatch):
    blob = crop(people[2])
    (first,) = enroll(client, blob, identity="before")
    computed = race_before_the_write(gallery, monkeypatch, lambda: gallery.delete(first["id"]))
    (again,) = enroll(client, blob, identity="after", expect=201)
    # First read: the entry is there and current, nothing to embed; under the lock it is gone.
    assert computed == [0, 1]
    assert again["status"] == "created" and again["identity"] == "after"  # a new row, not the old one
    (listed,) = client.get("/gallery").json()["items"]  # (SQLite may give it the deleted row's id)
    assert listed["id"] == again["id"] and listed["identity"] == "after"
    best = query(client, blob, top_k=1)[0]
    assert best["entry_id"] == again["id"] and best["score"] == pytest.approx(1.0, abs=1e-4)
    assert counts(client) == (1, 1, 1)


def test_an_entry_re_embedded_elsewhere_meanwhile_is_refreshed(client, gallery, people, monkeypatch):
    """Another process re-embeds the entry with another bundle in between: the write embeds the crop
    again with the loaded bundle rather than leave the entry unsearchable."""
    blob = crop(people[3])
    (first,) = enroll(client, blob, identity="kept")

    def other_bundle() -> None:
        with gallery.sessions.begin() as session:
            session.execute(
                update(store.Entry).where(store.Entry.id == first["id"]).values(model_version="0ther0bundle")
            )

    computed = race_before_the_write(gallery, monkeypatch, other_bundle)
    (again,) = enroll(client, blob, expect=201)
    assert computed == [0, 1]
    assert again["status"] == "refreshed" and again["id"] == first["id"] and again["identity"] == "kept"
    assert again["model_version"] == first["model_version"] and again["searchable"] is True
    assert client.get(f"/gallery/{first['id']}").json()["model_version"] == first["model_version"]
    assert query(client, blob, top_k=1)[0]["entry_id"] == first["id"]
    assert counts(client) == (1, 1, 1)


def test_a_refreshed_entry_joins_the_index_once(client, gallery, people):
    """An entry of another bundle (so in no index) enrolled again is re-embedded and indexed once: the
    repair of unindexed entries leaves refreshed ones to the refresh."""
    blob = crop(people[3], cam=2)
    (first,) = enroll(client, blob)
    with gallery.sessions.begin() as session:
        session.execute(
            update(store.Entry).where(store.Entry.id == first["id"]).values(model_version="0ther0bundle")
        )
    gallery.rebuild()  # as a start with the loaded bundle would: the entry is not searchable
    assert counts(client) == (1, 0, 0)
    (again,) = enroll(client, blob, expect=201)
    assert again["status"] == "refreshed" and again["id"] == first["id"]
    assert counts(client) == (1, 1, 1)


# -- the index behind the database --------------------------------------------------------------------


@pytest.mark.parametrize("repair", ["enroll-again", "sync"])
def test_an_entry_committed_but_not_indexed_is_found_and_indexed(
    client, gallery, people, monkeypatch, repair
):
    """The index update fails after the commit (Milvus away, memory short): the database holds the
    entry, so the request succeeds and says so; enrolling the same bytes again finds the entry missing
    from the index and adds its stored embedding; so does the service's periodic index sync
    (``Gallery.sync_index``, here called once)."""
    blob = crop(people[4])

    def failing(*args, **kwargs):
        raise MemoryError("index update failed")

    with monkeypatch.context() as patch:
        patch.setattr(gallery.index, "add", failing)
        (accepted,) = enroll(client, blob, identity="lost")
    failures = client.get("/metrics").text
    assert "reid_gallery_index_write_failures_total 1.0" in failures
    (stored,) = client.get("/gallery", params={"identity": "lost"}).json()["items"]
    assert stored["id"] == accepted["id"]
    assert stored["searchable"] is True
    assert counts(client) == (1, 1, 0)  # in the database, not in the index
    assert query(client, blob) == []

    if repair == "sync":
        assert gallery.sync_index() == 1
    else:
        (again,) = enroll(client, blob, identity="lost", expect=200)
        assert again["status"] == "existing" and again["id"] == stored["id"]
    best = query(client, blob, top_k=1)[0]
    assert best["entry_id"] == stored["id"] and best["score"] == pytest.approx(1.0, abs=1e-4)
    assert counts(client) == (1, 1, 1)
    with gallery.sessions() as session:  # the index holds the stored embedding, not a recomputed one
        row = session.get(store.Embedding, stored["id"])
        assert row is not None
        held = gallery.index.vectors("default", [stored["id"]])[0]
        np.testing.assert_array_equal(held, np.frombuffer(row.vector, np.float32))


# -- search grouped by identity -----------------------------------------------------------------------


def test_group_by_identity_widens_its_search_until_it_has_top_k_identities(
    client, gallery, people, monkeypatch
):
    """Twelve near-copies of one crop (one pixel differs) of one identity fill the first 4 * top_k
    candidates; the search widens until it has top_k identities."""
    base = render(people[5], 1, np.random.default_rng(0), SIZE)
    copies = []
    for i in range(12):
        image = base.copy()
        image.putpixel((0, 0), (i, i, i))
        copies.append(encode(image))
    enroll(client, *copies, identity="crowd")
    for k, person in enumerate(people[6:12]):
        enroll(client, crop(person), identity=f"single-{k}")
    ranking = query(client, encode(base), top_k=18)
    assert {m["identity"] for m in ranking[:12]} == {"crowd"}, "the copies should be the 12 nearest"

    real_search = gallery.index.search
    asked: list[int] = []

    def search(collection, vector, k, **kwargs):
        asked.append(k)
        return real_search(collection, vector, k, **kwargs)

    monkeypatch.setattr(gallery.index, "search", search)
    grouped = query(client, encode(base), top_k=3, group_by="identity")
    assert asked == [12, 48]  # 4 * top_k gave one identity; four times as many gave enough
    best: dict[str, int] = {}
    for m in ranking:
        best.setdefault(m["identity"], m["entry_id"])
    assert [m["entry_id"] for m in grouped] == list(best.values())[:3]
    assert grouped[0]["identity"] == "crowd" and len({m["identity"] for m in grouped}) == 3

    # Fewer identities than asked for: it stops when the collection is exhausted, with all of them.
    asked.clear()
    everyone = query(client, encode(base), top_k=10, group_by="identity")
    assert [m["entry_id"] for m in everyone] == list(best.values())
    assert asked == [40]


# -- time zones ---------------------------------------------------------------------------------------


def test_times_in_other_zones_are_the_same_instants_in_utc(client, people):
    """captured_at and the time filters may carry any offset (or none: UTC); stored and compared as the
    instant they name, returned in UTC."""
    at = {
        "east": ("2024-05-01T14:30:00+02:00", datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
        "naive": ("2024-05-01T12:40:00", datetime(2024, 5, 1, 12, 40, tzinfo=UTC)),
        "west": ("2024-05-01T08:45:00-04:00", datetime(2024, 5, 1, 12, 45, tzinfo=UTC)),
    }
    ids = {}
    for n, (name, (given, instant)) in enumerate(at.items()):
        (entry,) = enroll(client, crop(people[12 + n]), identity=name, captured_at=given)
        assert entry["captured_at"].endswith("Z") and parse_time(entry["captured_at"]) == instant
        stored = client.get(f"/gallery/{entry['id']}").json()["captured_at"]
        assert stored.endswith("Z") and parse_time(stored) == instant
        ids[entry["id"]] = name

    def found(**window) -> set[str]:
        return {ids[m["entry_id"]] for m in query(client, crop(people[12]), top_k=10, **window)}

    assert found(captured_after="2024-05-01T14:35:00+02:00") == {"naive", "west"}  # 12:35Z
    assert found(captured_before="2024-05-01T08:42:00-04:00") == {"east", "naive"}  # 12:42Z
    assert found(captured_after="2024-05-01T21:35:00+09:00", captured_before="2024-05-01T12:41:00Z") == {
        "naive"
    }
    assert found(captured_after="2024-05-01T12:45:00") == {"west"}  # no zone: UTC; inclusive
    assert found(captured_before="2024-05-01T14:29:59+02:00") == set()
