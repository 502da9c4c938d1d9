"""The jobs that hold slots: a user's list, cancelling one, and taking over the running of a
database's jobs when a server starts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from dreamserve import replies
from dreamserve.dispatch.base import Dispatcher
from dreamserve.errors import JobNotFound, JobNotRunning
from dreamserve.ids import parse_jobid, unquoted
from dreamserve.jobs import CANCELLED_BY_USER, Job, millis, record
from dreamserve.service.config import ServiceConfig
from dreamserve.service.records import Record, Records
from dreamserve.storage import job_queries
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.job_store import JobStore, JobTransaction


class Scheduler:
    def __init__(
        self,
        *,
        store: JobStore,
        blobs: BlobStore,
        dispatcher: Dispatcher,
        records: Records,
        clock: Callable[[], datetime],
        config: ServiceConfig,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.dispatcher = dispatcher
        self.records = records
        self.clock = clock
        self.config = config

    async def running(self, user_id: int) -> replies.Scheduler:
        """The user's jobs that hold a slot, by account, with the seconds since submission."""
        jobs = await self.store.db.read(lambda conn: job_queries.unfinished_jobs_of(conn, user_id))
        now = millis(self.clock())
        executing: dict[str, list[replies.ExecutingJob]] = {}
        for job in jobs:
            entry: replies.ExecutingJob = {
                "jobid": job.jobid,
                "model": job.model,
                "elapsedSeconds": max(0, (now - job.created_at) // 1000),
            }
            if job.spec.reply_url is not None:
                entry["replyUrl"] = job.spec.reply_url
            executing.setdefault(job.account, []).append(entry)
        return {"executing": executing, "total": len(jobs)}

    async def cancel(self, user_id: int, jobid: str) -> Record:
        """End an unfinished job as failed / `Cancelled by user`, free its slot at once and stop
        its engine; its record. JobNotFound when unknown, JobNotRunning when already ended."""
        jobid = unquoted(jobid)
        if parse_jobid(jobid) is None:
            raise JobNotFound(jobid)
        now = millis(self.clock())

        def cancel(tx: JobTransaction) -> Job:
            job = job_queries.job_by_jobid(tx.conn, jobid, user_id)
            if job is None:
                raise JobNotFound(jobid)
            if not tx.cancel(job, CANCELLED_BY_USER, now):
                raise JobNotRunning(jobid)
            cancelled = job_queries.job_by_id(tx.conn, job.id)
            assert cancelled is not None
            return cancelled

        job = await self.store.write(cancel)
        self.dispatcher.cancel(job.id)
        return Record(record(job, self.blobs.link))

    async def resume(self) -> list[str]:
        """Become the process that runs this database's jobs and pick up those an earlier one
        left unfinished; the jobids given up on. AnotherRunner when a server already runs them.

        With the runner lock held, every unfinished job is an orphan and every taken slot
        belongs to one. Jobs started `max_attempts` times fail; the others run again, and slot
        counts are set back to the number of unfinished jobs.
        """
        db = self.store.db
        if not await db.lock_runner():
            raise AnotherRunner
        if not db.shared:
            self.records.sees_every_change()
        now = millis(self.clock())

        error = "Server stopped while the job was running"
        lease = now + self.config.lease_ms
        abandoned = await self.store.write(
            lambda tx: tx.recover(self.config.max_attempts, error, now, lease)
        )
        for job_id in await self.store.queued():
            await self.dispatcher.dispatch(job_id)
        return abandoned


class AnotherRunner(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "Another dreamserve server runs the jobs of this database: run one server per "
            "data directory (or database)"
        )
