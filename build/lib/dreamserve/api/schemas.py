"""Shapes for the OpenAPI document. Requests are validated by `submission.py`, which owns the
contract's messages; the request models here only describe the API to readers and tools. Replies
are declared once, in `replies.py`, as the service builds them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreamserve.replies import ErrorBody

Ratio = Literal["auto", "1:1", "3:4", "16:9", "4:3", "9:16", "2:3", "3:2", "21:9"]


class ImageJobRequest(BaseModel):
    model_config = ConfigDict(title="ImageJobRequest")

    prompt: str | None = Field(None, max_length=1600, description="Required unless refs given")
    model: str = Field("seedream-4.6", description="A catalogue model (GET /models)")
    ratio: Ratio | None = Field(None, description="Default `auto` where the model supports it")
    resolution: Literal["1k", "2k", "4k"] | None = Field(None, description="Default: the model's")
    imageRef_1: str | None = Field(None, description="assetRef of a reference image")
    imageRef_2: str | None = None
    imageRef_3: str | None = None
    imageRef_4: str | None = None
    imageRef_5: str | None = None
    imageRef_6: str | None = None
    imageStrength: float | None = Field(None, ge=0, le=1, description="Default 0.5")
    account: str | None = Field(None, description="REGION:name; default: any with a free slot")
    replyUrl: str | None = Field(None, max_length=1024)
    replyRef: str | None = Field(None, max_length=1024)
    maxJobs: int | None = Field(None, ge=1, le=50)
    seed: int | None = Field(
        None,
        ge=0,
        le=2_147_483_647,
        description="Default: one picked at random. Image i is made with seed + i, reported on "
        "each image where the engine honours seeds",
    )
    count: int | None = Field(None, ge=1, le=4, description="Images per job, default 4")
    queueSeconds: int | None = Field(
        None,
        ge=0,
        le=3600,
        description="Default 0: no free slot is a 429 at once. Else the job waits up to this "
        "long for a slot of its account (record `queuePosition`), then fails",
    )


class UpscaleRequest(BaseModel):
    model_config = ConfigDict(title="UpscaleRequest")

    jobid: str = Field(description="A completed image job of yours")
    imageIndex: int | None = Field(None, ge=0, le=3, description="Default 0")
    upscaleResolution: Literal["2k", "4k", "8k"] | None = Field(None, description="Default 4k")
    originalImageStrength: float | None = Field(None, ge=0, le=1, description="Default 0.65")
    detailStrength: float | None = Field(None, ge=0, le=1, description="Default 0.5")
    replyUrl: str | None = Field(None, max_length=1024)
    replyRef: str | None = Field(None, max_length=1024)
    maxJobs: int | None = Field(None, ge=1, le=50)


class AccountRequest(BaseModel):
    model_config = ConfigDict(title="AccountRequest")

    account: str | None = Field(None, description="REGION:name; default `<region>:<email>`")
    email: str | None = Field(None, max_length=200)
    region: str | None = Field(None, max_length=32, description="Default `US`")
    engine: str = Field(description="One of the server's engines, e.g. `procedural`")
    maxJobs: int | None = Field(None, ge=1, le=50, description="Concurrent jobs, default 10")
    priority: int | None = Field(
        None,
        ge=-1000,
        le=1000,
        description="Default 0: a job that names no account goes to the highest priority with "
        "a free slot",
    )
    models: list[str] | None = Field(None, description="Default: every model the engine serves")
    settings: dict[str, Any] | None = Field(
        None, description="The engine's settings; secrets (apiKey...) are never returned"
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Invalid parameter"),
        (401, "Missing or wrong token"),
        (403, "Forbidden"),
        (404, "Not found"),
        (413, "Body too large"),
        (429, "No free slot; see Retry-After"),
        (
            503,
            "Database busy (locked by another transaction), or the server is stopping; see "
            "Retry-After",
        ),
        (507, "Storage full: the server has no space left; nothing was written"),
    )
}
# Of the job-creating POSTs, which take an Idempotency-Key.
IDEMPOTENCY_REUSED: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Idempotency-Key used with another request"}
}
# What a client does next with a job it created, as OpenAPI links (Schemathesis follows them in
# its stateful tests, tests/blackbox/test_schemathesis.py).
_JOBID = {"jobid": "$response.body#/jobid"}
JOB_LINKS: dict[int | str, dict[str, Any]] = {
    200: {
        "links": {
            "GetJob": {
                "operationId": "get_image_job_v1_dreamina_images__jobid__get",
                "parameters": _JOBID,
            },
            "ListWebhooks": {
                "operationId": "list_webhooks_v1_dreamina_images__jobid__webhooks_get",
                "parameters": _JOBID,
            },
            "RedeliverWebhook": {
                "operationId": "redeliver_webhook_v1_dreamina_images__jobid__webhooks_post",
                "parameters": _JOBID,
            },
            "CancelJob": {
                "operationId": "cancel_job_v1_dreamina_scheduler__jobid__delete",
                "parameters": _JOBID,
            },
            "UpscaleImage": {
                "operationId": "create_upscale_job_v1_dreamina_images_upscale_post",
                "requestBody": _JOBID,
            },
        }
    }
}
# Of the routes that read a request body: its deadline, and the bodies arriving at once (README
# "Limits").
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    408: {
        "model": ErrorBody,
        "description": "The body did not all arrive in time after the head; connection closed",
    },
    429: {
        "model": ErrorBody,
        "description": "No free slot, or too many of your request bodies arriving at once; "
        "see Retry-After",
    },
    503: {
        "model": ErrorBody,
        "description": "Database busy, or too many request bodies arriving at once on the "
        "server; see Retry-After",
    },
}
# Of GET /files/<key>: a Range header that starts past the file's end.
RANGE_NOT_SATISFIABLE: dict[int | str, dict[str, Any]] = {
    416: {"model": ErrorBody, "description": "Range not satisfiable; see Content-Range"}
}
# Of DELETE /assets/<assetId>: the file could not be removed, nothing was; retry.
STORAGE_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "Storage unavailable; retry later"}
}

_REQUEST_SCHEMA = ImageJobRequest.model_json_schema()
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": _REQUEST_SCHEMA},
        "multipart/form-data": {"schema": _REQUEST_SCHEMA},
    },
}

ACCOUNT_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {"application/json": {"schema": AccountRequest.model_json_schema()}},
}

_UPSCALE_SCHEMA = UpscaleRequest.model_json_schema()
UPSCALE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": _UPSCALE_SCHEMA},
        "multipart/form-data": {"schema": _UPSCALE_SCHEMA},
    },
}
