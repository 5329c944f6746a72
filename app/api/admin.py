"""Maintenance: re-embedding the gallery after a bundle change."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from app.api.bodies import ReembedStarted, ReembedStatus
from app.api.problems import problem_responses
from app.deps import ReembedJobDep

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post(
    "/reembed",
    response_model=ReembedStarted,
    status_code=status.HTTP_202_ACCEPTED,
    responses={200: {"model": ReembedStarted, "description": "A run was already going; nothing started."}}
    | problem_responses(503),
)
def start_reembed(job: ReembedJobDep, response: Response) -> ReembedStarted:
    """Re-embed, in the background, every entry made by another re-ID or attribute bundle from its stored
    crop; follow it in GET /gallery/stats (`reembed`) and /metrics (`reid_reembed_*`). Entries without a
    stored crop are counted and left as they are. The same as `reid-serve reembed`, inside the service."""
    started = job.start()
    if not started:
        response.status_code = status.HTTP_200_OK
    return ReembedStarted(started=started, reembed=ReembedStatus.model_validate(job.progress))
