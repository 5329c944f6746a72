"""Re-embedding after a bundle change: POST /admin/reembed in the service, `reid-serve reembed` beside a
running service (killed half-way and run again), attributes after an attribute bundle change, and
entries without a stored crop counted, not dropped. On SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select

from app.attribute_schema import schema_as_dict
from app.gallery import store
from app.gallery.gallery import Gallery
from app.gallery.reembed import reembed
from app.inference import Models
from app.main import create_app
from app.preprocess import decode_image
from tests.service.helpers import crop, enroll, files, make_attribute_bundle, make_settings, query

GROUPS = len(schema_as_dict())


@pytest.fixture(scope="module")
def other_attribute_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second attribute bundle (other weights, so another version)."""
    return make_attribute_bundle(tmp_path_factory.mktemp("attributes-other") / "attributes", seed=1)


def table_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        counts = {
            table.name: conn.scalar(select(func.count()).select_from(table))
            for table in (store.Entry.__table__, store.Embedding.__table__, store.EntryAttribute.__table__)
        }
        by_version = select(store.Entry.model_version, func.count()).group_by(store.Entry.model_version)
        counts["versions"] = {v: n for v, n in conn.execute(by_version)}
    engine.dispose()
    return counts


def wait_for(condition, timeout: float = 60.0, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def enroll_old(settings, people, *, without_image: int = 0) -> list[dict]:
    """Enroll one crop per person with ``settings``; the last ``without_image`` with REID_STORE_IMAGES off."""
    keep, bare = people[: len(people) - without_image], people[len(people) - without_image :]
    entries = []
    for chosen, store_images in ((keep, True), (bare, False)):
        with TestClient(create_app(settings.model_copy(update={"store_images": store_images}))) as client:
            entries += [enroll(client, crop(p), identity=f"p{p.pid}", camera_id="c1")[0] for p in chosen]
    return entries


def test_admin_reembed_makes_every_entry_with_a_crop_searchable_again(
    bundles, other_reid_bundle, database_url, tmp_path, people
):
    old = make_settings(bundles, tmp_path / "data", database_url=database_url)
    entries = enroll_old(old, people[:12], without_image=2)
    new = old.model_copy(update={"reid_bundle": other_reid_bundle, "reembed_batch_size": 4})
    with TestClient(create_app(new)) as client:
        stats = client.get("/gallery/stats").json()
        assert (stats["searchable"], stats["outdated"], stats["outdated_without_image"]) == (0, 12, 2)
        assert stats["reembed"]["state"] == "idle"
        assert query(client, crop(people[0])) == []

        started = client.post("/admin/reembed")
        assert started.status_code == 202 and started.json()["started"] is True
        client.app.state.reembed_job.wait(60)
        run = client.get("/gallery/stats").json()["reembed"]
        assert run["state"] == "done", run
        assert (run["total"], run["reembedded"], run["without_image"], run["failed"]) == (12, 10, 2, 0)
        assert run["processed"] == 12 and run["crops_per_second"] > 0

        stats = client.get("/gallery/stats").json()
        assert stats["entries"] == 12 and stats["searchable"] == stats["index_size"] == 10
        assert (stats["outdated"], stats["outdated_without_image"]) == (2, 2)
        for entry, person in zip(entries[:10], people, strict=False):
            (best,) = query(client, crop(person), top_k=1)
            assert best["entry_id"] == entry["id"] and best["identity"] == entry["identity"]
            assert best["score"] >= 0.99999  # the very embedding enrolling this crop now would store
            stored = client.get(f"/gallery/{entry['id']}").json()
            assert stored["searchable"] and stored["model_version"] == stats["model_version"]
            assert stored["attributes"] == entry["attributes"]  # same attribute bundle: kept
        for entry in entries[10:]:  # no crop: kept, reported, not searchable
            stored = client.get(f"/gallery/{entry['id']}").json()
            assert stored["searchable"] is False and stored["model_version"] == entry["model_version"]
        metrics = client.get("/metrics").text
        assert 'reid_reembed_entries{outcome="reembedded"} 10.0' in metrics
        assert 'reid_reembed_entries{outcome="without_image"} 2.0' in metrics
        assert "reid_reembed_running 0.0" in metrics

        # A second run has only the two without a crop left, and changes nothing.
        assert client.post("/admin/reembed").status_code == 202
        run = client.app.state.reembed_job.wait(60)
        assert (run.total, run.reembedded, run.without_image) == (2, 0, 2)
    counts = table_counts(new.database)
    assert counts["gallery_entries"] == counts["gallery_embeddings"] == 12
    assert counts["gallery_entry_attributes"] == 12 * GROUPS
    assert sorted(counts["versions"].values()) == [2, 10]


def test_a_new_attribute_bundle_recomputes_attributes_and_keeps_embeddings(
    bundles, other_attribute_bundle, database_url, tmp_path, people
):
    old = make_settings(bundles, tmp_path / "data", database_url=database_url)
    entries = enroll_old(old, people[:6])
    engine = create_engine(old.database)
    with engine.connect() as conn:
        vectors_before = {
            i: v for i, v in conn.execute(select(store.Embedding.entry_id, store.Embedding.vector))
        }
    new = old.model_copy(update={"attribute_bundle": other_attribute_bundle})
    with TestClient(create_app(new)) as client:
        stats = client.get("/gallery/stats").json()
        assert stats["searchable"] == 6 and stats["outdated"] == 6  # searchable still: same re-ID bundle
        version = client.get("/models").json()["attributes"]["version"]
        client.post("/admin/reembed")
        run = client.app.state.reembed_job.wait(60)
        assert (run.state, run.reembedded) == ("done", 6)
        assert client.get("/gallery/stats").json()["outdated"] == 0
        predicted = client.post("/attributes", files=files(*(crop(p) for p in people[:6]))).json()["crops"]
        for entry, expected in zip(entries, predicted, strict=True):
            assert client.get(f"/gallery/{entry['id']}").json()["attributes"] == expected["attributes"]
    with engine.connect() as conn:
        assert {
            i: v for i, v in conn.execute(select(store.Embedding.entry_id, store.Embedding.vector))
        } == vectors_before
        versions = set(conn.scalars(select(store.Entry.attribute_model_version)))
    engine.dispose()
    assert versions == {version}


def test_an_entry_changed_by_another_writer_meanwhile_is_left_alone(
    bundles, other_reid_bundle, database_url, tmp_path, people
):
    """The version check of the write: what was deleted or re-enrolled after the read is not touched."""
    old = make_settings(bundles, tmp_path / "data", database_url=database_url)
    entries = enroll_old(old, people[:3])
    models = Models.load(bundles.attributes, other_reid_bundle)
    gallery = Gallery.open(old.database, models)
    try:
        versions = {
            "model_version": models.reid.version,
            "attribute_model_version": models.attributes.version,
        }
        with gallery.sessions() as session:
            rows = store.outdated_rows(session, after_id=0, limit=10, **versions)
        assert [r.id for r in rows] == [e["id"] for e in entries]
        # Meanwhile: one entry deleted, one re-enrolled with the new bundle (status refreshed).
        gallery.delete(entries[0]["id"])
        with TestClient(create_app(old.model_copy(update={"reid_bundle": other_reid_bundle}))) as client:
            (refreshed,) = client.post("/gallery", files=files(crop(people[1]))).json()["entries"]
            assert refreshed["status"] == "refreshed"
        images = [models.reid.embed([decode_image(r.data)])[0] for r in rows]
        items = [
            store.Reembedded(seen=r, embedding=v, attributes=None) for r, v in zip(rows, images, strict=True)
        ]
        assert gallery.write_reembedded(items) == 1  # only the untouched third entry
    finally:
        gallery.close()
    counts = table_counts(old.database)
    assert counts["gallery_entries"] == counts["gallery_embeddings"] == 2  # nothing resurrected
    assert counts["versions"] == {models.reid.version: 2}


def reembed_command(env: dict[str, str], *args: str) -> subprocess.Popen:
    script = Path(sys.executable).with_name("reid-serve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "app.main"]
    return subprocess.Popen(
        [*command, "reembed", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_the_command_is_resumable_and_a_running_service_picks_its_rows_up(
    bundles, other_reid_bundle, database_url, tmp_path, people
):
    """kill -9 half-way, run again: every entry searchable, none lost, none duplicated; the service that
    runs on the same database all along finds them without a restart."""
    old = make_settings(bundles, tmp_path / "data", database_url=database_url)
    entries = enroll_old(old, people[:20], without_image=1)
    # More entries than people: other cameras and seeds of the same people (distinct bytes).
    with TestClient(create_app(old)) as client:
        for seed in range(1, 4):
            entries += [enroll(client, crop(p, 2, seed=seed), identity=f"p{p.pid}")[0] for p in people[:20]]
    total = len(entries)
    new = old.model_copy(update={"reid_bundle": other_reid_bundle, "index_sync_seconds": 0.2})
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env |= {
        "REID_ATTRIBUTE_BUNDLE": str(bundles.attributes),
        "REID_REID_BUNDLE": str(other_reid_bundle),
        "REID_DATABASE_URL": new.database,
        "REID_INTRA_OP_THREADS": "1",
    }
    with TestClient(create_app(new)) as client:
        version = client.get("/models").json()["reid"]["version"]
        assert client.get("/gallery/stats").json()["index_size"] == 0

        engine = create_engine(new.database)
        count = select(func.count()).where(store.Entry.model_version == version)

        def written() -> int:
            with engine.connect() as conn:
                return conn.scalar(count)

        process = reembed_command(env, "--batch-size", "2")
        try:
            wait_for(lambda: written() > 0 or process.poll() is not None, 120, "a first batch", every=0.002)
            process.send_signal(signal.SIGSTOP)
            half = written()
            assert 0 < half < total - 1, f"{half} of {total}: the run was not stopped half-way"
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.communicate()
        assert process.returncode == -signal.SIGKILL
        assert written() == half  # what was committed stays; nothing half-written
        wait_for(lambda: client.get("/gallery/stats").json()["index_size"] == half, 30, "the service")

        process = reembed_command(env, "--batch-size", "8", "--threads", "1")
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert f"{total - 1 - half} of {total - half} outdated entries written" in out
        assert "1 without a stored crop" in out and "enroll their crops again" in out
        assert "reembed [" in err  # the progress bar

        wait_for(
            lambda: client.get("/gallery/stats").json()["index_size"] == total - 1,
            30,
            "the service to catch up",
        )
        engine.dispose()
        for entry, person in zip(entries[:19], people, strict=False):
            assert query(client, crop(person), top_k=1)[0]["entry_id"] == entry["id"]
    counts = table_counts(new.database)
    assert counts["gallery_entries"] == counts["gallery_embeddings"] == total
    assert counts["gallery_entry_attributes"] == total * GROUPS
    assert counts["versions"] == {version: total - 1, entries[19]["model_version"]: 1}


def test_a_stopped_run_ends_between_batches_and_the_next_one_goes_on(
    bundles, other_reid_bundle, database_url, tmp_path, people
):
    old = make_settings(bundles, tmp_path / "data", database_url=database_url)
    enroll_old(old, people[:6])
    gallery = Gallery.open(old.database, Models.load(bundles.attributes, other_reid_bundle))
    try:
        stop = threading.Event()
        stop.set()  # as SIGINT does to the command: the batch in flight is finished, then it stops
        first = reembed(gallery, batch_size=2, max_pixels=old.max_pixels, stop=stop)
        assert (first.state, first.total, first.reembedded) == ("stopped", 6, 2)
        assert first.finished_at is not None and first.error is None
        second = reembed(gallery, batch_size=2, max_pixels=old.max_pixels)
        assert (second.state, second.total, second.reembedded) == ("done", 4, 4)
        assert len(gallery.index) == 6
    finally:
        gallery.close()
