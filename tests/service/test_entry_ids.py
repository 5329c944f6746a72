"""Entry ids are never handed out twice, also after the highest one is deleted (SQLite without
AUTOINCREMENT would reuse it), on both databases; a version-2 SQLite gallery (no AUTOINCREMENT) upgrades
to version 3 with every entry, embedding, attribute and crop kept."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, inspect, select, text

from app.gallery import store
from app.main import create_app
from tests.service.helpers import crop, enroll, make_settings, query, sqlite_url


def test_ids_are_never_reused(settings, people):
    with TestClient(create_app(settings)) as client:
        ids = [enroll(client, crop(p))[0]["id"] for p in people[:3]]
        assert client.delete(f"/gallery/{ids[-1]}").status_code == 200
        (new,) = enroll(client, crop(people[3]))
        assert new["id"] > ids[-1]
        assert client.delete(f"/gallery/{new['id']}").status_code == 200
    with TestClient(create_app(settings)) as client:  # after a restart too
        (after,) = enroll(client, crop(people[4]))
        assert after["id"] > new["id"]
        # The entry that had this id before is gone for good, not replaced.
        assert client.get(f"/gallery/{new['id']}").status_code == 404


def as_version_2(url: str) -> None:
    """Turn a current SQLite gallery into what version 2 left: gallery_entries without AUTOINCREMENT, and
    no change log (version 4's)."""
    engine = create_engine(url)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql("DROP TABLE gallery_changes")
        ddl = conn.scalar(text("SELECT sql FROM sqlite_master WHERE name = 'gallery_entries'"))
        assert "AUTOINCREMENT" in ddl
        old = ddl.replace("gallery_entries", "gallery_entries_v2", 1).replace(" AUTOINCREMENT", "")
        conn.exec_driver_sql(old)
        conn.exec_driver_sql("INSERT INTO gallery_entries_v2 SELECT * FROM gallery_entries")
        conn.exec_driver_sql("DROP TABLE gallery_entries")
        conn.exec_driver_sql("ALTER TABLE gallery_entries_v2 RENAME TO gallery_entries")
        for index in store.Entry.__table__.indexes:
            index.create(conn)
        conn.execute(text("UPDATE reid_schema SET version = 2"))
        conn.commit()
    engine.dispose()


def rows_per_table(url: str) -> dict[str, int]:
    engine = create_engine(url)
    with engine.connect() as conn:
        present = set(inspect(conn).get_table_names())
        found = {
            t.name: conn.scalar(select(func.count()).select_from(t))
            for t in store.Base.metadata.sorted_tables
            if t.name in present
        }
    engine.dispose()
    return found


def test_a_version_2_sqlite_gallery_upgrades_and_keeps_everything(bundles, tmp_path, people):
    url = sqlite_url(tmp_path)
    settings = make_settings(bundles, tmp_path / "data", database_url=url)
    with TestClient(create_app(settings)) as client:
        old = [enroll(client, crop(p), identity=f"p{p.pid}")[0] for p in people[:3]]
    as_version_2(url)
    before = rows_per_table(url)
    assert before["gallery_entries"] == before["gallery_embeddings"] == before["gallery_images"] == 3

    with TestClient(create_app(settings)) as client:
        engine = create_engine(url)
        with engine.connect() as conn:
            assert conn.scalar(select(func.max(store.SchemaVersion.version))) == store.SCHEMA_VERSION == 4
            ddl = conn.scalar(text("SELECT sql FROM sqlite_master WHERE name = 'gallery_entries'"))
            indexes = {i["name"] for i in inspect(conn).get_indexes("gallery_entries")}
        engine.dispose()
        with client.app.state.gallery.engine.connect() as conn:  # the connection that migrated, pooled
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on for the service
        assert "AUTOINCREMENT" in ddl
        assert indexes == {i.name for i in store.Entry.__table__.indexes}
        after = rows_per_table(url)
        assert after.pop(store.Change.__tablename__) == 0  # the change log starts empty
        assert after == before  # nothing cascaded away with the old table
        for entry, person in zip(old, people, strict=False):
            assert query(client, crop(person), top_k=1)[0]["entry_id"] == entry["id"]
            assert client.get(entry["image_url"]).content == crop(person)
        assert client.delete(f"/gallery/{old[-1]['id']}").status_code == 200
        assert rows_per_table(url)["gallery_embeddings"] == 2
        (new,) = enroll(client, crop(people[5]))
        assert new["id"] > old[-1]["id"]
