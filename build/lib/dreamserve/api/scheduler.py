"""GET /scheduler and DELETE /scheduler/<jobid>: the jobs holding slots, and cancelling one."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dreamserve.api.deps import SECURED, RequestRoute, authenticate
from dreamserve.api.images import JOBID_PARAMETER
from dreamserve.api.schemas import ERRORS
from dreamserve.replies import JobRecord, Scheduler

router = APIRouter(tags=["scheduler"], route_class=RequestRoute)


@router.get(
    "/scheduler",
    response_model=Scheduler,
    responses=ERRORS,
    openapi_extra=SECURED,
    summary="List your running jobs",
)
async def get_scheduler(request: Request) -> JSONResponse:
    """Your unfinished jobs (each holds a slot of its account), by account."""
    service, user = await authenticate(request)
    return JSONResponse(await service.scheduler.running(user))


@router.delete(
    "/scheduler/{jobid}",
    response_model=JobRecord,
    responses=ERRORS,
    openapi_extra={"parameters": [JOBID_PARAMETER], **SECURED},
    summary="Cancel a running job",
)
async def cancel_job(request: Request) -> Response:
    """Frees the job's slot at once, stops its engine and ends it `failed` with
    `Cancelled by user`; the job record. 404 when the job is not running."""
    service, user = await authenticate(request)
    record = await service.scheduler.cancel(user, request.path_params["jobid"])
    return Response(record.json, media_type="application/json")
