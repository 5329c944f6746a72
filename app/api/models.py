"""GET /models: the loaded bundles, their versions and recorded metrics."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.bodies import ModelsResponse
from app.deps import ModelsDep

router = APIRouter(prefix="/models", tags=["service"])


@router.get("", response_model=ModelsResponse)
def list_models(models: ModelsDep) -> ModelsResponse:
    return ModelsResponse(attributes=models.attributes.describe(), reid=models.reid.describe())
