"""Multipart form fields whose documented schema says what the wire can carry.

A multipart field is present (as text or a file) or absent; it cannot be ``null``. pydantic documents an
optional ``str | None`` field as ``anyOf: [string, null]``, and a client that sends the literal ``null``
for it is refused (it is not a time, a number, or a JSON object). These fields are documented as their
non-null type: leave them out to leave them unset.
"""

from __future__ import annotations

from typing import Any

from fastapi import File, Form


def _without_null(schema: dict[str, Any]) -> None:
    branches = schema.pop("anyOf", None)
    if branches is None:
        return
    kept = [b for b in branches if b.get("type") != "null"]
    if len(kept) == 1:
        schema.update(kept[0])
    else:
        schema["anyOf"] = kept
    if schema.get("default", "") is None:
        del schema["default"]


def _non_empty_files(schema: dict[str, Any]) -> None:
    # No file, or an empty one, is refused (422): an empty list sends no part at all, so the field is
    # missing. Say so, so that no client takes either for a valid request.
    schema["minItems"] = 1
    schema.setdefault("items", {})["minLength"] = 1


def _json_object(schema: dict[str, Any]) -> None:
    # The text is parsed as JSON and must be an object. A multipart part documented as an object is
    # sent as JSON (OpenAPI's default content type for object properties), which is what is parsed.
    schema.pop("anyOf", None)
    schema.pop("default", None)
    schema["type"] = "object"


def JsonObjectForm(**kwargs: Any) -> Any:
    """``Form(...)`` for an optional field holding a JSON object, documented as an object."""
    return Form(json_schema_extra=_json_object, **kwargs)


def OptionalForm(**kwargs: Any) -> Any:
    """``Form(...)`` for an optional field, documented without ``null``."""
    return Form(json_schema_extra=_without_null, **kwargs)


def Files(**kwargs: Any) -> Any:
    """``File(...)`` for repeated uploads: at least one file, each of at least one byte."""
    return File(json_schema_extra=_non_empty_files, **kwargs)
