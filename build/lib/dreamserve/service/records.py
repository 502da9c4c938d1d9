"""Job records as clients read them: one now, one once the job ends (`?wait=`), or one per
change (the event stream); finished records, and in a lone server unfinished ones, served from
memory."""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import AsyncIterator, Collection, Mapping
from datetime import datetime
from typing import Any, cast

import orjson
from sqlalchemy import Connection

from dreamserve.errors import InvalidParameter, JobNotFound
from dreamserve.events import JobEvents
from dreamserve.fields import given, integer, text
from dreamserve.ids import epoch_millis, parse_jobid, unquoted
from dreamserve.jobs import Job, Phase, Status, record
from dreamserve.replies import JobPage, JobRecord
from dreamserve.service.config import ServiceConfig
from dreamserve.storage import job_queries
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.database import Database


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


class Records:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        events: JobEvents,
        config: ServiceConfig,
        models: Collection[str],
    ) -> None:
        self.db = db
        self.models = tuple(models)  # the catalogue's, in its order: what `?model=` takes
        self.blobs = blobs
        self.events = events
        self.config = config
        # Finished jobs never change and clients poll them: their records are kept in memory,
        # (user, jobid) -> (until, link expiry, record); a new link window makes a new record.
        self._finished: dict[tuple[int, str], tuple[float, int, Record]] = {}
        # jobid -> (user, until, link expiry, record), dropped when the job changes; only in
        # the process that runs the jobs of a database no other server writes (`resume`).
        self._unfinished: dict[str, tuple[int, float, int, Record]] = {}
        self._sees_every_change = False
        self.events.on_change(self._changed)

    def sees_every_change(self) -> None:
        """This process makes every change of its jobs (it runs them, and no other server
        writes the database): an unfinished record may be served from memory until it changes."""
        self._sees_every_change = True

    def forget(self) -> None:
        """Drop every record kept in memory, as a restart does."""
        self._finished.clear()
        self._unfinished.clear()

    async def get(self, user_id: int, jobid: str, wait: float = 0) -> Record:
        """The job's record; JobNotFound when the user has no such job. With `wait` seconds,
        an unfinished job's record once it ends or the time is up, whichever comes first (or
        as it is when the server starts to shut down): the request waits on the job's
        notifications, holding no database connection."""
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
                if await watch.changed(remaining) and not (watch.ended or watch.stopping):
                    continue  # progress: an end is all a waiter wants
                body = await self._record(user_id, jobid)
                if watch.stopping:  # the server shuts down: the record as it is now
                    break
            return body

    def wait_seconds(self, text: str) -> int:
        """The `wait` query parameter of GET /images/<jobid>: whole seconds, at most 60."""
        return integer({"wait": text}, "wait", 0, self.config.max_wait_seconds) or 0

    async def follow(self, user_id: int, jobid: str) -> AsyncIterator[Record | None]:
        """The job's record now, then again on each change, until it ended (the last one is
        the final record); None after `keepalive_seconds` without a change. When the server
        starts to shut down, the record as it is then (when it changed) and no more.
        JobNotFound first when the user has no such job."""
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
                if watch.stopping:
                    return

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
        job, position = await self.db.read(lambda conn: _job_and_position(conn, jobid, user_id))
        if job is None:
            raise JobNotFound(jobid)
        body = Record(record(job, self.blobs.link))
        if position is not None:
            # Waiting for a slot: where it stands moves as other jobs take slots, unannounced,
            # so this record is not kept.
            body["queuePosition"] = position
        elif job.status.is_terminal:
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

    async def page(self, user_id: int, fields: Mapping[str, Any]) -> JobPage:
        """GET /images: the user's jobs, newest first (by created time, then id), `limit` at a
        time (1-100, default 20), filtered by `status`, `model`, `account` and `since` (created
        at or after). `next` is the cursor of the page after this one, None on the last. A
        cursor holds a position only (a created time and an id): the user, and whatever
        filters come with it, apply as given, so another user's cursor lists this user's jobs
        from that position."""
        listing = job_queries.Listing(
            user_id,
            status=_status(fields),
            model=self._model(fields),
            account=text(fields, "account", 255),
            since=_since(fields),
            after=_cursor(fields),
        )
        limit = integer(fields, "limit", 1, MAX_PAGE) or DEFAULT_PAGE
        found = await self.db.read(lambda conn: job_queries.job_page(conn, listing, limit + 1))
        jobs: list[JobRecord] = []
        for job, position in found[:limit]:
            body = record(job, self.blobs.link)
            if position is not None:
                body["queuePosition"] = position
            jobs.append(body)
        more = len(found) > limit
        last = found[limit - 1][0] if more else None
        return {"jobs": jobs, "next": None if last is None else cursor_of(last)}

    def _model(self, fields: Mapping[str, Any]) -> str | None:
        model = given(fields, "model")
        if model is not None and model not in self.models:
            raise InvalidParameter("model", model, ", ".join(self.models))
        return cast(str | None, model)


MAX_PAGE = 100
DEFAULT_PAGE = 20
_STATUSES = tuple(status.value for status in Status)
_CURSOR = re.compile(r"(\d{1,15})\.(\d{1,10})")
_MAX_ID = 2**31 - 1  # the id column is a 32-bit integer on PostgreSQL


def cursor_of(job: Job) -> str:
    """The cursor of the page after `job`: its created time and id, base64url, unpadded."""
    return _encoded(job.created_at, job.id)


def _encoded(created_at: int, job_id: int) -> str:
    return base64.urlsafe_b64encode(f"{created_at}.{job_id}".encode()).decode().rstrip("=")


def _cursor(fields: Mapping[str, Any]) -> tuple[int, int] | None:
    value = given(fields, "cursor")
    if value is None:
        return None
    position: tuple[int, int] | None = None
    if isinstance(value, str) and value.isascii():
        try:
            decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
        except (binascii.Error, ValueError):
            decoded = ""
        match = _CURSOR.fullmatch(decoded)
        if match is not None and int(match.group(2)) <= _MAX_ID:
            position = int(match.group(1)), int(match.group(2))
    if position is None or _encoded(*position) != value:  # one spelling of each position
        raise InvalidParameter("cursor", value, "a cursor from a previous reply")
    return position


def _status(fields: Mapping[str, Any]) -> str | None:
    status = given(fields, "status")
    if status is not None and status not in _STATUSES:
        raise InvalidParameter("status", status, ", ".join(_STATUSES))
    return cast(str | None, status)


def _since(fields: Mapping[str, Any]) -> int | None:
    """`since`: an ISO 8601 time with its zone (`Z` or an offset), as the record's `created`."""
    value = given(fields, "since")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value)
            if at.tzinfo is not None:
                return epoch_millis(at)
        except (ValueError, OverflowError):
            pass
    raise InvalidParameter(
        "since", value, "an ISO 8601 time with its zone, e.g. 2026-03-02T14:05:30.123Z"
    )


def _job_and_position(conn: Connection, jobid: str, user_id: int) -> tuple[Job | None, int | None]:
    """The user's job, and where it stands in its account's queue while it waits for a slot."""
    job = job_queries.job_by_jobid(conn, jobid, user_id)
    if job is None or job.phase is not Phase.WAITING:
        return job, None
    return job, job_queries.queue_position(conn, job)
