"""All routers, assembled in one place; everything but /healthz and /readyz needs an API key when keys
are configured."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api import admin, attributes, gallery, health, metrics, models, reid
from app.api.bodies import Problem
from app.security import require_api_key

UNAUTHORIZED = {401: {"model": Problem, "description": "Missing or invalid X-API-Key."}}

api_router = APIRouter()
api_router.include_router(health.router)
for module in (attributes, gallery, reid, models, metrics, admin):
    api_router.include_router(module.router, dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED)
