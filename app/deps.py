"""Typed dependencies: the settings, models, gallery and a database session of the running app."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.gallery.gallery import Gallery
from app.gallery.reembed import ReembedJob
from app.gallery.store import Entry, get_entry
from app.inference import Models
from app.settings import Settings

log = logging.getLogger("app")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_models(request: Request) -> Models:
    models = getattr(request.app.state, "models", None)
    if models is None:
        raise HTTPException(503, "models are not loaded yet")
    return models


def get_gallery(request: Request) -> Gallery:
    gallery = getattr(request.app.state, "gallery", None)
    if gallery is None:
        raise HTTPException(503, "the gallery is not open yet")
    return gallery


def get_reembed_job(request: Request) -> ReembedJob:
    job = getattr(request.app.state, "reembed_job", None)
    if job is None:
        raise HTTPException(503, "the gallery is not open yet")
    return job


SettingsDep = Annotated[Settings, Depends(get_settings)]
ModelsDep = Annotated[Models, Depends(get_models)]
GalleryDep = Annotated[Gallery, Depends(get_gallery)]
ReembedJobDep = Annotated[ReembedJob, Depends(get_reembed_job)]


def get_session(gallery: GalleryDep) -> Iterator[Session]:
    session = gallery.session()
    try:
        yield session
    finally:
        try:
            session.close()
        except SQLAlchemyError as exc:
            # The database went away after the request's work (the rollback that returns the connection
            # to the pool failed): the answer is already made, and raising here would drop the
            # connection without one. The connection is discarded, not pooled.
            log.warning("closing a database session failed: %s", str(exc).strip().splitlines()[0])
            with contextlib.suppress(SQLAlchemyError):
                session.invalidate()


SessionDep = Annotated[Session, Depends(get_session)]


# Entry ids are positive 64-bit integers; larger numbers are a 422, not a database overflow.
EntryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Entry id.")]
# Text that reaches the database: PostgreSQL refuses NUL characters, so they are refused here first.
NO_NUL = r"^[^\x00]*$"


def get_entry_or_404(entry_id: EntryId, session: SessionDep) -> Entry:
    entry = get_entry(session, entry_id=entry_id)
    if entry is None:
        raise HTTPException(404, f"no gallery entry with id {entry_id}")
    return entry


EntryDep = Annotated[Entry, Depends(get_entry_or_404)]
