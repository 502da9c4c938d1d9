"""Shapes for the OpenAPI document. Requests are validated by `submission.py`, which owns the
contract's messages; these models only describe the API to readers and tools."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Ratio = Literal["auto", "1:1", "3:4", "16:9", "4:3", "9:16", "2:3", "3:2", "21:9"]


class ImageJobRequest(BaseModel):
    model_config = ConfigDict(title="ImageJobRequest")

    prompt: str | None = Field(None, max_length=1600, description="Required unless refs given")
    model: str = Field("seedream-4.0", description="A catalogue model (GET /models)")
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
    seed: int | None = Field(None, ge=0, le=2_147_483_647)
    count: int | None = Field(None, ge=1, le=4, description="Images per job, default 4")


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


class ImageOut(BaseModel):
    imageUrl: str
    imageUri: str
    width: int
    height: int
    format: Literal["jpeg", "png", "webp"]
    assetId: str
    assetRef: str
    itemId: str


class JobResponse(BaseModel):
    forecastCost: float
    images: list[ImageOut] | None = None


class JobRecord(BaseModel):
    jobid: str
    type: Literal["image", "upscale"]
    status: Literal["created", "completed", "failed"]
    model: str
    created: str
    updated: str | None = None
    started: str | None = None
    progress: int | None = None
    request: dict[str, Any]
    response: JobResponse
    error: str | None = None
    errorDetails: str | None = None
    code: int


class AccountRequest(BaseModel):
    model_config = ConfigDict(title="AccountRequest")

    account: str | None = Field(None, description="REGION:name; default `<region>:<email>`")
    email: str | None = Field(None, max_length=200)
    region: str | None = Field(None, max_length=32, description="Default `US`")
    engine: str = Field(description="One of the server's engines, e.g. `procedural`")
    maxJobs: int | None = Field(None, ge=1, le=50, description="Concurrent jobs, default 10")
    models: list[str] | None = Field(None, description="Default: every model the engine serves")
    settings: dict[str, Any] | None = Field(
        None, description="The engine's settings; secrets (apiKey...) are never returned"
    )


class AccountModels(BaseModel):
    image: list[str]


class AccountSummary(BaseModel):
    account: str
    email: str
    region: str
    maxJobs: int
    engine: str
    models: AccountModels
    settings: dict[str, Any] = Field(description="The engine's settings without the secrets")
    shared: bool
    running: int = Field(description="Slots taken now")
    error: str | None = None
    details: dict[str, Any] | None = Field(
        None, description="GET /accounts/<account> only: what the engine says of itself"
    )


class AccountDeleted(BaseModel):
    account: str
    deleted: bool
    remaining: int


class ExecutingJob(BaseModel):
    jobid: str
    model: str
    elapsedSeconds: int
    replyUrl: str | None = None


class Scheduler(BaseModel):
    executing: dict[str, list[ExecutingJob]]
    total: int


class AssetUploaded(BaseModel):
    assetRef: str
    account: str
    width: int
    height: int
    size: int


class AssetListed(BaseModel):
    assetId: str
    itemId: str
    type: Literal["image"]
    description: str | None
    assetRef: str
    imageUrl: str
    width: int
    height: int
    format: Literal["jpeg", "png", "webp"]
    createdAt: str


class AssetPage(BaseModel):
    assets: list[AssetListed]
    hasMore: bool
    nextOffset: int | None
    account: str


class AssetDeleted(BaseModel):
    deleted: bool
    assetId: str
    account: str


class WebhookSecret(BaseModel):
    secret: str = Field(description="`whsec_…`: verify deliveries with it (Standard Webhooks)")
    previousSecretExpires: str | None = Field(
        None, description="After a rotation: until when the previous secret still signs"
    )


class WebhookTry(BaseModel):
    at: str
    statusCode: int | None = Field(description="The receiver's answer; null when none came")
    error: str | None
    durationMs: int


class WebhookDelivery(BaseModel):
    webhookId: str = Field(description="The `webhook-id` header, the same on every try")
    url: str
    status: Literal["pending", "delivered", "stopped", "failed", "refused"]
    created: str
    nextTry: str | None
    tries: list[WebhookTry]


class WebhookDeliveries(BaseModel):
    jobid: str
    deliveries: list[WebhookDelivery]


class ErrorBody(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Invalid parameter"),
        (401, "Missing or wrong token"),
        (403, "Forbidden"),
        (404, "Not found"),
        (413, "Body too large"),
        (422, "Idempotency-Key used with another request"),
        (429, "No free slot; see Retry-After"),
    )
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
