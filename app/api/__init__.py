"""All routers, assembled in one place; with API keys configured, everything but /healthz and /readyz
needs one."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api import admin, attributes, gallery, health, metrics, models, reid
from app.api.problems import problem_responses
from app.security import require_api_key


def build_router(*, api_keys: bool) -> APIRouter:
    """The API; with ``api_keys`` every operation but the probes needs ``X-API-Key`` and declares it.

    Without keys the guard is left out altogether, so the document declares no security scheme and no
    401 that the service never answers. Every operation declares a 500 problem."""
    router = APIRouter()
    unexpected = problem_responses(500)  # any operation can fail in a way nobody planned for
    router.include_router(health.router, responses=unexpected)
    for module in (attributes, gallery, reid, models, metrics, admin):
        if api_keys:
            guard = [Depends(require_api_key)]
            router.include_router(
                module.router, dependencies=guard, responses=problem_responses(401) | unexpected
            )
        else:
            router.include_router(module.router, responses=unexpected)
    return router
