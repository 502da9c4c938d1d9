"""The webhook deliverer: sends the outbox, signed, and retries on the schedule of rules.py.

A background task of every server. It claims due deliveries (conditional UPDATEs, so servers
sharing a database never send one twice at once; fair between users and receiver hosts, see
storage/webhook_claims.py), POSTs the job record as GET returns it at the
time of the try (fresh image links on every try), signs it the Standard Webhooks way with the
user's secrets, and records every try. It wakes when a job of this process ends, when another
process announces an end, and every `poll_seconds` for whatever else came due.

The receiver's address is checked again at every new connection (outbound.py): the host is
resolved once, every address checked with `netguard.refusal`, and the connection goes to one of
those checked addresses, so a DNS change after submission cannot reach a private address. A
refused address is never connected to: the try is recorded with the refusal and the delivery
ends `refused`, the same whether anything listens there or not. Redirects are not followed (a
3xx is retried), and at most `max_response_bytes` of an answer are read.

Every try tells the receiver's host's health: an answer (any status) clears it, no answer (a
timeout, a refused or dropped connection) counts one more failure in a row, and enough of them
cool the host down (rules.host_cooldown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from random import Random

import httpx
from sqlalchemy import Connection

from dreamserve import __version__, observe
from dreamserve.errors import DatabaseBusy
from dreamserve.events import JobEvents
from dreamserve.jobs import Job, millis, record
from dreamserve.netguard import HostRefused, Resolver, resolve
from dreamserve.outbound import guarded_client
from dreamserve.storage import job_queries, webhook_claims, webhook_queries
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.database import Database
from dreamserve.storage.webhook_claims import Fairness
from dreamserve.storage.webhook_queries import PENDING, Delivery, Try
from dreamserve.webhooks.keys import WebhookSecrets
from dreamserve.webhooks.rules import (
    HOST_FAILURES,
    TRIES,
    host_cooldown,
    retry_delay,
    should_retry,
    signature,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryConfig:
    timeout: float = 10.0  # per try: connect, send, answer
    claim_grace: float = 20.0  # a claim holds its delivery this long past the try's timeout
    allow_private: bool = False  # DREAMSERVE_WEBHOOK_ALLOW_PRIVATE
    concurrency: int = 32  # tries in flight at once, this process
    per_user: int = 8  # tries in flight at once for one user, every process together
    per_host: int = 8  # tries in flight at once to one receiver host, every process together
    poll_seconds: float = 1.0
    max_response_bytes: int = 1024  # of a receiver's answer, kept for the try's error


class Deliverer:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        secrets: WebhookSecrets,
        events: JobEvents,
        clock: Callable[[], datetime],
        config: DeliveryConfig,
        rng: Random | None = None,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.secrets = secrets
        self.events = events
        self.clock = clock
        self.config = config
        self.rng = rng or Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._interrupted: list[Delivery] = []  # claimed, their tries cancelled unrecorded
        self._wake = events.endings()
        self._backlog = False  # the last round filled every free place: more may be due
        self.resolver: Resolver = resolve  # receivers' hosts; tests put a fake one here
        self.client = guarded_client(
            lambda host, port: self.resolver(host, port),  # at each connection, as it is then
            allow_private=config.allow_private,
            timeout=config.timeout,
            # identity: the bytes read of an answer are bounded before any decompression
            headers={
                "user-agent": f"dreamserve/{__version__} (webhooks)",
                "accept-encoding": "identity",
            },
        )

    def wake(self) -> None:
        """Look for due deliveries now (tests that move the clock, redeliveries)."""
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.deliver_due()
            except DatabaseBusy:  # another process holds the database: the next round
                log.warning("webhook delivery round put off: the database is busy")
            except Exception:  # the database is away: try again at the next round
                log.exception("webhook delivery round failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_seconds):
                    await self._wake.wait()

    async def deliver_due(self) -> int:
        """Start a try of every due delivery (as many as there is room for); how many."""
        room = self.config.concurrency - len(self._tasks)
        if room <= 0:
            return 0
        now = millis(self.clock())
        due = await self.db.read(webhook_queries.next_due)
        if due is None or due > now:  # a read, not a write: most jobs that end have no webhook
            self._backlog = False
            return 0
        # Past the try and its record, whatever happens (DREAMSERVE_WEBHOOK_CLAIM_GRACE_SECONDS)
        hold = now + int((self.config.timeout + self.config.claim_grace) * 1000)
        fairness = Fairness(self.config.per_user, self.config.per_host, HOST_FAILURES)
        claimed, self._backlog = await self.db.write(
            lambda conn: webhook_claims.claim_due(conn, now, hold, room, TRIES, fairness)
        )
        for delivery in claimed:
            task = asyncio.create_task(self._deliver(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._done)
        return len(claimed)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # A place came free (in the pool, or under a user's or host's cap) and more is due:
        # claim it now, not at the poll.
        if self._backlog:
            self._wake.set()

    async def drain(self) -> None:
        """Wait for the tries in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._release_interrupted()
        await self.client.aclose()

    async def _release_interrupted(self) -> None:
        """The deliveries whose tries the shutdown cut short (a receiver may have the request):
        due again now, so that the next start sends them at once (same webhook-id), rather
        than when their claims run out."""
        interrupted, self._interrupted = self._interrupted, []
        if not interrupted:
            return
        now = millis(self.clock())
        try:
            await self.db.write(lambda conn: webhook_queries.release(conn, interrupted, now))
        except Exception as error:  # as after a crash: due when their claims run out
            log.warning(
                "webhook deliveries cut short by the shutdown not released (%s)",
                type(error).__name__,
            )

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            await self._try(delivery)
        except asyncio.CancelledError:  # the server stops (close)
            self._interrupted.append(delivery)
            raise
        except DatabaseBusy:
            # The try may have reached the receiver: recording a failure would be untrue. The
            # claim runs out and the delivery is sent again (webhook-id unchanged, so a
            # receiver that already has it can tell).
            log.warning(
                "webhook delivery %s: try not recorded, the database is busy", delivery.message_id
            )
        except Exception as failure:  # never lose the loop to one delivery
            log.exception("webhook delivery %s failed", delivery.message_id)
            # Recorded as a failed try, so that the schedule goes on (and ends) as for any other.
            error = f"Delivery failed in the server: {type(failure).__name__}"
            attempt = Try(millis(self.clock()), None, error, 0)
            try:
                await self._record(delivery, attempt, refused=False, heard=None)
            except Exception:  # the database is away: the claim expires and the row is due again
                log.exception("webhook delivery %s: try not recorded", delivery.message_id)

    async def _try(self, delivery: Delivery) -> None:
        def read(conn: Connection) -> Job | None:
            return job_queries.job_by_id(conn, delivery.job_id)

        job = await self.db.read(read)
        if job is None:  # deleted past retention meanwhile: nothing left to send
            return
        keys = await self.secrets.signing_keys(delivery.user_id)
        body = json.dumps(record(job, self.blobs.link), ensure_ascii=False, separators=(",", ":"))
        sent_at = self.clock()
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.message_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": signature(keys, delivery.message_id, sent_at, body),
        }
        started = time.monotonic()
        status_code: int | None = None
        answer = bytearray()
        refused = False
        try:
            # The whole try, answer included, within the timeout: httpx's own timeout bounds
            # each read, and a receiver could trickle its answer for ever.
            async with (
                asyncio.timeout(self.config.timeout),
                self.client.stream(
                    "POST", delivery.url, content=body.encode(), headers=headers
                ) as response,
            ):
                status_code = response.status_code
                await _read_some(response, self.config.max_response_bytes, answer)
            error = None if 200 <= status_code < 300 else _answer_error(status_code, answer)
        except HostRefused as denied:  # before connecting: nothing was sent, nothing learnt
            refused, error = True, f"Refused: {denied}"
        except (TimeoutError, httpx.TimeoutException):
            late = f"No answer within {self.config.timeout:g} s"
            if status_code is None:
                error = late
            elif 200 <= status_code < 300:
                error = None  # a 2xx is a 2xx, however slowly its body comes
            else:
                error = f"{_answer_error(status_code, answer)} ({late.lower()} in full)"
        except httpx.HTTPError as failure:
            error = type(failure).__name__ + (f": {failure}" if str(failure) else "")
        duration = int((time.monotonic() - started) * 1000)
        attempt = Try(millis(sent_at), status_code, _printable(error), duration)
        heard = None if refused else status_code is not None  # refused: nothing was sent
        await self._record(delivery, attempt, refused=refused, heard=heard, jobid=job.jobid)

    async def _record(
        self,
        delivery: Delivery,
        attempt: Try,
        *,
        refused: bool,
        heard: bool | None,
        jobid: str | None = None,
    ) -> None:
        """Record the try and, `heard` not None, whether the receiver's host answered."""
        status, next_at = self._next(delivery, attempt, refused)
        ended = attempt.at + attempt.duration_ms

        def write(conn: Connection) -> float | None:
            webhook_queries.record_try(conn, delivery, attempt, status=status, next_at=next_at)
            if heard:
                webhook_claims.host_answered(conn, delivery.host)
            elif heard is not None:
                cooldown = host_cooldown(webhook_claims.host_failed(conn, delivery.host, ended))
                if cooldown is not None:
                    webhook_claims.cool_host(conn, delivery.host, ended + int(cooldown * 1000))
                return cooldown
            return None

        cooldown = await self.db.write(write)
        observe.webhook_tried(
            jobid=jobid,
            user=delivery.user_id,
            host=delivery.host,
            outcome=status,
            status=attempt.status_code,
            duration_ms=attempt.duration_ms,
            error=attempt.error,
            tries=delivery.tries,
            latency_ms=ended - delivery.created_at if status == "delivered" else None,
        )
        if cooldown is not None:
            log.warning(
                "webhook receiver %s cools down for %g s: its last tries got no answer",
                delivery.host,
                cooldown,
            )

    def _next(self, delivery: Delivery, attempt: Try, refused: bool) -> tuple[str, int | None]:
        if refused:
            return "refused", None
        code = attempt.status_code
        if code is not None and not should_retry(code):
            return ("stopped" if code == 410 else "delivered"), None
        delay = retry_delay(delivery.tries, self.rng)
        if delay is None:
            return "failed", None
        return PENDING, attempt.at + int(delay * 1000)


async def _read_some(response: httpx.Response, limit: int, into: bytearray) -> None:
    """At most `limit` bytes of an answer, into `into` as they come; the rest is never read."""
    async for chunk in response.aiter_raw():
        into += chunk[: limit - len(into)]
        if len(into) >= limit:
            return


def _answer_error(status_code: int, answer: bytes | bytearray) -> str:
    text = bytes(answer).decode("utf-8", "replace").strip()
    return f"HTTP {status_code}" + (f": {text}" if text else "")


def _printable(text: str | None) -> str | None:
    """A receiver's words as the database can keep and a listing can show them: control
    characters (NUL above all, which PostgreSQL refuses) become U+FFFD."""
    if text is None:
        return None
    return "".join(ch if ch.isprintable() or ch in "\t\n" else "\ufffd" for ch in text)
