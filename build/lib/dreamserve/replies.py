"""The reply bodies of the API, each declared once: the functions that build a reply return its
shape here (so mypy checks every key and value they put in), and the routes declare the same
shape as their `response_model` (so the OpenAPI document is generated from it).

TypedDicts rather than models: a reply is built as a plain dict, costs nothing more to build,
and is serialized by orjson without validation (the job record is served on every poll,
docs/benchmarks.md). `NotRequired` marks a key that only some replies carry, which the
document then leaves out of `required`; `X | None` is a key always sent, sometimes `null`.
Names are the OpenAPI document's component names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired

from pydantic import Field

# typing's TypedDict before Python 3.12 lacks what pydantic needs to describe it.
from typing_extensions import TypedDict

from dreamserve.ids import JobType

ImageFormat = Literal["jpeg", "png", "webp"]
JobStatus = Literal["created", "completed", "failed"]
DeliveryStatus = Literal["pending", "delivered", "stopped", "failed", "refused"]


class ErrorBody(TypedDict):
    error: str


# GET /healthz and /readyz (api/health.py).


class Health(TypedDict):
    status: Literal["ok"]
    version: str


class ReadyChecks(TypedDict):
    database: str  # "ok", or why not
    blobs: str  # "ok", or why not
    runners: str  # "ok", "not run here" (a process that runs no jobs), or why not


class Ready(TypedDict):
    status: Literal["ready"]
    checks: ReadyChecks


class NotReady(TypedDict):
    error: str  # "Not ready: <check>: <reason>[; <check>: <reason>]"
    checks: ReadyChecks


# The job record: POST /images and /images/upscale, GET /images/<jobid>, DELETE
# /scheduler/<jobid>, the event stream's events and the webhook body (`jobs.record`).


class ImageOut(TypedDict):
    imageUrl: str
    imageUri: str
    width: int
    height: int
    format: ImageFormat
    assetId: str
    assetRef: str
    itemId: str
    seed: NotRequired[
        Annotated[
            int,
            Field(
                description="The seed the image was made with, on engines that honour seeds "
                "(not on upstream vendors' nor on upscales): image i (0-based) of a job of seed "
                "s has seed s + i (past 2147483647, counting on from 0); the same request with "
                "this seed and count 1 makes the same image"
            ),
        ]
    ]


class JobResponse(TypedDict):
    forecastCost: float
    images: NotRequired[list[ImageOut]]  # completed jobs only


class JobRecord(TypedDict):
    jobid: str
    type: JobType
    status: JobStatus
    model: str
    created: str
    updated: NotRequired[str]
    started: NotRequired[str]  # with progress, while a started job is still `created`
    progress: NotRequired[int]
    queuePosition: NotRequired[
        Annotated[
            int,
            Field(
                description="GET only, while the job waits for a slot (queueSeconds): 1 takes "
                "the next slot of its account"
            ),
        ]
    ]
    request: dict[str, Any]
    response: JobResponse
    error: NotRequired[str]
    errorDetails: NotRequired[str]
    code: Literal[200]


class JobPage(TypedDict):
    """GET /images: a page of the user's jobs, newest first."""

    jobs: list[JobRecord]
    next: Annotated[
        str | None,
        Field(description="The `cursor` of the next page; null on the last page"),
    ]


# Accounts (`accounts.summary`, `service.accounts`).


class AccountModels(TypedDict):
    image: list[str]


class AccountOutcomes(TypedDict):
    completed: int
    failed: int


class AccountSummary(TypedDict):
    account: str
    email: str
    region: str
    maxJobs: int
    priority: Annotated[
        int,
        Field(
            description="Admission chooses at random among the accounts of the highest "
            "priority that have a free slot"
        ),
    ]
    engine: str
    models: AccountModels
    settings: Annotated[
        dict[str, Any], Field(description="The engine's settings without the secrets")
    ]
    shared: bool
    running: Annotated[int, Field(description="Slots taken now")]
    lastHour: Annotated[
        AccountOutcomes, Field(description="Its jobs that ended in the last hour, but cancelled")
    ]
    error: NotRequired[str]
    cooldownUntil: NotRequired[
        Annotated[
            str,
            Field(
                description="While it cools down after failures of its own (connection, "
                "timeout, upstream 5xx or 429, device): admission leaves it out while another "
                "account has room; its next success ends it"
            ),
        ]
    ]
    lastError: NotRequired[
        Annotated[str, Field(description="The last failure of its own (not a job's fault)")]
    ]
    lastErrorAt: NotRequired[str]
    details: NotRequired[
        Annotated[
            dict[str, Any],
            Field(description="GET /accounts/<account> only: what the engine says of itself"),
        ]
    ]


class AccountDeleted(TypedDict):
    account: str
    deleted: Literal[True]
    remaining: int


# GET /scheduler (`service.scheduler`).


class ExecutingJob(TypedDict):
    jobid: str
    model: str
    elapsedSeconds: int
    replyUrl: NotRequired[str]  # jobs submitted with one


class Scheduler(TypedDict):
    executing: dict[str, list[ExecutingJob]]
    total: int


# Assets (`service.assets`).


class AssetUploaded(TypedDict):
    assetRef: str
    imageRef: Annotated[
        str,
        Field(
            description="The same value as assetRef, under the name the hosted API first "
            "published (older clients read it)"
        ),
    ]
    account: str
    width: int
    height: int
    size: int


class AssetListed(TypedDict):
    assetId: str
    itemId: str
    type: Literal["image"]
    description: str | None
    assetRef: str
    imageUrl: str
    width: int
    height: int
    format: ImageFormat
    createdAt: str


class AssetPage(TypedDict):
    assets: list[AssetListed]
    hasMore: bool
    nextOffset: int | None
    account: str


class AssetDeleted(TypedDict):
    deleted: Literal[True]
    assetId: str
    account: str


# Webhooks (`webhooks.outbox`).


class WebhookSecret(TypedDict):
    secret: Annotated[
        str, Field(description="`whsec_…`: verify deliveries with it (Standard Webhooks)")
    ]
    previousSecretExpires: NotRequired[
        Annotated[
            str, Field(description="After a rotation: until when the previous secret still signs")
        ]
    ]


class WebhookTry(TypedDict):
    at: str
    statusCode: Annotated[
        int | None, Field(description="The receiver's answer; null when none came")
    ]
    error: str | None
    durationMs: int


class WebhookDelivery(TypedDict):
    webhookId: Annotated[str, Field(description="The `webhook-id` header, the same on every try")]
    url: str
    status: DeliveryStatus
    created: str
    nextTry: str | None
    tries: list[WebhookTry]


class WebhookDeliveries(TypedDict):
    jobid: str
    deliveries: list[WebhookDelivery]
