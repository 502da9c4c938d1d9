"""The façade the API, the CLI and the tests all call: one method per thing a client can do."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from dreamserve.accounts import check_models, models_served, parse_account, summary
from dreamserve.admission import Admission
from dreamserve.assets import check_image
from dreamserve.catalogue import UPSCALE_TIERS, Catalogue
from dreamserve.dispatch.base import Dispatcher
from dreamserve.engines.base import Upscaler
from dreamserve.errors import (
    AccountNotFound,
    AssetNotFound,
    BadRequest,
    IdempotencyConflict,
    InvalidParameter,
    JobNotFound,
    JobNotRunning,
    NotFound,
    OperatorOnlyEngine,
    SharedAccount,
    Unauthorized,
)
from dreamserve.events import JobEvents
from dreamserve.fields import integer
from dreamserve.ids import (
    AssetRef,
    IdFactory,
    JobType,
    asset_id,
    is_account_id,
    iso_millis,
    new_token,
    parse_asset_id,
    parse_jobid,
    parse_token,
    unquoted,
)
from dreamserve.jobs import CANCELLED_BY_USER, Job, Spec, Status, millis, record
from dreamserve.outbox import Webhooks
from dreamserve.storage import account_queries, asset_queries, queries, webhook_queries
from dreamserve.storage.account_queries import Account
from dreamserve.storage.blobs import EXTENSIONS, BlobStore
from dreamserve.storage.database import Database
from dreamserve.storage.tables import SHARED
from dreamserve.submission import (
    REF_NAMES,
    parse_image_submission,
    parse_upscale_submission,
)
from dreamserve.webhooks import ReplyUrlRefused, Resolver, check_reply_url, resolve

DEFAULT_ACCOUNT = "LOCAL:procedural"
T = TypeVar("T")
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


@dataclass(frozen=True)
class ServiceConfig:
    token_cache_seconds: float = 60.0
    max_attempts: int = 3  # starts of one job before a restart gives up on it
    finished_cache_seconds: float = 60.0  # how long a finished job is served from memory
    finished_cache_size: int = 10_000
    # An unfinished job's record is served from memory too, until its next change, in the
    # server that makes every change of its jobs (SQLite); this bounds how long a change from
    # another process (a CLI `accounts remove`) goes unseen.
    unfinished_cache_seconds: float = 1.0
    lease_seconds: float = 30.0  # an unclaimed job's lease, as a runner's (RunnerConfig)
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 70_000_000  # of an upscale's output
    max_upload_pixels: int = 36_000_000
    upload_decodes: int = 2  # uploads decoded at once
    webhook_allow_private: bool = False  # replyUrls on loopback, private, link-local hosts
    idempotency_seconds: float = 86_400.0  # how long an Idempotency-Key names its job
    max_wait_seconds: int = 60  # of GET /images/<jobid>?wait=
    keepalive_seconds: float = 15.0  # between comments on a quiet event stream


class Service:
    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        catalogue: Catalogue,
        admission: Admission,
        dispatcher: Dispatcher,
        ids: IdFactory,
        clock: Callable[[], datetime],
        config: ServiceConfig,
        webhooks: Webhooks,
        events: JobEvents,
        resolver: Resolver = resolve,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.catalogue = catalogue
        self.admission = admission
        self.dispatcher = dispatcher
        self.ids = ids
        self.clock = clock
        self.config = config
        self.webhooks = webhooks  # signing secrets, deliveries, redelivery
        self.events = events
        self.resolver = resolver
        self._tokens: dict[str, tuple[int, float]] = {}
        self._decoding = asyncio.Semaphore(config.upload_decodes)
        # Finished jobs never change and clients poll them: their records are kept in memory,
        # (user, jobid) -> (until, link expiry, record); a new link window makes a new record.
        self._finished: dict[tuple[int, str], tuple[float, int, Record]] = {}
        # jobid -> (user, until, link expiry, record), dropped when the job changes; only in
        # the process that runs the jobs of a database no other server writes (`resume`).
        self._unfinished: dict[str, tuple[int, float, int, Record]] = {}
        self._sees_every_change = False
        self.events.on_change(self._changed)

    @property
    def _lease_ms(self) -> int:
        return int(self.config.lease_seconds * 1000)

    # Identity

    async def authenticate(self, authorization: str | None) -> int:
        """The user id of an `Authorization: Bearer <token>` header; Unauthorized otherwise.

        Known tokens are remembered for `token_cache_seconds`, so polling costs no token query.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            raise Unauthorized
        digest = _hash(token)
        cached = self._tokens.get(digest)  # only well-formed tokens are ever remembered
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        if parse_token(token) is None:
            raise Unauthorized
        user_id = await self.db.read(lambda conn: queries.user_of_token(conn, digest))
        if user_id is None or user_id != parse_token(token):
            raise Unauthorized
        if len(self._tokens) >= 10_000:
            self._tokens.clear()
        self._tokens[digest] = (user_id, time.monotonic() + self.config.token_cache_seconds)
        return user_id

    async def create_token(self, user_id: int | None = None) -> tuple[int, str]:
        """A new token for `user_id`, or for a new user when None. Only its hash is stored."""
        now = millis(self.clock())

        def create(conn: Connection) -> tuple[int, str]:
            if user_id is None:
                owner = queries.insert_user(conn, now)
            elif queries.user_exists(conn, user_id):
                owner = user_id
            else:
                raise NotFound(f"User {user_id} not found")
            token = new_token(owner)
            queries.insert_token(conn, owner, _hash(token), now)
            return owner, token

        return await self.db.write(create)

    async def bootstrap(self) -> str | None:
        """On the first start of an empty database: user 1, its token (returned, never stored in
        clear) and the shared procedural account. None on every later start."""
        now = millis(self.clock())

        def first_start(conn: Connection) -> str | None:
            if queries.count_users(conn):
                return None
            user_id = queries.insert_user(conn, now)
            token = new_token(user_id)
            queries.insert_token(conn, user_id, _hash(token), now)
            region, _, email = DEFAULT_ACCOUNT.partition(":")
            account_queries.insert_account(
                conn,
                name=DEFAULT_ACCOUNT,
                owner=SHARED,
                email=email,
                region=region,
                engine="procedural",
                max_jobs=10,
                now=now,
            )
            return token

        return await self.db.write(first_start)

    # Images

    async def submit_image(
        self, user_id: int, fields: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Submitted:
        """Validate, admit and dispatch an image job; its record, status `created`. With an
        Idempotency-Key used before (24 h) with the same fields: the job it made, unchanged."""
        submission = parse_image_submission(fields, self.catalogue)
        width, height = submission.size
        spec = Spec(
            width=width,
            height=height,
            count=submission.count,
            seed=submission.seed,
            strength=submission.image_strength,
            references=tuple(ref.uri for ref in submission.references),
        )

        def admit(conn: Connection) -> Job:
            self._check_references(conn, user_id, submission.references)
            account = self.admission.admit(
                conn,
                user_id=user_id,
                model=submission.model,
                account=submission.account,
                max_jobs=submission.max_jobs,
            )
            return self._insert_job(
                conn,
                account,
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

    async def submit_upscale(
        self, user_id: int, fields: Mapping[str, Any], idempotency_key: str | None = None
    ) -> Submitted:
        """Validate an upscale of a completed image job's image, admit it on that job's account
        and dispatch it; its record, status `created`, type `upscale`."""
        submission = parse_upscale_submission(fields)
        jobid = unquoted(submission.jobid)

        def admit(conn: Connection) -> Job:
            source = queries.job_by_jobid(conn, jobid, user_id)
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
                conn,
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
                    detail=submission.detail_strength,
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
        admit: Callable[[Connection], Job],
    ) -> Submitted:
        """Check the replyUrl's host, run `admit` (slot and job in one transaction) and
        dispatch the job; or, for a key already used, the job the key made (no slot, no job,
        no dispatch)."""
        if idempotency_key is None:
            await self._check_reply_url(reply_url)
            job = await self._admitted(admit)
            await self.dispatcher.dispatch(job.id)
            return Submitted(record(job, self.blobs.link))
        if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise BadRequest("Header Idempotency-Key must be 1-255 printable ASCII characters")
        key = idempotency_key
        fingerprint = _fingerprint(kind, fields)
        now = millis(self.clock())
        fresh_since = now - int(self.config.idempotency_seconds * 1000)

        def made_by_key(conn: Connection) -> Job | None:
            used = webhook_queries.key_use(conn, user_id, key)
            if used is None or used.created_at < fresh_since:
                return None
            if used.fingerprint != fingerprint:
                raise IdempotencyConflict(key)
            return queries.job_by_id(conn, used.job_id)  # the key goes with its job

        # A replay needs no slot and no DNS: a retry during a resolver outage gets its job.
        made = await self.db.read(made_by_key)
        if made is not None:
            return Submitted(record(made, self.blobs.link), replayed=True)
        await self._check_reply_url(reply_url)

        def admit_once(conn: Connection) -> tuple[Job, bool]:
            # One request per key at a time (PostgreSQL): a duplicate waits here for the first
            # to commit and then finds its job, instead of competing for the last free slot.
            webhook_queries.lock_key(conn, user_id, key)
            made = made_by_key(conn)
            if made is not None:
                return made, True
            job = admit(conn)
            webhook_queries.remember_key(
                conn, user_id, key, fingerprint, job.id, now=now, stale_before=fresh_since
            )
            return job, False

        try:
            job, replayed = await self.db.write(admit_once)
        except IntegrityError:  # the same jobid made at once elsewhere: a new serial differs
            job, replayed = await self.db.write(admit_once)
        if not replayed:
            await self.dispatcher.dispatch(job.id)
        return Submitted(record(job, self.blobs.link), replayed=replayed)

    async def _check_reply_url(self, url: str | None) -> None:
        if url is None or self.config.webhook_allow_private:
            return
        try:
            await check_reply_url(url, self.resolver)
        except ReplyUrlRefused as refused:
            raise InvalidParameter(
                "replyUrl", url, f"an http or https URL of a public host ({refused})"
            ) from None

    def _insert_job(
        self,
        conn: Connection,
        account: Account,
        *,
        kind: JobType,
        user_id: int,
        model: str,
        request: Mapping[str, Any],
        spec: Spec,
        forecast_cost: float,
    ) -> Job:
        """A new job on the account it was admitted to, leased until a runner claims it."""
        at = self.clock()
        created_at = millis(at)
        jobid = self.ids.jobid(kind, user_id, account.name, at)
        job_id = queries.insert_job(
            conn,
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
            lease_until=created_at + self._lease_ms,
        )
        return Job(
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
        )

    async def _admitted(self, admit: Callable[[Connection], T]) -> T:
        try:
            return await self.db.write(admit)
        except IntegrityError:  # another process made the same jobid: a new serial differs
            return await self.db.write(admit)

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

    async def get_job(self, user_id: int, jobid: str, wait: float = 0) -> Record:
        """The job's record; JobNotFound when the user has no such job. With `wait` seconds,
        an unfinished job's record once it ends or the time is up, whichever comes first: the
        request waits on the job's notifications, holding no database connection."""
        jobid = unquoted(jobid)
        if wait <= 0:
            return await self._record(user_id, jobid)
        deadline = time.monotonic() + wait
        with self.events.watch(jobid) as watch:
            body = await self._record(user_id, jobid)
            while body["status"] == Status.CREATED:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if await watch.changed(remaining) and not watch.ended:
                    continue  # progress: an end is all a waiter wants
                body = await self._record(user_id, jobid)
            return body

    def wait_seconds(self, text: str) -> int:
        """The `wait` query parameter of GET /images/<jobid>: whole seconds, at most 60."""
        return integer({"wait": text}, "wait", 0, self.config.max_wait_seconds) or 0

    async def job_events(self, user_id: int, jobid: str) -> AsyncIterator[Record | None]:
        """The job's record now, then again on each change, until it ended (the last one is
        the final record); None after `keepalive_seconds` without a change. JobNotFound first
        when the user has no such job."""
        jobid = unquoted(jobid)
        with self.events.watch(jobid) as watch:
            body = await self._record(user_id, jobid)
            yield body
            while body["status"] == Status.CREATED:
                if not await watch.changed(self.config.keepalive_seconds):
                    yield None
                    continue
                latest = await self._record(user_id, jobid)
                if latest != body:
                    body = latest
                    yield body

    async def _record(self, user_id: int, jobid: str) -> Record:
        if parse_jobid(jobid) is None:  # no query for what cannot be a job id
            raise JobNotFound(jobid)
        key = (user_id, jobid)
        window = self.blobs.link_expiry()
        now = time.monotonic()
        cached = self._finished.get(key)
        if cached is not None and cached[0] > now and cached[1] == window:
            return cached[2]
        running = self._unfinished.get(jobid)
        if running is not None:
            owner, fresh_until, link_window, kept = running
            if owner == user_id and fresh_until > now and link_window == window:
                return kept
        generation = self.events.generation
        job = await self.db.read(lambda conn: queries.job_by_jobid(conn, jobid, user_id))
        if job is None:
            raise JobNotFound(jobid)
        body = Record(record(job, self.blobs.link))
        if job.status.is_terminal:
            if len(self._finished) >= self.config.finished_cache_size:
                self._finished.clear()
            until = now + self.config.finished_cache_seconds
            self._finished[key] = (until, window, body)
        elif self._sees_every_change and self.events.generation == generation:
            # No change was published while the job was read: the record is current until
            # the next one, which drops it (`_changed`).
            if len(self._unfinished) >= self.config.finished_cache_size:
                self._unfinished.clear()
            until = now + self.config.unfinished_cache_seconds
            self._unfinished[jobid] = (user_id, until, window, body)
        return body

    def _changed(self, jobid: str) -> None:
        self._unfinished.pop(jobid, None)

    async def open_link(self, key: str, expires: str | None, signature: str | None) -> bytes | Path:
        """What a link of the blob store points at (a file to stream, or bytes); Forbidden when
        the link is tampered or expired, NotFound when the blob is gone (BlobStore.open_link)."""
        return await self.blobs.open_link(key, expires, signature)

    def models(self) -> list[dict[str, Any]]:
        return [model.describe() for model in self.catalogue.models]

    # Accounts

    async def put_account(self, user_id: int | None, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace (upsert) an account of a user, or a shared one when `user_id` is
        None (the operator, through the CLI); its summary. Saving an account clears its error.
        """
        spec = parse_account(fields, self.catalogue, self.admission.engines)
        if user_id is not None and self.admission.engines.operator_only(spec.engine):
            raise OperatorOnlyEngine(spec.engine)
        probe = self.admission.engines.probe(spec.engine, spec.settings, spec.sealed)
        try:
            check_models(spec, probe, self.catalogue)
        finally:
            await probe.close()
        owner = SHARED if user_id is None else user_id
        now = millis(self.clock())

        def put(conn: Connection) -> Account:
            if user_id is not None:
                _require_user(conn, user_id)
            others = [
                each for each in account_queries.owners_of_name(conn, spec.name) if each != owner
            ]
            if owner != SHARED and SHARED in others:
                raise SharedAccount(spec.name)
            if owner == SHARED and others:
                raise BadRequest(
                    f"Account {spec.name} already exists as an account of user {others[0]}"
                )
            values: dict[str, Any] = {
                "email": spec.email,
                "region": spec.region,
                "engine": spec.engine,
                "max_jobs": spec.max_jobs,
                "now": now,
                "settings": spec.settings,
                "sealed": spec.sealed,
                "models": spec.models,
            }
            existing = account_queries.account_named(conn, owner, spec.name)
            if existing is None:
                account_queries.insert_account(conn, name=spec.name, owner=owner, **values)
            else:
                account_queries.update_account(conn, existing.id, **values)
            saved = account_queries.account_named(conn, owner, spec.name)
            assert saved is not None
            return saved

        try:
            account = await self.db.write(put)
        except IntegrityError:  # the same new account saved at once by another request
            account = await self.db.write(put)
        self.admission.forget()
        return self._summary(account)

    async def list_accounts(self, user_id: int | None) -> dict[str, dict[str, Any]]:
        """The accounts a user may use (own and shared), or the shared ones for None."""

        def read(conn: Connection) -> list[Account]:
            if user_id is None:
                return account_queries.shared_accounts(conn)
            _require_user(conn, user_id)
            return account_queries.usable_accounts(conn, user_id)

        return {account.name: self._summary(account) for account in await self.db.read(read)}

    async def get_account(self, user_id: int | None, name: str) -> dict[str, Any]:
        """One account the user may use, with what its engine says of itself (`details`);
        AccountNotFound otherwise."""
        name = unquoted(name)
        account = await self.db.read(lambda conn: _visible(conn, user_id, name))
        body = self._summary(account)
        describe = getattr(self.admission.usable_engine(account), "describe", None)
        if describe is not None:
            body["details"] = describe()
        return body

    async def delete_account(self, user_id: int | None, name: str) -> dict[str, Any]:
        """Delete a user's own account (a shared one for None) and cancel its unfinished jobs."""
        name = unquoted(name)
        now = millis(self.clock())

        def remove(conn: Connection) -> tuple[int, list[tuple[int, str]], int]:
            account = _visible(conn, user_id, name)
            if user_id is not None and account.is_shared:
                raise SharedAccount(name)
            # Lock the row first: an admission on it either committed before (its job is
            # cancelled below) or waits and then finds no account.
            account_queries.lock_account(conn, account.id)
            cancelled = queries.cancel_account_jobs(
                conn, account.id, CANCELLED_BY_USER, f"Account {name} was deleted", now
            )
            self.events.announce(conn, [jobid for _, jobid in cancelled], ended=True)
            account_queries.delete_account(conn, account.id)
            if user_id is None:
                return account.id, cancelled, len(account_queries.shared_accounts(conn))
            return account.id, cancelled, len(account_queries.usable_accounts(conn, user_id))

        account_id, cancelled, remaining = await self.db.write(remove)
        self.admission.forget()
        self.admission.engines.retire(account_id)
        self.events.publish([jobid for _, jobid in cancelled], ended=True)
        for job_id, _ in cancelled:
            self.dispatcher.cancel(job_id)
        return {"account": name, "deleted": True, "remaining": remaining}

    def _summary(self, account: Account) -> dict[str, Any]:
        engine = self.admission.usable_engine(account)
        if engine is None:  # an engine this server lacks, or secrets it cannot open
            return summary(account, list(account.models or ()))
        return summary(account, models_served(engine, account.models, self.catalogue))

    # Scheduler

    async def scheduler(self, user_id: int) -> dict[str, Any]:
        """The user's jobs that hold a slot, by account, with the seconds since submission."""
        jobs = await self.db.read(lambda conn: queries.unfinished_jobs_of(conn, user_id))
        now = millis(self.clock())
        executing: dict[str, list[dict[str, Any]]] = {}
        for job in jobs:
            entry: dict[str, Any] = {
                "jobid": job.jobid,
                "model": job.model,
                "elapsedSeconds": max(0, (now - job.created_at) // 1000),
            }
            if "replyUrl" in job.request:
                entry["replyUrl"] = job.request["replyUrl"]
            executing.setdefault(job.account, []).append(entry)
        return {"executing": executing, "total": len(jobs)}

    async def cancel_job(self, user_id: int, jobid: str) -> Record:
        """End an unfinished job as failed / `Cancelled by user`, free its slot at once and stop
        its engine; its record. JobNotFound when unknown, JobNotRunning when already ended."""
        jobid = unquoted(jobid)
        if parse_jobid(jobid) is None:
            raise JobNotFound(jobid)
        now = millis(self.clock())

        def cancel(conn: Connection) -> Job:
            job = queries.job_by_jobid(conn, jobid, user_id)
            if job is None:
                raise JobNotFound(jobid)
            ended = not job.status.is_terminal and queries.finish_job(
                conn, job, status=Status.FAILED, now=now, error=CANCELLED_BY_USER
            )
            if not ended:
                raise JobNotRunning(jobid)
            self.events.announce(conn, [jobid], ended=True)
            cancelled = queries.job_by_id(conn, job.id)
            assert cancelled is not None
            return cancelled

        job = await self.db.write(cancel)
        self.events.publish([jobid], ended=True)
        self.dispatcher.cancel(job.id)
        return Record(record(job, self.blobs.link))

    # Assets

    async def usable_account(self, user_id: int, name: str) -> Account:
        """The account called `name` that the user may use; AccountNotFound otherwise."""
        name = unquoted(name)
        return await self.db.read(lambda conn: _visible(conn, user_id, name))

    async def upload_asset(
        self, user_id: int, account: Account, media: str, data: bytes
    ) -> dict[str, Any]:
        """Store an uploaded image on an account the user may use (`usable_account`); its
        assetRef. The bytes must be a complete image of `media` (BadRequest saying what is
        wrong otherwise)."""
        loop = asyncio.get_running_loop()
        async with self._decoding:  # a small file can decode to a large image: few at a time
            checked = await loop.run_in_executor(
                None, check_image, data, media, self.config.max_upload_pixels
            )
        at = self.clock()
        item_id = self.ids.item_id(at)
        key = f"uploads/{at:%Y/%m/%d}/{item_id}.{EXTENSIONS[checked.format]}"
        await self.blobs.put(key, data)

        def insert(conn: Connection) -> None:
            asset_queries.insert_upload(
                conn,
                item_id=item_id,
                user_id=user_id,
                account_id=account.id,
                account=account.name,
                uri=key,
                width=checked.width,
                height=checked.height,
                image_format=checked.format,
                size=len(data),
                now=millis(at),
            )

        try:
            await self.db.write(insert)
        except BaseException:
            await self.blobs.delete(key)  # no file without its row
            raise
        ref = AssetRef(account.name, checked.width, checked.height, len(data), key)
        return {
            "assetRef": str(ref),
            "account": account.name,
            "width": checked.width,
            "height": checked.height,
            "size": len(data),
        }

    async def list_assets(
        self, user_id: int, account_name: str, fields: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The user's generated images on an account, newest first, a page at a time."""
        account_name = unquoted(account_name)
        count = integer(fields, "count", 1, 100) or 20
        offset = integer(fields, "offset", 0, 2**31 - 1) or 0

        def page(conn: Connection) -> list[asset_queries.Asset]:
            _visible(conn, user_id, account_name)
            return asset_queries.generated_page(conn, user_id, account_name, count + 1, offset)

        found = await self.db.read(page)
        more = len(found) > count
        return {
            "assets": [self._listed(asset) for asset in found[:count]],
            "hasMore": more,
            "nextOffset": offset + count if more else None,
            "account": account_name,
        }

    def _listed(self, asset: asset_queries.Asset) -> dict[str, Any]:
        ref = AssetRef(asset.account, asset.width, asset.height, asset.size, asset.uri)
        return {
            "assetId": asset_id(asset.account, asset.item_id),
            "itemId": asset.item_id,
            "type": "image",
            "description": asset.description,
            "assetRef": str(ref),
            "imageUrl": self.blobs.link(asset.uri),
            "width": asset.width,
            "height": asset.height,
            "format": asset.format,
            "createdAt": iso_millis(asset.created_at),
        }

    async def delete_asset(self, user_id: int, text: str) -> dict[str, Any]:
        """Delete one of the user's assets and its file; AssetNotFound otherwise."""
        text = unquoted(text)
        parsed = parse_asset_id(text)
        if parsed is None:
            raise AssetNotFound(text)
        account, item_id = parsed

        # The job's record keeps listing the image (so that imageIndex keeps meaning the same
        # image): its link answers 404 and it is no reference or upscale source any more.
        def remove(conn: Connection) -> str:
            asset = asset_queries.asset_by_item(conn, user_id, account, item_id)
            if asset is None:
                raise AssetNotFound(text)
            asset_queries.delete_asset(conn, asset.id)
            return asset.uri

        await self.blobs.delete(await self.db.write(remove))
        return {"deleted": True, "assetId": text, "account": account}

    # Lifecycle

    async def resume(self) -> list[str]:
        """Become the process that runs this database's jobs and pick up those an earlier one
        left unfinished; the jobids given up on. AnotherRunner when a server already runs them.

        With the runner lock held, every unfinished job is an orphan and every taken slot
        belongs to one. Jobs started `max_attempts` times fail; the others run again, and slot
        counts are set back to the number of unfinished jobs.
        """
        if not await self.db.lock_runner():
            raise AnotherRunner
        self._sees_every_change = not self.db.shared
        now = millis(self.clock())

        def recover(conn: Connection) -> tuple[list[str], list[int]]:
            abandoned = queries.fail_exhausted_jobs(
                conn, self.config.max_attempts, "Server stopped while the job was running", now
            )
            self.events.announce(conn, abandoned, ended=True)  # waiters on other servers
            account_queries.recount_slots(conn)
            return abandoned, queries.release_unfinished_jobs(conn, now + self._lease_ms)

        abandoned, pending = await self.db.write(recover)
        for job_id in pending:
            await self.dispatcher.dispatch(job_id)
        return abandoned


class Record(dict[str, Any]):
    """A job record as a dict, and its JSON once asked for (kept: finished records are served
    again and again). Treat it as read-only."""

    _json: bytes | None = None

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = orjson.dumps(self)
        return self._json


class Submitted(Record):
    """The record of a submission, and whether it is the job an Idempotency-Key made before."""

    def __init__(self, body: Mapping[str, Any], *, replayed: bool = False) -> None:
        super().__init__(body)
        self.replayed = replayed


class AnotherRunner(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "Another dreamserve server runs the jobs of this database: run one server per "
            "data directory (or database)"
        )


def _require_user(conn: Connection, user_id: int) -> None:
    """API callers exist (they hold a token); the CLI names users by number, and an account's
    owner is no foreign key: an account left to a mistyped user would go to a later one."""
    if not queries.user_exists(conn, user_id):
        raise NotFound(f"User {user_id} not found")


def _visible(conn: Connection, user_id: int | None, name: str) -> Account:
    """The account called `name` that the user may use (their own first, then a shared one),
    or the shared one for None; AccountNotFound otherwise."""
    if not is_account_id(name):  # no query for what cannot be an account id
        raise AccountNotFound(name)
    owners = [SHARED] if user_id is None else [user_id, SHARED]
    for owner in owners:
        account = account_queries.account_named(conn, owner, name)
        if account is not None:
            return account
    raise AccountNotFound(name)


def _fingerprint(kind: str, fields: Mapping[str, Any]) -> str:
    """What makes two submissions the same request: the endpoint and every field's value."""
    canonical = json.dumps(
        [kind, fields], sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
