"""The jobs that hold slots: a user's list, cancelling one, and taking over the running of a
database's jobs when a server starts (and keeping it, or giving it up, while it runs)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from dreamserve import observe, replies
from dreamserve.dispatch.base import Dispatcher
from dreamserve.errors import JobNotFound, JobNotRunning
from dreamserve.ids import parse_jobid, unquoted
from dreamserve.jobs import CANCELLED_BY_USER, Job, millis, record
from dreamserve.service.config import ServiceConfig
from dreamserve.service.records import Record, Records
from dreamserve.storage import job_queries
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.database import RunnerLock
from dreamserve.storage.job_store import JobStore, JobTransaction

log = logging.getLogger(__name__)


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
        observe.job_cancelled(job)
        self.dispatcher.cancel(job.id)
        return Record(record(job, self.blobs.link))

    async def resume(self) -> list[str]:
        """Become a process that runs this database's jobs and, when it is the only one, pick
        up those an earlier one left unfinished; the jobids given up on. AnotherRunner when a
        server already runs them on SQLite (one runs the jobs of a SQLite database).

        When this process alone holds the runner lock, every unfinished job is an orphan and
        every taken slot belongs to one. Jobs started `max_attempts` times fail; the others run
        again, and slot counts are set back to the number of unfinished jobs. On PostgreSQL
        with other processes running jobs, nothing is taken over: the jobs of a process that
        died run again once their leases run out (the reaper of any process).
        """
        db = self.store.db
        if not await db.lock_runner():
            if not db.shared:
                raise AnotherRunner
            return []
        if not db.shared:
            self.records.sees_every_change()
        now = millis(self.clock())

        error = "Server stopped while the job was running"
        lease = now + self.config.lease_ms
        abandoned = await self.store.write(
            lambda tx: tx.recover(self.config.max_attempts, error, now, lease)
        )
        for job in abandoned:
            observe.job_failed(job, error)
        await db.share_runner_lock()  # the jobs are recovered: others may run jobs now
        for job_id in await self.store.queued():
            await self.dispatcher.dispatch(job_id)
        return [job.jobid for job in abandoned]

    async def keep_runner_lock(self, every: float) -> None:
        """After `resume`: check every `every` seconds that this process still holds the
        runner lock. Returns once another process holds it, this process's runners stopped
        (PostgreSQL takes a lost lock again shared, beside the others: never TAKEN there now;
        the branch stays for a database whose lock is exclusive).

        A lock lost but free (on PostgreSQL, its connection ended and no other server took it)
        is taken again, and nothing is resumed: the jobs running here go on, the others are
        queued or another process's that admitted them, and a lease that runs out is the
        reaper's as always. A lock another server took means that server resumed, or will
        resume, every unfinished job, those running here too: the dispatcher is closed, so
        every engine here is told to stop and no job is claimed here any more. The jobs are
        left as they are, for the holder: it resumed them when it took the lock, or its reaper
        requeues them once their leases run out. Both may run a job only until the next check
        (`every`) and the moment the engine takes to stop. (A server that took the lock and let
        it go between two checks resumed the jobs running here too: their runners' writes are
        fenced by attempt, so they stop at their next renewal and write nothing.)
        """
        while True:
            await asyncio.sleep(every)
            try:
                lock = await self.store.db.keep_runner_lock()
            except Exception as error:  # the database unreachable: its runners stop on their own
                log.warning("runner lock not checked (%s); checking again", type(error).__name__)
                continue
            if lock is RunnerLock.RETAKEN:
                log.warning("runner lock lost with its database connection, and taken again")
            elif lock is RunnerLock.TAKEN:
                log.error(
                    "runner lock lost to another dreamserve server: this one stops running "
                    "jobs (they are the holder's to run) and serves only the API"
                )
                await self.dispatcher.close()
                return


class AnotherRunner(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "Another dreamserve server runs the jobs of this database: run one server per "
            "data directory (or database)"
        )
