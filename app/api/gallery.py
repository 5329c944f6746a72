"""The gallery: enroll crops, read, list, delete, erase a person, statistics."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request, Response, UploadFile, status

from app.api.bodies import (
    Deleted,
    EnrollResponse,
    EntryPage,
    GalleryEntry,
    GalleryStats,
    ReembedStatus,
)
from app.api.forms import Files, JsonObjectForm, OptionalForm
from app.api.problems import problem_responses
from app.api.uploads import decode_crops, offload, read_images
from app.deps import NO_NUL, EntryDep, EntryId, GalleryDep, ReembedJobDep, SessionDep, SettingsDep
from app.gallery import store
from app.gallery.gallery import EntryFields

router = APIRouter(prefix="/gallery", tags=["gallery"])

COLLECTION = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MAX_METADATA_CHARS = 16_384
BY_ID = problem_responses(404, 422, 503)
UPLOAD_ERRORS = problem_responses(
    400, 413, 415, 422, 503, 507, s422="Missing or malformed fields (e.g. metadata not a JSON object)."
)
# A delete writes too (SQLite's write-ahead log, PostgreSQL's), so a full disk refuses it.
DELETE_ERRORS = problem_responses(404, 422, 503, 507)


def _blank_to_none(value: str | None) -> str | None:
    return value if value else None


def parse_metadata(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    if len(text) > MAX_METADATA_CHARS:
        raise HTTPException(422, f"metadata is longer than {MAX_METADATA_CHARS} characters")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"metadata is not valid JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(value, dict):
        raise HTTPException(422, f"metadata must be a JSON object, not {type(value).__name__}")
    return value


@router.post(
    "",
    response_model=EnrollResponse,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": EnrollResponse, "description": "Every image was already enrolled."}}
    | UPLOAD_ERRORS,
)
async def enroll(
    request: Request,
    response: Response,
    gallery: GalleryDep,
    settings: SettingsDep,
    images: Annotated[
        list[UploadFile], Files(description="One or more crops of one person (repeat the field).")
    ],
    identity: Annotated[
        str | None,
        OptionalForm(
            max_length=256, pattern=NO_NUL, description="Who this is, if known.", examples=["person-0007"]
        ),
    ] = None,
    camera_id: Annotated[str | None, OptionalForm(max_length=128, pattern=NO_NUL, examples=["cam-3"])] = None,
    captured_at: Annotated[
        datetime | None, OptionalForm(description="ISO 8601; without a zone it means UTC.")
    ] = None,
    track_id: Annotated[str | None, OptionalForm(max_length=128, pattern=NO_NUL)] = None,
    metadata: Annotated[
        str | None, JsonObjectForm(description='A JSON object, e.g. {"site": "north gate"}.')
    ] = None,
    collection: Annotated[str, Form(pattern=COLLECTION)] = "default",
) -> EnrollResponse:
    """Store crops with their embedding and attributes; the same bytes again return the same entry."""
    fields = EntryFields(
        identity=_blank_to_none(identity),
        camera_id=_blank_to_none(camera_id),
        track_id=_blank_to_none(track_id),
        captured_at=captured_at,
        metadata=parse_metadata(metadata),
    )
    blobs = await read_images(images, settings)

    def run():
        crops = decode_crops(blobs, settings.max_pixels)
        return gallery.enroll(collection=collection, crops=crops, fields=fields)

    entries = await offload(request, run)
    created = len({e.id for e in entries if e.status != "existing"})
    if not created:
        response.status_code = status.HTTP_200_OK
    return EnrollResponse(
        collection=collection,
        created=created,
        existing=len({e.id for e in entries if e.status == "existing"}),
        entries=entries,  # Enrolled records, validated by attribute
    )


@router.get("", response_model=EntryPage, responses=problem_responses(422, 503))
def list_entries(
    session: SessionDep,
    gallery: GalleryDep,
    collection: Annotated[str | None, Query(max_length=128, pattern=NO_NUL)] = None,
    identity: Annotated[str | None, Query(max_length=256, pattern=NO_NUL)] = None,
    camera_id: Annotated[str | None, Query(max_length=128, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> EntryPage:
    """Entries in id order, one page at a time."""
    rows, total = store.list_entries(
        session, collection=collection, identity=identity, camera_id=camera_id, limit=limit, offset=offset
    )
    version = gallery.model_version
    stored = store.with_image(session, ids=[e.id for e in rows])
    return EntryPage(
        items=[
            GalleryEntry.model_validate(
                store.entry_record(e, model_version=version, has_image=e.id in stored)
            )
            for e in rows
        ],
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + len(rows) if offset + len(rows) < total else None,
    )


@router.get("/stats", response_model=GalleryStats, responses=problem_responses(503))
def stats(gallery: GalleryDep, job: ReembedJobDep) -> GalleryStats:
    """Entry counts per collection; entries of other re-ID bundle versions are counted apart; the
    progress of the service's re-embedding run."""
    body = GalleryStats.model_validate(gallery.stats())
    body.reembed = ReembedStatus.model_validate(job.progress)
    return body


@router.get("/{entry_id:int}", response_model=GalleryEntry, responses=BY_ID)
def get_entry(entry: EntryDep, gallery: GalleryDep, session: SessionDep) -> GalleryEntry:
    has_image = bool(store.with_image(session, ids=[entry.id]))
    record = store.entry_record(entry, model_version=gallery.model_version, has_image=has_image)
    return GalleryEntry.model_validate(record)


@router.get(
    "/{entry_id:int}/image",
    response_class=Response,
    responses={
        200: {
            "content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}},
            "description": "The crop's bytes exactly as enrolled, with the type of image they are.",
        },
    }
    | problem_responses(404, 422, 503, s404="No entry with this id, or no crop kept for it."),
)
def get_image(entry_id: EntryId, session: SessionDep, request: Request) -> Response:
    """The crop an entry was enrolled from (kept unless the service runs with REID_STORE_IMAGES=false)."""
    found = store.get_image(session, entry_id=entry_id)
    if found is None:
        if store.get_entry(session, entry_id=entry_id) is None:
            raise HTTPException(404, f"no gallery entry with id {entry_id}")
        raise HTTPException(404, f"gallery entry {entry_id} has no stored image")
    content_type, data, sha256 = found
    etag = f'"{sha256}"'  # the entry's sha256 is that of these bytes
    headers = {
        "ETag": etag,
        # Ids are never reused, but an entry can be deleted: caches must revalidate.
        "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=content_type, headers=headers)


@router.delete("/{entry_id:int}", response_model=Deleted, responses=DELETE_ERRORS)
def delete_entry(entry_id: EntryId, gallery: GalleryDep) -> Deleted:
    """Remove one entry from the database and the index."""
    if not gallery.delete(entry_id):
        raise HTTPException(404, f"no gallery entry with id {entry_id}")
    return Deleted(deleted=1, ids=[entry_id])


@router.delete("", response_model=Deleted, responses=problem_responses(422, 503, 507))
def erase_identity(
    gallery: GalleryDep,
    identity: Annotated[
        str,
        Query(
            min_length=1,
            max_length=256,
            pattern=NO_NUL,
            description="Every entry of this identity is deleted.",
        ),
    ],
    collection: Annotated[str, Query(max_length=128, pattern=NO_NUL)] = "default",
) -> Deleted:
    """Erase a person: every entry with this identity in the collection."""
    ids = gallery.erase_identity(collection=collection, identity=identity)
    return Deleted(deleted=len(ids), ids=ids)
