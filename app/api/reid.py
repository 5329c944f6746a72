"""POST /reid/query: the gallery entries most similar to one crop."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, HTTPException, Request, Response, UploadFile
from pydantic_core import to_json

from app.api.bodies import QueryResponse
from app.api.forms import Files, OptionalForm
from app.api.problems import problem_responses
from app.api.uploads import decode_images, offload, read_images
from app.deps import NO_NUL, GalleryDep, ModelsDep, SettingsDep
from app.gallery.store import SearchFilters
from app.inference import AttributeModel

router = APIRouter(prefix="/reid", tags=["reid"])

ERRORS = problem_responses(
    400,
    413,
    415,
    422,
    503,
    s422="Missing or malformed fields, top_k over the limit, unknown attribute filter.",
)


def _cameras(schema: dict[str, Any]) -> None:
    # Each value is checked as a camera id is stored (at most 128 characters, no NUL): say so per item.
    schema["items"] = {"type": "string", "maxLength": 128, "pattern": NO_NUL}


def document_top_k_limit(document: dict[str, Any], max_top_k: int) -> None:
    """Write the deployment's REID_MAX_TOP_K into the document as top_k's maximum (a setting, so the
    route's own declaration cannot hold it)."""
    schemas = document["components"]["schemas"]
    schemas["Body_query_reid_query_post"]["properties"]["top_k"]["maximum"] = max_top_k


def document_attribute_filters(document: dict[str, Any], model: AttributeModel | None) -> None:
    """List the loaded attribute bundle's ``group=class`` values as ``attribute``'s enum (an empty value
    is ignored, as a blank form field); without a loaded bundle the document leaves them open."""
    if model is None:
        return
    values = [""] + [f"{group}={value}" for group, classes in model.groups.items() for value in classes]
    schemas = document["components"]["schemas"]
    schemas["Body_query_reid_query_post"]["properties"]["attribute"]["items"]["enum"] = values


def parse_attribute_filters(values: list[str], model: AttributeModel) -> dict[str, tuple[str, ...]]:
    """'group=class' strings -> {group: classes}; several classes of one group mean any of them."""
    wanted: dict[str, list[str]] = {}
    for text in values:
        group, sep, value = text.partition("=")
        group, value = group.strip(), value.strip()
        if not sep or not group or not value:
            raise HTTPException(422, f"attribute filter {text[:80]!r} is not of the form group=class")
        if group not in model.groups:
            known = ", ".join(model.groups)
            raise HTTPException(422, f"unknown attribute group {group[:64]!r}; groups: {known}")
        if value not in model.groups[group]:
            known = ", ".join(model.groups[group])
            raise HTTPException(422, f"unknown class {value[:64]!r} for {group}; classes: {known}")
        wanted.setdefault(group, []).append(value)
    return {g: tuple(dict.fromkeys(v)) for g, v in wanted.items()}


@router.post("/query", response_model=QueryResponse, responses=ERRORS)
async def query(
    request: Request,
    gallery: GalleryDep,
    models: ModelsDep,
    settings: SettingsDep,
    image: Annotated[
        list[UploadFile],
        Files(
            description="One person crop, or several crops of one person (a track; repeat the field): "
            "their embeddings are averaged into one query."
        ),
    ],
    top_k: Annotated[
        int, Form(ge=1, description="How many matches to return (at most REID_MAX_TOP_K).")
    ] = 10,
    collection: Annotated[str, Form(min_length=1, max_length=128, pattern=NO_NUL)] = "default",
    camera_id: Annotated[
        list[str],
        Form(description="Only entries from these cameras (repeat the field).", json_schema_extra=_cameras),
    ] = [],  # noqa: B006 - FastAPI copies defaults
    exclude_camera_id: Annotated[
        list[str],
        Form(description="No entries from these cameras (repeat the field).", json_schema_extra=_cameras),
    ] = [],  # noqa: B006
    captured_after: Annotated[
        datetime | None, OptionalForm(description="ISO 8601; entries captured at or after this time.")
    ] = None,
    captured_before: Annotated[
        datetime | None, OptionalForm(description="ISO 8601; entries captured at or before this time.")
    ] = None,
    attribute: Annotated[
        list[str],
        Form(
            description="Attribute filter 'group=class', e.g. upper_colour=red; repeat the field. "
            "Classes of one group are alternatives; different groups must all hold.",
            examples=[["upper_colour=red", "gender=female"]],
        ),
    ] = [],  # noqa: B006
    min_score: Annotated[
        float | None, OptionalForm(ge=-1, le=1, description="Drop matches below this.")
    ] = None,
    query_expansion: Annotated[
        bool,
        Form(
            description="Use the service's query expansion when it is on (REID_QUERY_EXPANSION or the "
            "bundle's validated setting): the query takes in its nearest entries before the ranking."
        ),
    ] = True,
    group_by: Annotated[
        Literal["entry", "identity"],
        Form(description="'identity': at most one match (the best) per identity."),
    ] = "entry",
) -> Response:
    """Rank the collection's searchable entries by cosine similarity to the crop (or track).

    Filters are applied inside the index search, so a narrow filter still returns its best matches.
    """
    if top_k > settings.max_top_k:
        raise HTTPException(422, f"top_k is {top_k}; the limit is {settings.max_top_k}")
    for name, values in (("camera_id", camera_id), ("exclude_camera_id", exclude_camera_id)):
        if any("\x00" in v or len(v) > 128 for v in values):
            raise HTTPException(422, f"{name}: values must be at most 128 characters, without NUL")
    filters = SearchFilters(
        cameras=tuple(c for c in camera_id if c),
        exclude_cameras=tuple(c for c in exclude_camera_id if c),
        captured_after=captured_after,
        captured_before=captured_before,
        attributes=parse_attribute_filters([a for a in attribute if a], models.attributes),
    )
    blobs = await read_images(image, settings, field="image", single=len(image) == 1)

    def run():
        return gallery.search(
            collection=collection,
            images=decode_images(blobs, settings.max_pixels),
            top_k=top_k,
            filters=filters,
            min_score=min_score,
            group_by=group_by,
            expand=query_expansion,
        )

    candidates, matches = await offload(request, run)
    reid = models.reid
    neighbours, threshold = gallery.query_settings(query_expansion)
    body = {
        "model": {
            "name": reid.name,
            "version": reid.version,
            "match_threshold": threshold,
            "query_expansion": neighbours,
            "gallery_side": bool(neighbours) and gallery.gallery_side is not None,
        },
        "candidates": candidates,
        "matches": matches,
    }
    # Serialised once, in pydantic-core, from plain values; the document still declares QueryResponse
    # (a test checks the body against it).
    return Response(to_json(body), media_type="application/json")
