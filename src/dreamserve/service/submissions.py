"""Submissions: an image or upscale request validated, admitted on an account (a slot and the
job in one transaction) and dispatched; Idempotency-Keys; the catalogue as clients see it."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from dreamserve import observe
from dreamserve.admission import Admission
from dreamserve.catalogue import UPSCALE_TIERS, Catalogue
from dreamserve.dispatch.base import Dispatcher
from dreamserve.engines.base import Upscaler
from dreamserve.errors import (
    AtCapacity,
    BadRequest,
    IdempotencyConflict,
    InvalidParameter,
    NotFound,
    Stopping,
)
from dreamserve.ids import AssetRef, IdFactory, JobType, unquoted
from dreamserve.jobs import Job, Spec, Status, millis, record
from dreamserve.netguard import HostRefused, Resolver, check_host, resolve
from dreamserve.service.config import ServiceConfig
from dreamserve.service.records import Submitted
from dreamserve.storage import asset_queries, job_queries, webhook_queries
from dreamserve.storage.account_queries import Account
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.job_store import JobStore, JobTransaction
from dreamserve.submission import (
    MAX_SEED,
    REF_NAMES,
    parse_image_submission,
    parse_upscale_submission,
)

T = TypeVar("T")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


class Submissions:
    def __init__(
        self,
        *,
        store: JobStore,
        blobs: BlobStore,
        catalogue: Catalogue,
        admission: Admission,
        dispatcher: Dispatcher,
        ids: IdFactory,
        clock: Callable[[], datetime],
        config: ServiceConfig,
        resolver: Resolver = resolve,
    ) -> None:
        self.store = store
        self.db = store.db
        self.blobs = blobs
        self.catalogue = catalogue
        self.admission = admission
        self.dispatcher = dispatcher
        self.ids = ids
        self.clock = clock
        self.config = config
        self.resolver = resolver  # replyUrl hosts; tests put a fake one here
        self.stopping = False  # set at SIGTERM (app.stop_admitting): every submission a 503

    def admitting(self) -> None:
        """Raise Stopping (503, Retry-After) once the server is stopping: before a submission's
        body is read."""
        if self.stopping:
            raise Stopping(self.admission.retry_after)

    def models(self) -> list[dict[str, Any]]:
        return [model.describe() for model in self.catalogue.models]

    def catalogue_listing(self) -> dict[str, Any]:
        """GET /models (and MCP's list_models): the models, and the one a job without `model`
        gets (the studio preselects it)."""
        return {"models": self.models(), "default": self.catalogue.default_model}

    async def image(
        self, user_id: int, fields: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Submitted:
        """Validate, admit and dispatch an image job; its record, status `created`. With an
        Idempotency-Key used before (24 h) with the same fields: the job it made, unchanged."""
        submission = parse_image_submission(fields, self.catalogue)
        width, height = submission.size
        # No seed: one picked here and kept in the spec, so that every attempt of the job (a
        # retry, a restart) makes the same images and the record can report it. The request's
        # echo stays as the client sent it.
        seed = submission.seed if submission.seed is not None else secrets.randbelow(MAX_SEED + 1)
        spec = Spec(
            width=width,
            height=height,
            count=submission.count,
            seed=seed,
            strength=submission.image_strength,
            references=tuple(ref.uri for ref in submission.references),
            reference_pixels=tuple(ref.width * ref.height for ref in submission.references),
            prompt=submission.prompt,
            reply_url=submission.reply_url,
            reply_ref=submission.reply_ref,
        )

        def admit(tx: JobTransaction) -> Job:
            self._check_references(tx.conn, user_id, submission.references)
            self.admission.limits.check(tx.conn, user_id)
            waits = None
            try:
                account = self.admission.admit(
                    tx.conn,
                    user_id=user_id,
                    model=submission.model,
                    account=submission.account,
                    max_jobs=submission.max_jobs,
                )
            except AtCapacity:
                if not submission.queue_seconds:
                    raise
                # No free slot: the job waits in the queue of the eligible account with the
                # fewest waiting, for up to queueSeconds.
                account = self.admission.enqueue(
                    tx.conn,
                    user_id=user_id,
                    model=submission.model,
                    account=submission.account,
                    limit=self.config.queue_limit,
                )
                waits = submission.queue_seconds
            return self._insert_job(
                tx,
                account,
                waits=waits,
                kind="image",
                user_id=user_id,
                model=submission.model.name,
                request=submission.echo,
                spec=spec,
                forecast_cost=submission.model.forecast_cost,
            )

        return await self._submit(
            user_id, "image", fields, idempotency_key, submission.reply_url, admit
        )

    async def upscale(
        self, user_id: int, fields: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Submitted:
        """Validate an upscale of a completed image job's image, admit it on that job's account
        and dispatch it; its record, status `created`, type `upscale`."""
        submission = parse_upscale_submission(fields)
        jobid = unquoted(submission.jobid)

        def admit(tx: JobTransaction) -> Job:
            conn = tx.conn
            source = job_queries.job_by_jobid(conn, jobid, user_id)
            if source is None or source.type != "image":
                raise NotFound("Source image job not found")
            if source.status is not Status.COMPLETED:
                raise BadRequest(f"Source image job is {source.status.value}, must be completed")
            if submission.image_index >= len(source.images):
                valid = f"integer 0-{len(source.images) - 1}, the images of job {jobid}"
                raise InvalidParameter("imageIndex", submission.image_index, valid)
            model = self.catalogue.get(source.model)
            if model is None:
                raise BadRequest(f"Model {source.model} of the source job is no longer served")
            image = source.images[submission.image_index]
            if not asset_queries.existing_assets(conn, user_id, [image.ref(source.account)]):
                valid = f"an image of job {jobid} that was not deleted"
                raise InvalidParameter("imageIndex", submission.image_index, valid)
            width, height = self._upscale_size(submission.resolution, image.width / image.height)
            self.admission.limits.check(conn, user_id)
            account = self.admission.admit(
                conn,
                user_id=user_id,
                model=model,
                account=source.account,
                max_jobs=submission.max_jobs,
            )
            engine = self.admission.usable_engine(account)
            if engine is None:  # admitted on its own model list, but its secrets are unreadable
                raise BadRequest(
                    f"Account {account.name} cannot be used: its secrets cannot be read"
                )
            if not isinstance(engine, Upscaler):
                raise BadRequest(
                    f"Account {account.name} cannot upscale: engine {account.engine} does not"
                )
            return self._insert_job(
                tx,
                account,
                kind="upscale",
                user_id=user_id,
                model=source.model,
                request={**submission.echo, "jobid": jobid},
                spec=Spec(
                    width=width,
                    height=height,
                    count=1,
                    strength=submission.original_strength,
                    references=(image.uri,),
                    reference_pixels=(image.width * image.height,),
                    detail=submission.detail_strength,
                    reply_url=submission.reply_url,
                    reply_ref=submission.reply_ref,
                ),
                forecast_cost=0,
            )

        return await self._submit(
            user_id, "upscale", fields, idempotency_key, submission.reply_url, admit
        )

    async def _submit(
        self,
        user_id: int,
        kind: JobType,
        fields: Mapping[str, Any],
        idempotency_key: str | None,
        reply_url: str | None,
        admit: Callable[[JobTransaction], Job],
    ) -> Submitted:
        """Check the replyUrl's host, run `admit` (slot and job in one transaction) and
        dispatch the job; or, for a key already used, the job the key made (no slot, no job,
        no dispatch)."""
        if idempotency_key is None:
            await self._check_host(reply_url)
            job = await self._admitted(admit)
            await self._dispatch(job)
            return Submitted(record(job, self.blobs.link))
        if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise BadRequest("Header Idempotency-Key must be 1-255 printable ASCII characters")
        key = idempotency_key
        request_fingerprint = fingerprint(kind, fields)
        now = millis(self.clock())
        fresh_since = now - int(self.config.idempotency_seconds * 1000)

        def made_by_key(conn: Connection) -> Job | None:
            used = webhook_queries.key_use(conn, user_id, key)
            if used is None or used.created_at < fresh_since:
                return None
            if used.fingerprint != request_fingerprint:
                raise IdempotencyConflict(key)
            return job_queries.job_by_id(conn, used.job_id)  # the key goes with its job

        # A replay needs no slot and no DNS: a retry during a resolver outage gets its job.
        made = await self.db.read(made_by_key)
        if made is not None:
            return Submitted(record(made, self.blobs.link), replayed=True)
        await self._check_host(reply_url)

        def admit_once(tx: JobTransaction) -> tuple[Job, bool]:
            conn = tx.conn
            # One request per key at a time (PostgreSQL): a duplicate waits here for the first
            # to commit and then finds its job, instead of competing for the last free slot.
            webhook_queries.lock_key(conn, user_id, key)
            made = made_by_key(conn)
            if made is not None:
                return made, True
            job = admit(tx)
            webhook_queries.remember_key(
                conn, user_id, key, request_fingerprint, job.id, now=now, stale_before=fresh_since
            )
            return job, False

        job, replayed = await self._admitted(admit_once)
        if not replayed:
            await self._dispatch(job)
        return Submitted(record(job, self.blobs.link), replayed=replayed)

    async def _dispatch(self, job: Job) -> None:
        """Send an admitted job to a runner; a job that waits for a slot is promoted instead
        when one is free now (one freed while it was being admitted), else when one frees."""
        if job.queue_deadline is None:
            await self.dispatcher.dispatch(job.id, job.account)
            return
        now = millis(self.clock())
        await self.store.write(lambda tx: tx.promote_account_of(job.id, now))

    async def _check_host(self, url: str | None) -> None:
        if url is None or self.config.webhook_allow_private:
            return
        try:
            await check_host(url, self.resolver)
        except HostRefused as refused:
            raise InvalidParameter(
                "replyUrl", url, f"an http or https URL of a public host ({refused})"
            ) from None

    def _insert_job(
        self,
        tx: JobTransaction,
        account: Account,
        *,
        kind: JobType,
        user_id: int,
        model: str,
        request: Mapping[str, Any],
        spec: Spec,
        forecast_cost: float,
        waits: int | None = None,
    ) -> Job:
        """A new job on the account it was admitted to, leased until a runner claims it; or,
        `waits` seconds, waiting in that account's queue (no slot, no lease)."""
        at = self.clock()
        created_at = millis(at)
        queue_deadline = None if waits is None else created_at + waits * 1000
        jobid = self.ids.jobid(kind, user_id, account.name, at)
        job_id = tx.admit(
            jobid=jobid,
            kind=kind,
            user_id=user_id,
            account_id=account.id,
            account=account.name,
            model=model,
            request=request,
            spec=spec,
            forecast_cost=forecast_cost,
            created_at=created_at,
            lease_until=None if waits is not None else created_at + self.config.lease_ms,
            queue_deadline=queue_deadline,
        )
        job = Job(
            id=job_id,
            jobid=jobid,
            type=kind,
            status=Status.CREATED,
            model=model,
            account=account.name,
            user_id=user_id,
            request=request,
            spec=spec,
            forecast_cost=forecast_cost,
            created_at=created_at,
            queue_deadline=queue_deadline,
        )
        tx.committed.append(partial(observe.job_admitted, job, account.engine))
        return job

    async def _admitted(self, admit: Callable[[JobTransaction], T]) -> T:
        try:
            return await self.store.write(admit)
        except IntegrityError:  # another process made the same jobid: a new serial differs
            return await self.store.write(admit)

    def _upscale_size(self, tier: str, aspect: float) -> tuple[int, int]:
        if not self.catalogue.upscale_sizes:
            raise BadRequest("Upscale is not available: the model catalogue has no upscale sizes")
        width, height = self.catalogue.upscale_size(tier, aspect)
        limit = self.config.max_image_pixels
        if width * height > limit:
            valid = ", ".join(
                name
                for name in UPSCALE_TIERS
                if (size := self.catalogue.upscale_size(name, aspect))[0] * size[1] <= limit
            )
            raise InvalidParameter(
                "upscaleResolution",
                tier,
                f"{valid or 'none'} ({tier} is {width}x{height}, over the limit of {limit} pixels)",
            )
        return width, height

    def _check_references(self, conn: Connection, user_id: int, refs: tuple[AssetRef, ...]) -> None:
        existing = asset_queries.existing_assets(conn, user_id, refs)
        for name, ref in zip(REF_NAMES, refs, strict=False):
            if ref not in existing:
                raise InvalidParameter(name, str(ref), "an assetRef of an existing image of yours")


def fingerprint(kind: str, fields: Mapping[str, Any]) -> str:
    """What makes two submissions the same request: the endpoint and every field's value."""
    canonical = json.dumps(
        [kind, fields], sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
