"""The reaper: takes jobs back from runners that stopped renewing their lease, and deletes jobs
past retention.

A runner renews its job's lease while it works (worker.py). A lease that ran out means the runner
is gone (a crashed worker, a task that died): the job runs again, or fails once it was started
`max_attempts` times, and its slot is released exactly once by whichever ends it. Finished jobs
are kept `retention_days`, then deleted with their images (the rows first, then the files).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from dreamserve import observe
from dreamserve.dispatch.base import Dispatcher
from dreamserve.errors import DatabaseBusy
from dreamserve.jobs import millis
from dreamserve.storage import job_queries, webhook_claims, webhook_queries
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.job_store import JobStore, JobTransaction

log = logging.getLogger(__name__)

RUNNER_LOST = "The job's runner stopped while the job was running"
HOSTS_KEPT_MS = 86_400_000  # a receiver host's failures, a day after the last (not cooling)


@dataclass(frozen=True)
class ReaperConfig:
    interval: float = 5.0
    max_attempts: int = 3
    retention_days: float = 30.0
    lease_seconds: float = 30.0  # a requeued job's lease until a runner claims it
    batch: int = 500  # jobs deleted per transaction
    idempotency_seconds: float = 86_400.0  # Idempotency-Keys older than this are deleted


@dataclass(frozen=True)
class Sweep:
    requeued: list[int]  # job ids dispatched again
    failed: list[str]  # jobids given up on
    deleted_files: int = 0  # images of jobs past retention


class Reaper:
    def __init__(
        self,
        store: JobStore,
        blobs: BlobStore,
        dispatcher: Dispatcher,
        clock: Callable[[], datetime],
        config: ReaperConfig,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.dispatcher = dispatcher
        self.clock = clock
        self.config = config

    async def sweep(self) -> Sweep:
        """One pass: expired leases, then jobs past retention."""
        now = millis(self.clock())

        lease = now + int(self.config.lease_seconds * 1000)
        expired = await self.store.db.read(lambda conn: job_queries.expired_leases(conn, now))
        sweep = Sweep([], [])
        for job_id, attempt, jobid in expired:  # one transaction each: no job waits on another
            if attempt < self.config.max_attempts:
                requeue = partial(
                    JobTransaction.requeue,
                    job_id=job_id,
                    jobid=jobid,
                    attempt=attempt,
                    now=now,
                    lease_until=lease,
                )
                if await self.store.write(requeue):
                    sweep.requeued.append(job_id)
                continue

            def fail(tx: JobTransaction, job_id: int = job_id, attempt: int = attempt) -> bool:
                job = job_queries.job_by_id(tx.conn, job_id)
                if job is None or job.attempts != attempt:
                    return False
                failed = tx.fail(job, RUNNER_LOST, None, now, expired_before=now)
                if failed:
                    tx.committed.append(partial(observe.job_failed, job, RUNNER_LOST))
                return failed

            if await self.store.write(fail):
                sweep.failed.append(jobid)
        for job_id in sweep.requeued:
            await self.dispatcher.dispatch(job_id)
        await self._queues(now)
        keys_before = now - int(self.config.idempotency_seconds * 1000)

        def forget(conn: Connection) -> None:
            webhook_queries.forget_keys_before(conn, keys_before)
            webhook_claims.forget_hosts_before(conn, now - HOSTS_KEPT_MS)

        await self.store.db.write(forget)
        return replace(sweep, deleted_files=await self._forget_old_jobs(now))

    async def _queues(self, now: int) -> None:
        """Jobs waiting for a slot: those whose `queueSeconds` ran out fail, and free slots go
        to the waiting (a slot that freed while a job joined the queue, a cap raised, a restart);
        the promoted jobs are dispatched by the store."""
        overdue = await self.store.db.read(lambda conn: job_queries.overdue_waits(conn, now))
        for job_id, _jobid, seconds in overdue:

            def give_up(tx: JobTransaction, job_id: int = job_id, seconds: int = seconds) -> bool:
                job = job_queries.job_by_id(tx.conn, job_id)
                error = f"Timed out waiting for capacity after {seconds} s"
                if job is None or not tx.give_up_waiting(job, error, now):
                    return False
                tx.committed.append(partial(observe.job_failed, job, error))
                return True

            await self.store.write(give_up)
        accounts = await self.store.db.read(job_queries.accounts_to_promote)
        for account_id in accounts:
            await self.store.write(partial(JobTransaction.promote, account_id=account_id, now=now))

    async def _forget_old_jobs(self, now: int) -> int:
        before = now - int(self.config.retention_days * 86_400_000)
        deleted = 0
        while True:
            jobs, keys = await self.store.write(lambda tx: tx.expire(before, self.config.batch))
            for key in keys:  # a crash here leaves files without rows: harmless, never the reverse
                await self.blobs.delete(key)
            deleted += len(keys)
            if jobs < self.config.batch:
                return deleted

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval)
            try:
                await self.sweep()
            except DatabaseBusy:  # another process holds the database: next round
                log.warning("reaper sweep put off: the database is busy")
            except OperationalError as error:  # unreachable (restarting): a line, not a trace
                log.warning("reaper sweep failed: the database is unreachable (%s)", error.orig)
            except Exception:  # an outage of the database: try again next round
                log.exception("reaper sweep failed")
