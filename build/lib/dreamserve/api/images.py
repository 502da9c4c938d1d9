"""POST /images, GET /images (the user's jobs), GET /images/<jobid> (with ?wait=), its event
stream and its webhooks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event

from dreamserve.api.body import read_fields
from dreamserve.api.deps import SECURED, RequestRoute, authenticate
from dreamserve.api.schemas import (
    BODY_ERRORS,
    ERRORS,
    IDEMPOTENCY_REUSED,
    IMAGE_REQUEST_BODY,
    JOB_LINKS,
    UPSCALE_REQUEST_BODY,
)
from dreamserve.replies import JobPage, JobRecord, WebhookDeliveries
from dreamserve.service import Record, Submitted
from dreamserve.service.submissions import Submissions

router = APIRouter(tags=["images"], route_class=RequestRoute)

JOBID_PARAMETER = {"name": "jobid", "in": "path", "required": True, "schema": {"type": "string"}}
IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 255},
    "description": "The same key and body within 24 hours return the job the first made",
}
WAIT_PARAMETER = {
    "name": "wait",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 0, "maximum": 60},
    "description": "Seconds to hold the request until the job ends",
}

# The listing's query parameters; each may be sent empty (`?status=&model=`), which is the same
# as leaving it out.
LIST_PARAMETERS = [
    {"in": "query", "allowEmptyValue": True, **parameter}
    for parameter in [
        {
            "name": "status",
            "schema": {"type": "string", "enum": ["created", "completed", "failed"]},
            "description": "Only jobs of this status (a job waiting for a slot or running is "
            "`created`)",
        },
        {
            "name": "model",
            "schema": {"type": "string"},
            "description": "Only jobs of this catalogue model",
        },
        {
            "name": "account",
            "schema": {"type": "string", "maxLength": 255},
            "description": "Only jobs of this account id, e.g. `LOCAL:procedural`",
        },
        {
            "name": "since",
            "schema": {"type": "string", "format": "date-time"},
            "description": "Only jobs created at or after this ISO 8601 time with its zone, "
            "e.g. `2026-03-02T14:05:30.123Z`",
        },
        {
            "name": "limit",
            "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            "description": "Jobs per page",
        },
        {
            "name": "cursor",
            "schema": {"type": "string"},
            "description": "The `next` of the previous page, given with the same filters",
        },
    ]
]


@router.get(
    "/images",
    response_model=JobPage,
    responses=ERRORS,
    openapi_extra={"parameters": LIST_PARAMETERS, **SECURED},
    summary="List your jobs",
)
async def list_image_jobs(request: Request) -> Response:
    """**ours** (the hosted API has no such list): your jobs, image and upscale, newest first
    (by created time, then id), each record as GET /images/<jobid> returns it. A page holds
    `limit` jobs; `next` is the `cursor` of the following page, null on the last. The
    filters combine; a cursor marks a position only, so it is meant to be given with the
    filters of the listing it came from (other filters list from that position on)."""
    service, user = await authenticate(request)
    page = await service.records.page(user, dict(request.query_params))
    return _json(orjson.dumps(page))


@router.post(
    "/images",
    response_model=JobRecord,
    responses={**BODY_ERRORS, **IDEMPOTENCY_REUSED, **JOB_LINKS},
    openapi_extra={
        "requestBody": IMAGE_REQUEST_BODY,
        "parameters": [IDEMPOTENCY_PARAMETER],
        **SECURED,
    },
    summary="Create an image job",
)
async def create_image_job(request: Request) -> Response:
    """Validate the request, take a slot on an account and start the job; replies at once with
    the job record, status `created`. JSON, multipart/form-data or form-urlencoded."""
    return await _submit(request, Submissions.image)


@router.post(
    "/images/upscale",
    response_model=JobRecord,
    responses={**BODY_ERRORS, **IDEMPOTENCY_REUSED, **JOB_LINKS},
    openapi_extra={
        "requestBody": UPSCALE_REQUEST_BODY,
        "parameters": [IDEMPOTENCY_PARAMETER],
        **SECURED,
    },
    summary="Upscale an image of a completed job",
)
async def create_upscale_job(request: Request) -> Response:
    """One image of a completed image job, upscaled to `upscaleResolution` on that job's
    account; replies at once with the job record, type `upscale`, status `created`."""
    return await _submit(request, Submissions.upscale)


@router.get(
    "/images/{jobid}",
    response_model=JobRecord,
    responses=ERRORS,
    openapi_extra={"parameters": [JOBID_PARAMETER, WAIT_PARAMETER], **SECURED},
    summary="Get an image job",
)
async def get_image_job(request: Request) -> Response:
    """The job record; the job id may be given raw or percent-encoded. With `?wait=N` (at most
    60), an unfinished job's record is returned when it ends or after N seconds."""
    service, user = await authenticate(request)  # path_params: cheaper than a declared parameter
    jobid = request.path_params["jobid"]
    if "wait" not in request.query_params:
        return _json((await service.records.get(user, jobid)).json)
    wait = service.records.wait_seconds(request.query_params["wait"])
    return _json((await service.records.get(user, jobid, wait)).json)


@router.get(
    "/images/{jobid}/events",
    responses={
        **ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    },
    openapi_extra={"parameters": [JOBID_PARAMETER], **SECURED},
    summary="Stream a job's progress",
)
async def stream_image_job(request: Request) -> Response:
    """Server-Sent Events: `progress` with the record now and on every change while the job
    runs, then `done` with the final record, and the stream ends. A comment keeps a quiet
    stream open every 15 seconds."""
    service, user = await authenticate(request)
    events = service.records.follow(user, request.path_params["jobid"])
    first = await anext(events)  # a missing job is a 404, before the stream starts
    assert first is not None
    return EventSourceResponse(
        _sse(first, events), headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
    )


async def _sse(first: Record, rest: AsyncIterator[Record | None]) -> AsyncIterator[bytes]:
    try:
        yield _event(first)
        async for body in rest:
            yield format_sse_event(comment="keep-alive") if body is None else _event(body)
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def _event(body: Record) -> bytes:
    name = "progress" if body["status"] == "created" else "done"
    return format_sse_event(event=name, data_str=body.json.decode())


@router.get(
    "/images/{jobid}/webhooks",
    response_model=WebhookDeliveries,
    responses=ERRORS,
    openapi_extra={"parameters": [JOBID_PARAMETER], **SECURED},
    summary="List a job's webhook deliveries",
)
async def list_webhooks(request: Request) -> JSONResponse:
    """Every delivery of the job's record to its `replyUrl`, with each try: the receiver's
    status code or the error, when, and when the next try is due."""
    service, user = await authenticate(request)
    return JSONResponse(await service.webhooks.deliveries(user, request.path_params["jobid"]))


@router.post(
    "/images/{jobid}/webhooks",
    response_model=WebhookDeliveries,
    responses=ERRORS,
    openapi_extra={"parameters": [JOBID_PARAMETER], **SECURED},
    summary="Redeliver a job's webhook now",
)
async def redeliver_webhook(request: Request) -> JSONResponse:
    """Send the ended job's record to its `replyUrl` again, now (a pending delivery is made due
    now instead); the job's deliveries. 400 when the job has no replyUrl or has not ended."""
    service, user = await authenticate(request)
    return JSONResponse(await service.webhooks.redeliver(user, request.path_params["jobid"]))


async def _submit(
    request: Request,
    submit: Callable[[Submissions, int, dict[str, Any], str | None], Awaitable[Submitted]],
) -> Response:
    """The body and Idempotency-Key of a POST, submitted as the user of its token."""
    service, user = await authenticate(request)
    service.submissions.admitting()  # a stopping server: 503 before the body is read
    fields = await read_fields(request, user)
    key = request.headers.get("idempotency-key")
    submitted = await submit(service.submissions, user, fields, key)
    response = _json(submitted.json)
    if submitted.replayed:
        response.headers["idempotent-replayed"] = "true"
    return response


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")
