"""A gallery made by the previous schema (version 1: no stored crops) upgrades in place at start-up and
keeps every entry (the guards against unusable schemas are test_schema_guards.py's). On SQLite and
PostgreSQL."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, inspect, select, text

from app.gallery import store
from app.main import create_app
from tests.service.helpers import crop, enroll, files, make_settings, query


def as_version_1(url: str) -> None:
    """Turn a current database into what version 1 left: the schema then was today's without the
    gallery_images table and with an index on model_version alone (the changes of version 2), without
    the change log (version 4), with version 1 recorded."""
    engine = create_engine(url)
    with engine.begin() as conn:
        store.StoredImage.__table__.drop(conn)
        store.Change.__table__.drop(conn)
        conn.execute(text("DROP INDEX ix_gallery_entries_version_collection"))
        conn.execute(text("CREATE INDEX ix_gallery_entries_model_version ON gallery_entries (model_version)"))
        conn.execute(text("UPDATE reid_schema SET version = 1"))
    engine.dispose()


def schema_state(url: str) -> tuple[int, set[str], set[str]]:
    """(version, tables, indexes of gallery_entries)."""
    engine = create_engine(url)
    with engine.connect() as conn:
        version = conn.scalar(select(func.max(store.SchemaVersion.version)))
        tables = set(inspect(conn).get_table_names())
        # (PostgreSQL lists the unique constraint's own index too: not one of ours.)
        found = inspect(conn).get_indexes("gallery_entries")
        indexes = {i["name"] for i in found if not i.get("duplicates_constraint")}
    engine.dispose()
    return version, tables, indexes


def test_a_version_1_gallery_upgrades_and_keeps_its_entries(bundles, database_url, tmp_path, people):
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url, store_images=False)
    with TestClient(create_app(settings)) as client:
        old = [enroll(client, crop(p), identity=f"p{p.pid}")[0] for p in people[:3]]
    current = {i.name for i in store.Entry.__table__.indexes}
    as_version_1(settings.database)
    version, tables, indexes = schema_state(settings.database)
    assert (version, tables) == (1, store.Base.metadata.tables.keys() - {"gallery_images", "gallery_changes"})
    assert indexes == current - {"ix_gallery_entries_version_collection"} | {
        "ix_gallery_entries_model_version"
    }

    settings = settings.model_copy(update={"store_images": True})
    with TestClient(create_app(settings)) as client:
        assert schema_state(settings.database) == (
            store.SCHEMA_VERSION,
            set(store.Base.metadata.tables),
            current,
        )
        assert store.SCHEMA_VERSION == 4
        stats = client.get("/gallery/stats").json()
        assert stats["entries"] == stats["searchable"] == stats["index_size"] == 3
        assert stats["stored_images"] == 0
        for entry, person in zip(old, people, strict=False):
            assert query(client, crop(person), top_k=1)[0]["entry_id"] == entry["id"]
            assert client.get(f"/gallery/{entry['id']}").json()["image_url"] is None
        # Enrolling the same bytes again keeps the entry and now stores its crop.
        (again,) = client.post("/gallery", files=files(crop(people[0]))).json()["entries"]
        assert again["id"] == old[0]["id"] and again["status"] == "existing"
        assert client.get(again["image_url"]).content == crop(people[0])
    # A second start finds nothing to migrate.
    with TestClient(create_app(settings)) as client:
        assert client.get("/gallery/stats").json()["stored_images"] == 1
