"""Fixtures for the service tests: bundles once per session, a fresh app and database per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.service.helpers import (
    Bundles,
    fresh_postgres,
    make_attribute_bundle,
    make_reid_bundle,
    make_settings,
    sqlite_url,
)
from tests.synthetic import SyntheticIdentity, make_identities


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Bundles:
    root = tmp_path_factory.mktemp("bundles")
    return Bundles(make_attribute_bundle(root / "attributes"), make_reid_bundle(root / "reid"))


@pytest.fixture(scope="session")
def other_reid_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second re-ID bundle (other weights, so another version)."""
    return make_reid_bundle(tmp_path_factory.mktemp("bundles-other") / "reid", seed=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each gallery test runs on SQLite, and on PostgreSQL when REID_TEST_POSTGRES_URL is set."""
    return sqlite_url(tmp_path) if request.param == "sqlite" else fresh_postgres()


@pytest.fixture
def settings(bundles: Bundles, database_url: str, tmp_path: Path) -> Settings:
    return make_settings(bundles, tmp_path / "data", database_url=database_url)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def people() -> list[SyntheticIdentity]:
    return make_identities(24, seed=3)
