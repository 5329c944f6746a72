"""The database failing under the service: away (PostgreSQL behind a TCP proxy that the test cuts and
restores) gives 503 with Retry-After in bounded time, /readyz not ready, and recovery by itself with
every acknowledged entry kept; full (SQLite at its page limit, the same SQLITE_FULL a full disk gives)
gives 507 with a sentence and writes nothing. The scripted versions against a real server (PostgreSQL
stopped, a full filesystem) are benchmarks/faults.py's."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select
from sqlalchemy import exc as db_errors
from sqlalchemy.engine import make_url

from app.api.problems import database_problem
from app.gallery import store
from app.main import create_app
from tests.service.helpers import crop, enroll, files, fresh_postgres, make_settings, sqlite_url


class Proxy:
    """A TCP proxy to ``upstream`` on a local port; ``cut()`` closes every connection and refuses new
    ones (what a stopped server looks like to its clients), ``restore()`` listens again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        assert self._listener is not None
        with contextlib.suppress(OSError):  # wakes the accept (a close alone would leave it listening)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()


def behind_a_proxy(bundles, tmp_path):
    """A fresh PostgreSQL database reached through a :class:`Proxy`, and service settings that use it."""
    url = make_url(fresh_postgres())
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    return proxy, make_settings(bundles, tmp_path / "data", database_url=through, index_sync_seconds=0)


def timed(call):
    start = time.perf_counter()
    response = call()
    return response, time.perf_counter() - start


def assert_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    assert response.headers["content-type"] == "application/problem+json"
    assert "database" in response.json()["detail"]


@pytest.mark.postgres
def test_database_away_is_503_with_retry_after_and_the_service_recovers(bundles, tmp_path, people):
    proxy, settings = behind_a_proxy(bundles, tmp_path)
    try:
        with TestClient(create_app(settings)) as client:
            kept = [enroll(client, crop(p), identity=f"p{p.pid}")[0]["id"] for p in people[:3]]
            proxy.cut()
            calls = {
                "enroll": lambda: client.post("/gallery", files=files(crop(people[5]))),
                "query": lambda: client.post("/reid/query", files=files(crop(people[0]), field="image")),
                "list": lambda: client.get("/gallery"),
                "get": lambda: client.get(f"/gallery/{kept[0]}"),
                "delete": lambda: client.delete(f"/gallery/{kept[0]}"),
                "stats": lambda: client.get("/gallery/stats"),
                "readyz": lambda: client.get("/readyz"),
            }
            for name, call in calls.items():
                response, seconds = timed(call)
                assert_unavailable(response)
                assert seconds < 4, (name, seconds)  # refused at once, not a hang
            assert client.get("/healthz").status_code == 200  # the process itself is fine
            assert "the gallery's database does not answer" in client.get("/readyz").json()["detail"]

            proxy.restore()
            # Recovers by itself: the pool's pre-ping replaces the dropped connections.
            assert client.get("/readyz").status_code == 200
            listed = client.get("/gallery").json()
            assert [
                e["id"] for e in listed["items"]
            ] == kept  # nothing acknowledged lost, the delete not done
            (new,) = enroll(client, crop(people[5]), expect=201)
            assert client.get("/gallery/stats").json()["index_size"] == 4
            assert client.delete(f"/gallery/{new['id']}").status_code == 200
    finally:
        proxy.cut()


def table_counts(url: str) -> dict[str, int]:
    engine = store.open_engine(url)
    with engine.connect() as conn:
        counted = {
            t.name: conn.scalar(select(func.count()).select_from(t))
            for t in store.Base.metadata.sorted_tables
        }
    engine.dispose()
    return counted


def test_full_sqlite_database_is_507_and_nothing_half_written(bundles, tmp_path, people):
    url = sqlite_url(tmp_path)
    settings = make_settings(bundles, tmp_path / "data", database_url=url, index_sync_seconds=0)
    with TestClient(create_app(settings)) as client:
        enroll(client, *(crop(p) for p in people[:2]))
        engine = client.app.state.gallery.engine
        with engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

        def full(dbapi_connection, _record):  # the file may not grow: SQLITE_FULL, as on a full disk
            dbapi_connection.execute(f"PRAGMA max_page_count={pages}")

        event.listen(engine, "connect", full)
        engine.dispose()  # every connection from now on is limited
        before = table_counts(url)
        response = client.post("/gallery", files=files(*(crop(p, seed=1) for p in people[2:6])))
        assert response.status_code == 507, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"].startswith("the gallery's storage is full, so nothing was stored")
        assert table_counts(url) == before  # no entry without its embedding, attributes or crop
        assert client.get("/gallery/stats").json()["index_size"] == 2
        assert client.get("/readyz").status_code == 200  # readable: still ready for searches

        event.remove(engine, "connect", full)
        engine.dispose()
        enroll(client, *(crop(p, seed=1) for p in people[2:6]), expect=201)
        assert client.get("/gallery/stats").json()["index_size"] == 6


@pytest.mark.postgres
def test_database_lost_after_the_work_still_answers(bundles, tmp_path, people):
    """The connection dies after the request's last query, before its session is closed: the rollback
    that returns the connection fails, and the answer already made is sent (not a dropped connection)."""
    proxy, settings = behind_a_proxy(bundles, tmp_path)
    try:
        with TestClient(create_app(settings)) as client:
            (entry,) = enroll(client, crop(people[0]))
            engine = client.app.state.gallery.engine

            def cut_after_the_last_read(conn, cursor, statement, *_):
                if "gallery_images" in statement:  # GET /gallery's last query: which entries have a crop
                    proxy.cut()

            event.listen(engine, "after_cursor_execute", cut_after_the_last_read)
            response = client.get("/gallery")
            event.remove(engine, "after_cursor_execute", cut_after_the_last_read)
            assert response.status_code == 200, response.text
            assert [e["id"] for e in response.json()["items"]] == [entry["id"]]
            assert_unavailable(client.get("/gallery"))
            proxy.restore()
            assert client.get("/gallery").status_code == 200
    finally:
        proxy.cut()


class _PgError(Exception):
    """What psycopg raises: the SQLSTATE on the exception."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def _sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    return error


@pytest.mark.parametrize(
    ("error", "status"),
    [
        # PostgreSQL out of disk (SQLSTATE 53100 disk_full): nothing was stored, say so
        (db_errors.OperationalError("INSERT", {}, _PgError("53100")), 507),
        # every pooled connection busy past the pool timeout
        (db_errors.TimeoutError("QueuePool limit of size 10 overflow 20 reached"), 503),
        (db_errors.OperationalError("SELECT 1", {}, _PgError("57P01")), 503),  # admin shutdown
        (db_errors.OperationalError("INSERT", {}, _sqlite_error("database is locked", 5)), 503),  # BUSY
        (db_errors.OperationalError("INSERT", {}, _sqlite_error("disk I/O error", 778)), 503),  # IOERR_WRITE
        # a bug, not the database being away: the 500 handler and a traceback
        (db_errors.OperationalError("SELECT", {}, _sqlite_error("no such table: nope", 1)), None),
        (db_errors.ProgrammingError("SELECT nope", {}, _PgError("42703")), None),
        (db_errors.IntegrityError("INSERT", {}, _PgError("23505")), None),
    ],
)
def test_database_errors_map_to_what_the_client_can_do(error, status):
    found = database_problem(error)
    assert (found[0] if found else None) == status
    if status == 503:
        assert "try again" in found[1]
