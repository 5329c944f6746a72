"""Liveness and readiness; both stay open when API keys are required."""

from __future__ import annotations

import logging

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.api.bodies import Health
from app.api.problems import problem, problem_responses

router = APIRouter(tags=["service"])
log = logging.getLogger("app")

# /readyz answers within this, whatever the database does (a connect is also bounded: store.open_engine).
PING_SECONDS = 3.0


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (answers even while inference is busy)."""
    return Health(status="ok")


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


@router.get(
    "/readyz",
    response_model=Health,
    responses=problem_responses(
        503, s503="Starting (models not loaded or the index not built yet), or the database does not answer."
    ),
)
async def readyz(request: Request) -> Health | Response:
    """Models loaded, the index built and the database answering."""
    state = request.app.state
    gallery = getattr(state, "gallery", None)
    if getattr(state, "models", None) is None or gallery is None:
        return problem(request, 503, "starting: models not loaded or the index not built yet")
    reason = None
    with anyio.move_on_after(PING_SECONDS) as scope:
        try:
            # Abandoned, not awaited, past the limit: a ping stuck on the network cannot hold the answer.
            await anyio.to_thread.run_sync(_ping, gallery.engine, abandon_on_cancel=True)
        except SQLAlchemyError as exc:
            reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    if scope.cancelled_caught:
        reason = f"no answer within {PING_SECONDS:g} s"
    if reason is not None:
        log.warning("not ready: the database does not answer: %s", reason)
        return problem(request, 503, "not ready: the gallery's database does not answer")
    return Health(status="ok")
