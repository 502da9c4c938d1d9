"""The job: its states and the transitions between them, its stored images, and the record the
API returns for it.

Pure: dataclasses and functions over the standard library and `ids`. The transitions are made,
each in its transaction, by the job store (storage/job_store.py), the one place that writes a
job's state. The record's shape is `replies.JobRecord`, declared there with the API's other
replies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple, TypedDict, cast

from dreamserve.ids import AssetRef, JobType, asset_id, epoch_millis, iso_millis
from dreamserve.replies import ImageFormat, ImageOut, JobRecord, JobResponse


class Status(StrEnum):
    """The contract's three statuses. A running job is still `created`, with `started` set."""

    CREATED = "created"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self is not Status.CREATED


CANCELLED_BY_USER = "Cancelled by user"


class Phase(StrEnum):
    """Where a job is in its life. The contract's `created` covers three phases: waiting (in
    its account's queue for a slot, `queueSeconds`: it holds none), queued (it holds a slot, no
    runner has it) and running (a runner claimed it and holds its lease)."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (Phase.COMPLETED, Phase.FAILED)


class Transition(StrEnum):
    ADMIT = "admit"  # a slot taken and the job made, in one transaction
    WAIT = "wait"  # no slot free: the job made, waiting in its account's queue
    PROMOTE = "promote"  # a waiting job takes a slot that freed
    CLAIM = "claim"  # a runner starts it (a new attempt)
    PROGRESS = "progress"  # its runner renews the lease, with its progress
    FINISH = "finish"  # its runner stored its images
    FAIL = "fail"  # its engine failed, its runner was lost too often, or a restart gave up
    CANCEL = "cancel"  # by its user, or with its account
    REQUEUE = "requeue"  # its lease ran out (a runner or a dispatch lost), or a restart
    EXPIRE = "expire"  # deleted with its images, past retention


@dataclass(frozen=True)
class Rule:
    """What a transition may start from and leads to (None: no job, before admit and after
    expire), what it does to the account's slot, and whether waiters are told of it."""

    sources: frozenset[Phase | None]
    target: Phase | None
    slot: int = 0  # +1 takes one, -1 gives it back
    announced: bool = True

    def allows(self, phase: Phase | None) -> bool:
        return phase in self.sources

    @property
    def ends(self) -> bool:
        return self.target is not None and self.target.is_terminal


_UNFINISHED: frozenset[Phase | None] = frozenset({Phase.WAITING, Phase.QUEUED, Phase.RUNNING})
_HOLDING: frozenset[Phase | None] = frozenset({Phase.QUEUED, Phase.RUNNING})  # a slot
_ENDED: frozenset[Phase | None] = frozenset({Phase.COMPLETED, Phase.FAILED})

# Every allowed transition, in one place. A transition from anywhere else changes nothing: the
# store's conditional statements only match the phases listed here, so a slot taken at admit is
# given back exactly once, by whichever transition ends the job first (a waiting job holds none:
# its end gives none back). Admit and wait are not announced (nobody can wait on a job whose id
# is not yet returned), nor is expire (the job is gone).
TRANSITIONS: Mapping[Transition, Rule] = {
    Transition.ADMIT: Rule(frozenset({None}), Phase.QUEUED, slot=+1, announced=False),
    Transition.WAIT: Rule(frozenset({None}), Phase.WAITING, announced=False),
    Transition.PROMOTE: Rule(frozenset({Phase.WAITING}), Phase.QUEUED, slot=+1),
    Transition.CLAIM: Rule(frozenset({Phase.QUEUED}), Phase.RUNNING),
    Transition.PROGRESS: Rule(frozenset({Phase.RUNNING}), Phase.RUNNING),
    Transition.FINISH: Rule(frozenset({Phase.RUNNING}), Phase.COMPLETED, slot=-1),
    Transition.FAIL: Rule(_UNFINISHED, Phase.FAILED, slot=-1),
    Transition.CANCEL: Rule(_UNFINISHED, Phase.FAILED, slot=-1),
    Transition.REQUEUE: Rule(_HOLDING, Phase.QUEUED),
    Transition.EXPIRE: Rule(_ENDED, None, announced=False),
}


@dataclass(frozen=True)
class StoredImage:
    """One output image as the job keeps it: enough to build its part of the record."""

    item_id: str
    uri: str
    width: int
    height: int
    format: str
    size: int
    # The seed it was made with, when its engine honours seeds (`seeded`): image i of a job of
    # seed s has seed s + i. None for an upscale, an engine that does not, or an image stored
    # before seeds were recorded.
    seed: int | None = None

    def ref(self, account: str) -> AssetRef:
        return AssetRef(account, self.width, self.height, self.size, self.uri)

    def asset_ref(self, account: str) -> str:
        return str(self.ref(account))

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "itemId": self.item_id,
            "uri": self.uri,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "size": self.size,
        }
        if self.seed is not None:
            data["seed"] = self.seed
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredImage:
        return cls(
            item_id=data["itemId"],
            uri=data["uri"],
            width=data["width"],
            height=data["height"],
            format=data["format"],
            size=data["size"],
            seed=data.get("seed"),
        )


@dataclass(frozen=True)
class Spec:
    """What the engine is asked to make, fixed when the job is admitted."""

    width: int
    height: int
    count: int
    # Picked at random at admission when the request gave none; None only for an upscale, or a
    # job admitted before the server picked one.
    seed: int | None = None
    # imageStrength; for an upscale, originalImageStrength (the blend with a plain resample)
    strength: float = 0.5
    references: tuple[str, ...] = ()  # blob keys of the reference images (the upscale source)
    # Their width x height as stored (the render-memory estimate); empty for a job admitted
    # before they were recorded.
    reference_pixels: tuple[int, ...] = ()
    detail: float = 0.5  # an upscale's detailStrength
    # As validated at submission: later steps never read them back out of the client's request.
    prompt: str | None = None
    reply_url: str | None = None
    reply_ref: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "count": self.count,
            "seed": self.seed,
            "strength": self.strength,
            "references": list(self.references),
            "referencePixels": list(self.reference_pixels),
            "detail": self.detail,
            "prompt": self.prompt,
            "replyUrl": self.reply_url,
            "replyRef": self.reply_ref,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Spec:
        return cls(
            width=data["width"],
            height=data["height"],
            count=data["count"],
            seed=data.get("seed"),
            strength=data.get("strength", 0.5),
            references=tuple(data.get("references", ())),
            reference_pixels=tuple(data.get("referencePixels", ())),
            detail=data.get("detail", 0.5),
            prompt=data.get("prompt"),
            reply_url=data.get("replyUrl"),
            reply_ref=data.get("replyRef"),
        )


class EndedJob(NamedTuple):
    """A job that many were ended with at once (an account deleted, a start giving up on
    jobs): what its waiters, runners and the operator's log are told of it."""

    id: int
    jobid: str
    user_id: int
    account: str
    model: str


@dataclass(frozen=True)
class Job:
    """A job as stored. Times are milliseconds since the epoch, UTC."""

    id: int
    jobid: str
    type: JobType
    status: Status
    model: str
    account: str
    user_id: int
    request: Mapping[str, Any]
    spec: Spec
    forecast_cost: float
    created_at: int
    updated_at: int | None = None
    started_at: int | None = None
    progress: int | None = None
    error: str | None = None
    error_details: str | None = None
    images: tuple[StoredImage, ...] = field(default=())
    attempts: int = 0  # how many times a runner claimed it; fences the runner's writes
    queue_deadline: int | None = None  # while it waits for a slot: when it gives up

    @property
    def phase(self) -> Phase:
        if self.status is Status.CREATED:
            if self.queue_deadline is not None:
                return Phase.WAITING
            return Phase.RUNNING if self.started_at is not None else Phase.QUEUED
        return Phase(self.status.value)


def millis(at: datetime) -> int:
    return epoch_millis(at)


def from_millis(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def record(job: Job, link: Callable[[str], str]) -> JobRecord:
    """The job record of the contract (POST reply, GET reply, webhook body).

    `link` turns an image's storage key into a URL a client can fetch without a token.
    """
    times: _Times = {}
    if job.updated_at is not None:
        times["updated"] = iso_millis(job.updated_at)
    if job.status is Status.CREATED and job.started_at is not None:
        times["started"] = iso_millis(job.started_at)
        times["progress"] = job.progress or 0
    cost = job.forecast_cost
    response: JobResponse = {"forecastCost": int(cost) if float(cost).is_integer() else cost}
    if job.status is Status.COMPLETED:
        response["images"] = [_image(job.account, image, link) for image in job.images]
    failure: _Failure = {}
    if job.error is not None:
        failure["error"] = job.error
    if job.error_details is not None:
        failure["errorDetails"] = job.error_details
    return {
        "jobid": job.jobid,
        "type": job.type,
        "status": job.status.value,
        "model": job.model,
        "created": iso_millis(job.created_at),
        **times,
        "request": dict(job.request),
        "response": response,
        **failure,
        "code": 200,
    }


# The record's optional keys, gathered apart so that the record keeps the contract's key order;
# mypy checks them against JobRecord where they are unpacked.
class _Times(TypedDict, total=False):
    updated: str
    started: str
    progress: int
    queuePosition: int  # set by the records service (it takes a query), never here


class _Failure(TypedDict, total=False):
    error: str
    errorDetails: str


def _image(account: str, image: StoredImage, link: Callable[[str], str]) -> ImageOut:
    out: ImageOut = {
        "imageUrl": link(image.uri),
        "imageUri": image.uri,
        "width": image.width,
        "height": image.height,
        # What the encoder and the upload check store: jpeg, png or webp.
        "format": cast(ImageFormat, image.format),
        "assetId": asset_id(account, image.item_id),
        "assetRef": image.asset_ref(account),
        "itemId": image.item_id,
    }
    if image.seed is not None:
        out["seed"] = image.seed
    return out
