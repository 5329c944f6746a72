"""Request and response bodies of the HTTP API (pydantic), with the examples shown in OpenAPI.

Bodies that report gallery contents validate from the gallery's plain records (``from_attributes``),
so this module needs nothing from the gallery or the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_ATTRS_EXAMPLE = {
    "gender": {"value": "female", "score": 0.97},
    "upper_colour": {"value": "red", "score": 0.88},
    "lower_colour": {"value": "black", "score": 0.91},
}


_SHA_EXAMPLE = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class FieldError(BaseModel):
    """One field that failed validation (pydantic's error, without the input it was given)."""

    type: str = Field(examples=["int_parsing"])
    loc: list[str | int] = Field(examples=[["body", "top_k"]])
    msg: str = Field(examples=["Input should be a valid integer"])


class Problem(BaseModel):
    """Every 4xx and 5xx: RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field(
        default="about:blank", description="Always about:blank: the status and title say what happened."
    )
    title: str = Field(description="The HTTP status phrase.", examples=["Unsupported Media Type"])
    status: int = Field(ge=400, le=599, examples=[415])
    detail: str = Field(
        description="One sentence naming the problem.",
        examples=["images[0] 'cam1.jpg': not a readable image"],
    )
    instance: str = Field(description="The request's path.", examples=["/gallery"])
    errors: list[FieldError] | None = Field(
        default=None,
        description="Validation errors (422 only, absent otherwise): each failing field and why.",
    )


class ModelRef(BaseModel):
    name: str
    version: str = Field(description="First 12 hex digits of the weights' sha256.")


class ReIDModelRef(ModelRef):
    match_threshold: float | None = Field(
        description="Cosine similarity at or above which a match counts as the same person (the "
        "threshold validated for this query's scoring: with query expansion, for expanded queries)."
    )
    query_expansion: int = Field(
        default=0, description="Neighbours averaged into the query before ranking; 0: none."
    )
    gallery_side: bool = Field(
        default=False,
        description="Whether the best candidates were scored with their own neighbourhoods in the "
        "gallery (gallery-side augmentation, validated with the query expansion).",
    )


class AttributeValue(BaseModel):
    value: str = Field(description="Predicted class name.")
    score: float = Field(ge=0, le=1, description="Its softmax probability.")


Attributes = dict[str, AttributeValue]


class CropAttributes(BaseModel):
    index: int = Field(description="Position of the crop in the request's 'images'.")
    attributes: Attributes


class AttributesResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {"name": "attributes-mobilenet_v2", "version": "3f2a9c0d1b7e"},
                    "crops": [{"index": 0, "attributes": _ATTRS_EXAMPLE}],
                }
            ]
        }
    )

    model: ModelRef
    crops: list[CropAttributes]
    track: Attributes | None = Field(
        default=None,
        description="With track=true only: one answer for all the crops as one person, each group's "
        "class probabilities averaged over them.",
    )


class GalleryEntry(BaseModel):
    """An enrolled crop as stored (embedding left out)."""

    model_config = ConfigDict(from_attributes=True)  # from app.gallery's EntryRecord and Enrolled

    id: int
    collection: str
    identity: str | None
    camera_id: str | None
    track_id: str | None
    captured_at: datetime | None
    metadata: dict[str, Any]
    attributes: Attributes
    image_sha256: str
    model_version: str = Field(description="Version of the re-ID bundle that embedded this entry.")
    searchable: bool = Field(description="False when made by a re-ID bundle other than the loaded one.")
    created_at: datetime
    image_url: str | None = Field(
        description="Path of the stored crop (GET it with the same X-API-Key); null when none is kept."
    )


class EnrolledEntry(GalleryEntry):
    index: int = Field(description="Position of the crop in the request's 'images'.")
    status: Literal["created", "existing", "refreshed"] = Field(
        description="'existing': these exact bytes were already enrolled in this collection and that "
        "entry is returned unchanged; 'refreshed': they were, by another re-ID bundle, and the entry "
        "was re-embedded with the loaded one."
    )


class EnrollResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "collection": "default",
                    "created": 1,
                    "existing": 0,
                    "entries": [
                        {
                            "index": 0,
                            "status": "created",
                            "id": 42,
                            "collection": "default",
                            "identity": "person-0007",
                            "camera_id": "cam-3",
                            "track_id": "t-118",
                            "captured_at": "2024-05-01T12:30:00Z",
                            "metadata": {"site": "north gate"},
                            "attributes": _ATTRS_EXAMPLE,
                            "image_sha256": _SHA_EXAMPLE,
                            "model_version": "a1b2c3d4e5f6",
                            "searchable": True,
                            "created_at": "2024-05-01T12:30:02Z",
                            "image_url": "/gallery/42/image",
                        }
                    ],
                }
            ]
        }
    )

    collection: str
    created: int
    existing: int
    entries: list[EnrolledEntry]


class Match(BaseModel):
    entry_id: int
    identity: str | None
    score: float = Field(description="Cosine similarity to the query, in [-1, 1].")
    is_match: bool = Field(description="score >= the re-ID bundle's match_threshold.")
    collection: str
    camera_id: str | None
    track_id: str | None
    captured_at: datetime | None
    metadata: dict[str, Any]
    attributes: Attributes
    image_url: str | None = Field(
        description="Path of the stored crop (GET it with the same X-API-Key); null when none is kept."
    )


class QueryResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": {
                        "name": "reid-mobilenet_v2",
                        "version": "a1b2c3d4e5f6",
                        "match_threshold": 0.62,
                    },
                    "candidates": 1830,
                    "matches": [
                        {
                            "entry_id": 42,
                            "identity": "person-0007",
                            "score": 0.83,
                            "is_match": True,
                            "collection": "default",
                            "camera_id": "cam-3",
                            "track_id": "t-118",
                            "captured_at": "2024-05-01T12:30:00Z",
                            "metadata": {"site": "north gate"},
                            "attributes": _ATTRS_EXAMPLE,
                            "image_url": "/gallery/42/image",
                        }
                    ],
                }
            ]
        }
    )

    model: ReIDModelRef
    candidates: int = Field(description="Searchable entries that passed the filters.")
    matches: list[Match]


class EntryPage(BaseModel):
    items: list[GalleryEntry]
    total: int
    limit: int
    offset: int
    next_offset: int | None


class Deleted(BaseModel):
    deleted: int
    ids: list[int]


class CollectionStats(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # from app.gallery's CollectionCounts

    entries: int
    searchable: int
    other_versions: dict[str, int] = Field(description="Entries per re-ID bundle version not loaded now.")


class ReembedStatus(BaseModel):
    """The service's re-embedding run (POST /admin/reembed): the current one, or the last."""

    model_config = ConfigDict(from_attributes=True)  # from app.gallery.reembed's ReembedProgress

    state: Literal["idle", "running", "done", "stopped", "failed"] = Field(
        description="'idle': none has run since the service started."
    )
    total: int = Field(description="Outdated entries when the run started.")
    processed: int = Field(description="Entries dealt with so far (the four counts below).")
    reembedded: int = Field(description="Written with the loaded bundles: searchable now.")
    without_image: int = Field(description="No stored crop: left as they are (enroll the crop again).")
    failed: int = Field(description="Stored crop no longer decodes: left as they are.")
    skipped: int = Field(description="Changed by another writer during the run: nothing to do.")
    batch_size: int
    started_at: datetime | None
    finished_at: datetime | None
    crops_per_second: float
    error: str | None


class GalleryStats(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,  # from app.gallery's GalleryCounts
        json_schema_extra={
            "examples": [
                {
                    "model_version": "a1b2c3d4e5f6",
                    "embedding_dim": 512,
                    "entries": 1250,
                    "searchable": 1200,
                    "excluded_other_versions": {"0c9d8e7f6a5b": 50},
                    "index_size": 1200,
                    "collections": {
                        "default": {
                            "entries": 1250,
                            "searchable": 1200,
                            "other_versions": {"0c9d8e7f6a5b": 50},
                        }
                    },
                    "stored_images": 1250,
                    "outdated": 50,
                    "outdated_without_image": 0,
                    "reembed": {
                        "state": "running",
                        "total": 50,
                        "processed": 20,
                        "reembedded": 20,
                        "without_image": 0,
                        "failed": 0,
                        "skipped": 0,
                        "batch_size": 64,
                        "started_at": "2024-05-01T12:30:00Z",
                        "finished_at": None,
                        "crops_per_second": 240.5,
                        "error": None,
                    },
                }
            ]
        },
    )

    model_version: str
    embedding_dim: int
    entries: int
    searchable: int
    excluded_other_versions: dict[str, int] = Field(
        description="Entries embedded by other re-ID bundles: kept, reported, never searched."
    )
    index_size: int
    collections: dict[str, CollectionStats]
    stored_images: int = Field(description="Entries whose crop is kept (served at their image_url).")
    outdated: int = Field(
        description="Entries made by another re-ID or attribute bundle: what POST /admin/reembed redoes."
    )
    outdated_without_image: int = Field(
        description="Outdated entries with no stored crop: re-embedding cannot redo them."
    )
    reembed: ReembedStatus | None = Field(
        default=None, description="The service's current or last re-embedding run."
    )


class ReembedStarted(BaseModel):
    started: bool = Field(description="False when a run was already going (that one is shown).")
    reembed: ReembedStatus


class ModelsResponse(BaseModel):
    attributes: dict[str, Any]
    reid: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok", "starting"]
