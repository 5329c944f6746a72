"""Errors as RFC 9457 problem details: the responses every operation declares, the handlers that make
them, and the ``Allow`` header of a 405.

Every 4xx and 5xx body is a ``Problem`` sent as ``application/problem+json``. Operations declare the
statuses they can return with ``problem_responses(...)``; FastAPI generates the document from those
declarations, and ``install`` adds the ``Problem`` schema they refer to (FastAPI files a response
``model`` under the route's own media type, ``application/json``, so the content is declared by
reference instead).
"""

from __future__ import annotations

import http
import logging
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic.json_schema import models_json_schema
from sqlalchemy import exc as db_errors
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from app.api.bodies import Problem

log = logging.getLogger("app")

MEDIA_TYPE = "application/problem+json"
REF_PREFIX = "#/components/schemas/"
# Seconds a client is told to wait (Retry-After) on a 503: the service starting, the database away.
RETRY_AFTER_SECONDS = 5

DESCRIPTIONS = {
    400: "The body is not valid multipart form data.",
    401: "Missing or invalid X-API-Key.",
    404: "No entry with this id.",
    413: "The request body, an image (bytes or pixels) or the number of images is over its limit.",
    415: "A file is not a readable image.",
    422: "Missing or malformed parameters or fields.",
    500: "An unexpected error; the service log has the details.",
    503: (
        "The service is starting (models not loaded, gallery not open) or its database is unreachable; "
        "Retry-After says when to try again."
    ),
    507: "The database's storage is full: nothing was stored.",
}
RETRY_AFTER_HEADER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}


def problem_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for these error statuses, each a ``Problem``; ``s404="..."`` replaces a description."""
    return {
        status: {
            "description": descriptions.get(f"s{status}", DESCRIPTIONS.get(status, "")),
            "content": {MEDIA_TYPE: {"schema": {"$ref": f"{REF_PREFIX}Problem"}}},
        }
        | ({"headers": RETRY_AFTER_HEADER} if status == 503 else {})
        for status in statuses
    }


class ProblemResponse(JSONResponse):
    """A JSON response of type ``application/problem+json``."""

    media_type = MEDIA_TYPE


def problem_body(status: int, detail: str, *, instance: str, errors: list[Any] | None = None) -> dict:
    """The body of an error response (``errors`` only for validation errors)."""
    problem = Problem(
        title=http.HTTPStatus(status).phrase, status=status, detail=detail, instance=instance, errors=errors
    )
    return problem.model_dump(mode="json", exclude_none=True)


def problem(
    request: Request,
    status: int,
    detail: str,
    *,
    errors: list[Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProblemResponse:
    """An error response for ``request``."""
    body = problem_body(status, detail, instance=request.url.path, errors=errors)
    if status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} | dict(headers or {})
    return ProblemResponse(body, status_code=status, headers=headers)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of the first route template that matches ``path`` (in routing order), which are the
    methods the document lists for that path."""
    template = None
    methods: set[str] = set()
    for route in iter_route_contexts(app.routes):  # included routers' routes too
        if route.methods is None or route.path is None:  # a mount
            continue
        if template is None and compile_path(route.path)[0].match(path):
            template = route.path
        if template is not None and route.path == template:
            methods |= route.methods
    return sorted(methods)


async def _http_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names the methods of the one route it tried; a path served by several routes (GET
        # and DELETE /gallery/{entry_id}) allows all of theirs.
        headers["Allow"] = ", ".join(allowed_methods(request.app, request.url.path))
    detail = exc.detail if isinstance(exc.detail, str) else http.HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such path: {request.url.path[:200]}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
    return problem(request, exc.status_code, detail, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> ProblemResponse:
    """422 with one readable sentence in ``detail`` and the per-field list in ``errors``."""
    assert isinstance(exc, RequestValidationError)
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {error.get('msg', 'invalid')}")
    errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b[:64].decode("latin-1")})
    for error in errors:
        error.pop("input", None)  # may echo a whole upload
        error.pop("ctx", None)
    return problem(request, 422, "; ".join(parts), errors=errors)


async def _server_error(request: Request, exc: Exception) -> ProblemResponse:
    # Starlette logs the traceback after this answer; the client gets no internals.
    return problem(request, 500, "internal error; the service log has the details")


_SQLITE_UNAVAILABLE = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_READONLY,
}


def _disk_full(error: BaseException | None) -> bool:
    """The database says its storage is full: SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100)."""
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return getattr(error, "sqlstate", None) == "53100" or getattr(error, "pgcode", None) == "53100"


def database_problem(exc: BaseException) -> tuple[int, str] | None:
    """(status, detail) for a database failure that is not the request's fault: 507 when the database's
    storage is full, 503 when the database cannot be reached or does not answer in time (connection
    refused or lost, server shutting down, locked past the busy timeout, no pooled connection free);
    None for anything else, which is a bug (500)."""
    if _disk_full(getattr(exc, "orig", None)):
        return 507, "the gallery's storage is full, so nothing was stored; free space for the database"
    if isinstance(exc, db_errors.TimeoutError | db_errors.DisconnectionError):
        unavailable = True
    elif isinstance(getattr(exc, "orig", None), sqlite3.Error):
        # SQLite raises OperationalError for bugs too (no such table): only these codes mean "not now"
        code = getattr(exc.orig, "sqlite_errorcode", None)
        unavailable = code is None or code & 0xFF in _SQLITE_UNAVAILABLE
    else:
        unavailable = isinstance(exc, db_errors.OperationalError | db_errors.InterfaceError) or bool(
            getattr(exc, "connection_invalidated", False)
        )
    if not unavailable:
        return None
    return 503, (
        f"the gallery's database is unavailable; try again in {RETRY_AFTER_SECONDS} s "
        "(enrolling the same crops again is safe: they are stored once)"
    )


async def _database_error(request: Request, exc: Exception) -> ProblemResponse:
    found = database_problem(exc)
    if found is None:  # a bug, like any other exception: the outermost handler answers 500 and logs it
        raise exc
    status, detail = found
    reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    log.warning("%s %s: %d, database error: %s", request.method, request.url.path, status, reason)
    return problem(request, status, detail)


def _openapi(
    app: FastAPI, finish: Sequence[Callable[[dict[str, Any]], None]]
) -> Callable[[], dict[str, Any]]:
    generate = app.openapi  # FastAPI's, which caches the document in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = generate()
            _, definitions = models_json_schema(
                [(Problem, "serialization")], ref_template=REF_PREFIX + "{model}"
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(definitions.get("$defs", {}))
            for step in finish:
                step(document)
        return app.openapi_schema

    return openapi


def install(app: FastAPI, finish: Sequence[Callable[[dict[str, Any]], None]] = ()) -> None:
    """Answer every error of ``app`` as a problem and put the ``Problem`` schema in its document; each
    of ``finish`` then fills in what depends on the settings."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for error in (db_errors.DBAPIError, db_errors.TimeoutError, db_errors.DisconnectionError):
        app.add_exception_handler(error, _database_error)
    app.add_exception_handler(Exception, _server_error)
    app.openapi = _openapi(app, finish)  # type: ignore[method-assign]
