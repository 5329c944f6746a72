"""REID_DATABASE_PASSWORD_FILE: the database password read from a file (how docker-compose passes its
generated one), used only when REID_DATABASE_URL carries no password."""

from __future__ import annotations

import os

import pytest
from sqlalchemy.engine import make_url

from app.main import preflight, serve
from app.settings import Settings
from tests.service.helpers import Bundles, postgres_url


@pytest.fixture(autouse=True)
def no_reid_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("REID_"):
            monkeypatch.delenv(name)


def test_password_comes_from_the_file_when_the_url_has_none(monkeypatch, tmp_path):
    secret = tmp_path / "postgres-password"
    secret.write_text("p@ss:w/rd#1\n")  # URL-special characters; the trailing newline is not part of it
    monkeypatch.setenv("REID_DATABASE_URL", "postgresql+psycopg://reid@db:5432/reid")
    monkeypatch.setenv("REID_DATABASE_PASSWORD_FILE", str(secret))
    url = make_url(Settings().database)
    assert (url.username, url.password, url.host, url.database) == ("reid", "p@ss:w/rd#1", "db", "reid")


def test_a_password_in_the_url_wins(monkeypatch, tmp_path):
    secret = tmp_path / "postgres-password"
    secret.write_text("from-file")
    monkeypatch.setenv("REID_DATABASE_URL", "postgresql+psycopg://reid:from-env@db/reid")
    monkeypatch.setenv("REID_DATABASE_PASSWORD_FILE", str(secret))
    assert make_url(Settings().database).password == "from-env"


def test_empty_setting_or_sqlite_ignore_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("REID_DATABASE_URL", "postgresql+psycopg://reid@db/reid")
    monkeypatch.setenv("REID_DATABASE_PASSWORD_FILE", "")
    assert Settings().database == "postgresql+psycopg://reid@db/reid"
    monkeypatch.delenv("REID_DATABASE_URL")
    monkeypatch.setenv("REID_DATABASE_PASSWORD_FILE", str(tmp_path / "absent"))
    assert Settings().database.startswith("sqlite:///")


@pytest.mark.parametrize("content", [None, "\n"])
def test_missing_or_empty_file_fails_fast_with_one_line(monkeypatch, tmp_path, content):
    secret = tmp_path / "postgres-password"
    if content is not None:
        secret.write_text(content)
    monkeypatch.setenv("REID_DATABASE_URL", "postgresql+psycopg://reid@db/reid")
    monkeypatch.setenv("REID_DATABASE_PASSWORD_FILE", str(secret))
    with pytest.raises(SystemExit) as exc:
        serve([])
    message = str(exc.value.code)
    assert message.startswith("reid-serve: invalid settings:") and "REID_DATABASE_PASSWORD_FILE" in message
    assert "\n" not in message


@pytest.mark.postgres
def test_connects_with_the_password_from_the_file(monkeypatch, tmp_path, bundles: Bundles):
    url = make_url(postgres_url())
    assert url.password, "the test server's URL has a password"
    secret = tmp_path / "postgres-password"
    secret.write_text(f"{url.password}\n")
    without = url._replace(password=None).render_as_string(hide_password=False)  # set() ignores None
    assert make_url(without).password is None
    monkeypatch.setenv("REID_ATTRIBUTE_BUNDLE", str(bundles.attributes))
    monkeypatch.setenv("REID_REID_BUNDLE", str(bundles.reid))
    monkeypatch.setenv("REID_DATABASE_URL", without)
    monkeypatch.setenv("REID_DATABASE_PASSWORD_FILE", str(secret))
    assert preflight(Settings()) is None
    secret.write_text("wrong\n")
    problem = preflight(Settings())
    assert problem is not None and problem.startswith("cannot open the database") and "wrong" not in problem
