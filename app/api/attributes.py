"""POST /attributes: pedestrian attributes of one or more crops."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request, UploadFile

from app.api.bodies import AttributesResponse, AttributeValue, CropAttributes, ModelRef
from app.api.forms import Files
from app.api.problems import problem_responses
from app.api.uploads import decode_images, offload, read_images
from app.deps import ModelsDep, SettingsDep
from app.inference import AttributeModel

router = APIRouter(prefix="/attributes", tags=["attributes"])

ERRORS = problem_responses(400, 413, 415, 422, 503)


def _predict(model: AttributeModel, blobs, max_pixels: int) -> list[CropAttributes]:
    images = decode_images(blobs, max_pixels)
    return [
        CropAttributes(
            index=i, attributes={k: AttributeValue(value=v.value, score=v.score) for k, v in crop.items()}
        )
        for i, crop in enumerate(model.predict(images))
    ]


@router.post("", response_model=AttributesResponse, responses=ERRORS)
async def predict_attributes(
    request: Request,
    models: ModelsDep,
    settings: SettingsDep,
    images: Annotated[list[UploadFile], Files(description="One or more person crops (repeat the field).")],
) -> AttributesResponse:
    """For each crop, every attribute group's predicted class and its probability."""
    blobs = await read_images(images, settings)
    crops = await offload(request, _predict, models.attributes, blobs, settings.max_pixels)
    model = models.attributes
    return AttributesResponse(model=ModelRef(name=model.name, version=model.version), crops=crops)
