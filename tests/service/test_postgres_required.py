"""The PostgreSQL variants skip without a server, except where REID_REQUIRE_POSTGRES=1 (CI) fails them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service import helpers


def test_without_a_url_the_postgres_tests_skip(monkeypatch):
    monkeypatch.setattr(helpers, "POSTGRES_URL", None)
    monkeypatch.setattr(helpers, "REQUIRE_POSTGRES", False)
    with pytest.raises(pytest.skip.Exception, match="REID_TEST_POSTGRES_URL is not set"):
        helpers.postgres_url()


def test_ci_fails_them_instead(monkeypatch):
    monkeypatch.setattr(helpers, "POSTGRES_URL", None)
    monkeypatch.setattr(helpers, "REQUIRE_POSTGRES", True)
    with pytest.raises(pytest.fail.Exception, match="REID_REQUIRE_POSTGRES=1"):
        helpers.postgres_url()
    with pytest.raises(pytest.fail.Exception):
        helpers.fresh_postgres()


def test_with_a_url_it_is_used(monkeypatch):
    monkeypatch.setattr(helpers, "POSTGRES_URL", "postgresql+psycopg://u:p@127.0.0.1:1/db")
    monkeypatch.setattr(helpers, "REQUIRE_POSTGRES", True)
    assert helpers.postgres_url() == "postgresql+psycopg://u:p@127.0.0.1:1/db"


def test_ci_requires_them():
    """.ci/run sets the variable for the README's test command."""
    script = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    lines = [line.strip() for line in script.splitlines()]
    assert "export REID_REQUIRE_POSTGRES=1" in lines
    assert lines.index("export REID_REQUIRE_POSTGRES=1") < lines.index(".venv/bin/python -m pytest -q")
