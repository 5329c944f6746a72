"""The gallery database's schema-version guards: a database this build cannot use is refused before
anything is written to it, at start-up in one line; on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import Engine, inspect, select

from app.gallery import store
from app.main import create_app, preflight, serve
from tests.service.helpers import make_settings
from tests.service.test_serve_startup import clear_reid_env


@pytest.fixture
def engine(database_url: str):
    engine = store.open_engine(database_url)
    yield engine
    engine.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def versions(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(select(store.SchemaVersion.version)))


def tables_without_a_version(engine: Engine) -> None:
    """Gallery tables made by something other than this code (or a build before versions were kept)."""
    store.Entry.__table__.create(engine)


def an_empty_version_table(engine: Engine) -> None:
    store.Base.metadata.create_all(engine)  # every table, but the version row was never written


def a_newer_schema(engine: Engine) -> None:
    store.prepare_schema(engine)
    with engine.begin() as conn:
        conn.execute(store.SchemaVersion.__table__.update().values(version=NEWER))


NEWER = store.SCHEMA_VERSION + 1
CASES = [
    pytest.param(tables_without_a_version, "gallery tables exist without a schema version", id="unversioned"),
    pytest.param(an_empty_version_table, "reid_schema holds no version", id="empty-version-table"),
    pytest.param(
        a_newer_schema,
        f"database schema is version {NEWER}; this build knows up to {store.SCHEMA_VERSION}",
        id="newer",
    ),
]


def test_a_new_database_gets_the_current_schema(engine):
    with engine.connect() as conn:
        assert store.stored_schema_version(conn) is None
    assert store.prepare_schema(engine) == store.SCHEMA_VERSION
    assert versions(engine) == [store.SCHEMA_VERSION]
    assert tables(engine) == set(store.Base.metadata.tables)
    assert store.prepare_schema(engine) == store.SCHEMA_VERSION  # again: nothing to do
    assert versions(engine) == [store.SCHEMA_VERSION]


@pytest.mark.parametrize(("make", "reason"), CASES)
def test_a_database_this_build_cannot_use_is_refused_untouched(engine, make, reason):
    make(engine)
    before = (tables(engine), versions(engine) if "reid_schema" in tables(engine) else None)
    with pytest.raises(store.SchemaError, match=reason):
        store.prepare_schema(engine)
    assert (tables(engine), versions(engine) if "reid_schema" in tables(engine) else None) == before


@pytest.mark.parametrize(("make", "reason"), CASES)
def test_the_service_refuses_it_at_start_up(
    engine, database_url, bundles, tmp_path, monkeypatch, make, reason
):
    make(engine)
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url)
    # The app's lifespan refuses it (whoever runs create_app), before any model or index work on it.
    with pytest.raises(store.SchemaError, match=reason), TestClient(create_app(settings)):
        pass
    # reid-serve's preflight says so in one line, read-only, before loading anything.
    problem = preflight(settings)
    assert problem is not None and reason in problem and "\n" not in problem
    clear_reid_env(monkeypatch)
    monkeypatch.setenv("REID_ATTRIBUTE_BUNDLE", str(bundles.attributes))
    monkeypatch.setenv("REID_REID_BUNDLE", str(bundles.reid))
    monkeypatch.setenv("REID_DATABASE_URL", database_url)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("reid-serve started its server"))
    with pytest.raises(SystemExit) as exc:
        serve([])
    assert str(exc.value.code).startswith("reid-serve: the database ") and reason in str(exc.value.code)


def test_the_preflight_only_reads(engine, database_url, bundles, tmp_path):
    """Creating and migrating the schema is the start's job: the preflight leaves a new database empty
    and passes it, and the current schema."""
    settings = make_settings(bundles, tmp_path / "data", database_url=database_url)
    assert preflight(settings) is None
    assert tables(engine) == set()
    store.prepare_schema(engine)
    assert preflight(settings) is None
