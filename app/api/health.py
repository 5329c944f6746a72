"""Liveness and readiness; both stay open when API keys are required."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app.api.bodies import Health

router = APIRouter(tags=["service"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up (answers even while inference is busy)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(request: Request):
    """Models loaded and the index built."""
    state = request.app.state
    if getattr(state, "models", None) is None or getattr(state, "gallery", None) is None:
        return JSONResponse({"status": "starting"}, status_code=503)
    return Health(status="ok")
