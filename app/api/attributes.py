"""POST /attributes: pedestrian attributes of one or more crops."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Request, UploadFile

from app.api.bodies import AttributesResponse, AttributeValue, CropAttributes, ModelRef, Problem
from app.api.uploads import decode_images, offload, read_images
from app.deps import ModelsDep, SettingsDep
from app.inference import AttributeModel

router = APIRouter(prefix="/attributes", tags=["attributes"])

ERRORS = {
    413: {"model": Problem, "description": "Too many images, or one too large (bytes or pixels)."},
    415: {"model": Problem, "description": "A file is not a readable image."},
    422: {"model": Problem, "description": "Missing or malformed fields."},
}


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
    images: Annotated[list[UploadFile], File(description="One or more person crops (repeat the field).")],
) -> AttributesResponse:
    """For each crop, every attribute group's predicted class and its probability."""
    blobs = await read_images(images, settings)
    crops = await offload(request, _predict, models.attributes, blobs, settings.max_pixels)
    model = models.attributes
    return AttributesResponse(model=ModelRef(name=model.name, version=model.version), crops=crops)
