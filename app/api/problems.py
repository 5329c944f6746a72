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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from app.api.bodies import Problem

MEDIA_TYPE = "application/problem+json"
REF_PREFIX = "#/components/schemas/"

DESCRIPTIONS = {
    400: "The body is not valid multipart form data.",
    401: "Missing or invalid X-API-Key.",
    404: "No entry with this id.",
    413: "The request body, an image (bytes or pixels) or the number of images is over its limit.",
    415: "A file is not a readable image.",
    422: "Missing or malformed parameters or fields.",
    503: "The service is still starting: models not loaded or the gallery not open.",
}


def problem_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for these error statuses, each a ``Problem``; ``s404="..."`` replaces a description."""
    return {
        status: {
            "description": descriptions.get(f"s{status}", DESCRIPTIONS.get(status, "")),
            "content": {MEDIA_TYPE: {"schema": {"$ref": f"{REF_PREFIX}Problem"}}},
        }
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
    app.add_exception_handler(Exception, _server_error)
    app.openapi = _openapi(app, finish)  # type: ignore[method-assign]
