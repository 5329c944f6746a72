"""POST /attributes: pedestrian attributes of one or more crops."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, UploadFile

from app.api.bodies import AttributesResponse, AttributeValue, CropAttributes, ModelRef
from app.api.forms import Files
from app.api.problems import problem_responses
from app.api.uploads import decode_images, offload, read_images
from app.deps import ModelsDep, SettingsDep
from app.inference import AttributeModel
from app.inference import Attributes as Predicted

router = APIRouter(prefix="/attributes", tags=["attributes"])

ERRORS = problem_responses(400, 413, 415, 422, 503)


def _body(attributes: Predicted) -> dict[str, AttributeValue]:
    return {k: AttributeValue(value=v.value, score=v.score) for k, v in attributes.items()}


def _predict(
    model: AttributeModel, blobs, max_pixels: int, track: bool
) -> tuple[list[CropAttributes], dict[str, AttributeValue] | None]:
    probabilities = model.probabilities(decode_images(blobs, max_pixels))
    answers = model.answers(probabilities)
    crops = [CropAttributes(index=i, attributes=_body(crop)) for i, crop in enumerate(answers)]
    return crops, _body(model.track_answer(probabilities)) if track else None


@router.post("", response_model=AttributesResponse, response_model_exclude_none=True, responses=ERRORS)
async def predict_attributes(
    request: Request,
    models: ModelsDep,
    settings: SettingsDep,
    images: Annotated[list[UploadFile], Files(description="One or more person crops (repeat the field).")],
    track: Annotated[
        bool,
        Form(
            description="The crops are one person (a track): also answer once for all of them, from "
            "their class probabilities averaged ('track' in the response)."
        ),
    ] = False,
) -> AttributesResponse:
    """For each crop, every attribute group's predicted class and its probability; with track=true,
    also one answer for the crops together."""
    blobs = await read_images(images, settings)
    crops, combined = await offload(request, _predict, models.attributes, blobs, settings.max_pixels, track)
    model = models.attributes
    return AttributesResponse(
        model=ModelRef(name=model.name, version=model.version), crops=crops, track=combined
    )
