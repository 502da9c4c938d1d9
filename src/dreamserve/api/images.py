"""POST /images and GET /images/<jobid>."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from dreamserve.api.body import read_fields
from dreamserve.api.deps import SECURED, authenticate
from dreamserve.api.schemas import ERRORS, IMAGE_REQUEST_BODY, UPSCALE_REQUEST_BODY, JobRecord

router = APIRouter(tags=["images"])

JOBID_PARAMETER = {"name": "jobid", "in": "path", "required": True, "schema": {"type": "string"}}


@router.post(
    "/images",
    response_model=JobRecord,
    responses=ERRORS,
    openapi_extra={"requestBody": IMAGE_REQUEST_BODY, **SECURED},
    summary="Create an image job",
)
async def create_image_job(request: Request) -> Response:
    """Validate the request, take a slot on an account and start the job; replies at once with
    the job record, status `created`. JSON, multipart/form-data or form-urlencoded."""
    service, user = await authenticate(request)
    fields = await read_fields(request, request.app.state.max_body_bytes)
    return _json((await service.submit_image(user, fields)).json)


@router.post(
    "/images/upscale",
    response_model=JobRecord,
    responses=ERRORS,
    openapi_extra={"requestBody": UPSCALE_REQUEST_BODY, **SECURED},
    summary="Upscale an image of a completed job",
)
async def create_upscale_job(request: Request) -> Response:
    """One image of a completed image job, upscaled to `upscaleResolution` on that job's
    account; replies at once with the job record, type `upscale`, status `created`."""
    service, user = await authenticate(request)
    fields = await read_fields(request, request.app.state.max_body_bytes)
    return _json((await service.submit_upscale(user, fields)).json)


@router.get(
    "/images/{jobid}",
    response_model=JobRecord,
    responses=ERRORS,
    openapi_extra={"parameters": [JOBID_PARAMETER], **SECURED},
    summary="Get an image job",
)
async def get_image_job(request: Request) -> Response:
    """The job record; the job id may be given raw or percent-encoded."""
    service, user = await authenticate(request)  # path_params: cheaper than a declared parameter
    return _json((await service.get_job(user, request.path_params["jobid"])).json)


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")
