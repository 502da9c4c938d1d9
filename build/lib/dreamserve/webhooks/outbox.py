"""What a client can do with webhooks (the service façade's `webhooks` part): read and rotate
its signing secret, see a job's deliveries and their tries, redeliver."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import cast

from sqlalchemy import Connection

from dreamserve.errors import BadRequest, JobNotFound
from dreamserve.ids import iso_millis, parse_jobid, unquoted
from dreamserve.jobs import millis
from dreamserve.replies import DeliveryStatus, WebhookDeliveries, WebhookDelivery, WebhookSecret
from dreamserve.storage import job_queries, webhook_claims, webhook_queries
from dreamserve.storage.database import Database
from dreamserve.storage.webhook_queries import Delivery, Try
from dreamserve.webhooks.delivery import Deliverer
from dreamserve.webhooks.keys import Secrets, WebhookSecrets


class Webhooks:
    def __init__(
        self,
        db: Database,
        secrets: WebhookSecrets,
        deliverer: Deliverer,
        clock: Callable[[], datetime],
    ) -> None:
        self.db = db
        self.secrets = secrets
        self.deliverer = deliverer
        self.clock = clock

    async def secret(self, user_id: int) -> WebhookSecret:
        """The user's signing secret (made on first ask)."""
        return _secret_body(await self.secrets.get(user_id))

    async def rotate(self, user_id: int) -> WebhookSecret:
        """A new signing secret; the previous one signs beside it for 24 hours."""
        return _secret_body(await self.secrets.rotate(user_id))

    async def deliveries(self, user_id: int, jobid: str) -> WebhookDeliveries:
        """The deliveries of a job's record to its replyUrl, each with its tries."""
        jobid = unquoted(jobid)
        job_id = await self._job_id(user_id, jobid)
        found = await self.db.read(lambda conn: webhook_queries.deliveries_of(conn, job_id))
        return {"jobid": jobid, "deliveries": [_delivery_body(d, tries) for d, tries in found]}

    async def redeliver(self, user_id: int, jobid: str) -> WebhookDeliveries:
        """Send an ended job's record to its replyUrl again, now (a cooldown of its host ends
        for it); its deliveries."""
        jobid = unquoted(jobid)
        if parse_jobid(jobid) is None:  # no query for what cannot be a job id
            raise JobNotFound(jobid)
        now = millis(self.clock())

        def redeliver(conn: Connection) -> int:
            job = job_queries.job_by_jobid(conn, jobid, user_id)
            if job is None:
                raise JobNotFound(jobid)
            url = job.request.get("replyUrl")
            if not url:
                raise BadRequest(f"Job {jobid} has no replyUrl")
            if not job.status.is_terminal:
                raise BadRequest(f"Job {jobid} has not ended: its record is sent when it does")
            webhook_queries.redeliver(conn, job.id, user_id, url, now)
            webhook_claims.end_cooldown(conn, webhook_queries.receiver_host(url), now)
            return job.id

        await self.db.write(redeliver)
        self.deliverer.wake()
        return await self.deliveries(user_id, jobid)

    async def _job_id(self, user_id: int, jobid: str) -> int:
        if parse_jobid(jobid) is None:  # no query for what cannot be a job id
            raise JobNotFound(jobid)
        job = await self.db.read(lambda conn: job_queries.job_by_jobid(conn, jobid, user_id))
        if job is None:
            raise JobNotFound(jobid)
        return job.id


def _secret_body(secrets: Secrets) -> WebhookSecret:
    body: WebhookSecret = {"secret": secrets.current}
    if secrets.previous_until is not None:
        body["previousSecretExpires"] = iso_millis(secrets.previous_until)
    return body


def _delivery_body(delivery: Delivery, tries: list[Try]) -> WebhookDelivery:
    return {
        "webhookId": delivery.message_id,
        "url": delivery.url,
        "status": cast(DeliveryStatus, delivery.status),  # webhook_queries' statuses
        "created": iso_millis(delivery.created_at),
        "nextTry": None if delivery.next_at is None else iso_millis(delivery.next_at),
        "tries": [
            {
                "at": iso_millis(attempt.at),
                "statusCode": attempt.status_code,
                "error": attempt.error,
                "durationMs": attempt.duration_ms,
            }
            for attempt in tries
        ],
    }
