"""GET /models: the loaded bundles, their versions and recorded metrics."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.bodies import ModelsResponse
from app.api.problems import problem_responses
from app.deps import ModelsDep

router = APIRouter(prefix="/models", tags=["service"])


@router.get("", response_model=ModelsResponse, responses=problem_responses(503))
def list_models(models: ModelsDep) -> ModelsResponse:
    """Both loaded bundles: name, version, backbone, input size, weights sha256, recorded metrics."""
    return ModelsResponse(attributes=models.attributes.describe(), reid=models.reid.describe())
