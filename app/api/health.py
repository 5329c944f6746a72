"""Liveness and readiness; both stay open when API keys are required."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.api.bodies import Health
from app.api.problems import problem, problem_responses

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (answers even while inference is busy)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses=problem_responses(503, s503="Starting: models not loaded or the index not built yet."),
)
async def readyz(request: Request) -> Health | Response:
    """Models loaded and the index built."""
    state = request.app.state
    if getattr(state, "models", None) is None or getattr(state, "gallery", None) is None:
        return problem(request, 503, "starting: models not loaded or the index not built yet")
    return Health(status="ok")
