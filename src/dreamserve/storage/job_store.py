"""The job store: the one owner of a job's life.

Every change of a job's state is one of the transitions of `jobs.TRANSITIONS`, made here as a
method of `JobTransaction` inside `JobStore.write`. Each returns whether it happened (its SQL only
matches the phases the table allows, so a transition from anywhere else changes nothing); one
that happened is announced inside the transaction (PostgreSQL NOTIFY, for waiters in other
processes) and published to this process's waiters after the commit, in one place, as its rule
says. A slot taken at admit is given back by whichever transition ends the job first, once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection

from dreamserve.events import JobEvents
from dreamserve.jobs import (
    TRANSITIONS,
    EndedJob,
    Job,
    Spec,
    Status,
    StoredImage,
    Transition,
)
from dreamserve.storage import account_queries, job_queries
from dreamserve.storage.database import Database

T = TypeVar("T")


class JobTransaction:
    """The transitions of jobs within one transaction. `conn` is the transaction's connection,
    for whatever else must commit with them (an account's error, an Idempotency-Key)."""

    def __init__(self, conn: Connection, events: JobEvents, lease_ms: int = 30_000) -> None:
        self.conn = conn
        self._events = events
        self._lease_ms = lease_ms  # of a job promoted from its account's queue
        self.changes: list[tuple[str, bool]] = []  # (jobid, ended), to publish after commit
        self.promoted: list[tuple[int, str]] = []  # (id, jobid), to dispatch after commit
        self.committed: list[Callable[[], None]] = []  # called once this commits (observe.py)

    def _made(self, transition: Transition, jobids: Sequence[str]) -> None:
        rule = TRANSITIONS[transition]
        if rule.announced and jobids:
            self._events.announce(self.conn, jobids, ended=rule.ends)
            self.changes.extend((jobid, rule.ends) for jobid in jobids)

    def admit(
        self,
        *,
        jobid: str,
        kind: str,
        user_id: int,
        account_id: int,
        account: str,
        model: str,
        request: Mapping[str, Any],
        spec: Spec,
        forecast_cost: float,
        created_at: int,
        lease_until: int | None,
        queue_deadline: int | None = None,
    ) -> int:
        """A new job, queued, on the account whose slot the caller took in this transaction
        (admission); its id. Leased until a runner claims it, so that a lost dispatch is found
        by the reaper. With `queue_deadline` it waits in the account's queue instead, holding
        no slot and no lease, until a slot frees (`promote`) or the deadline passes."""
        return job_queries.insert_job(
            self.conn,
            jobid=jobid,
            kind=kind,
            user_id=user_id,
            account_id=account_id,
            account=account,
            model=model,
            request=request,
            spec=spec,
            forecast_cost=forecast_cost,
            created_at=created_at,
            lease_until=lease_until,
            queue_deadline=queue_deadline,
        )

    def claim(self, job_id: int, now: int, lease_until: int) -> tuple[Job, int | None] | None:
        """Start a queued job (one more attempt), leased until `lease_until`: the job and its
        account id; None when it is not queued (a second delivery of the job does nothing)."""
        claimed = job_queries.claim_job(self.conn, job_id, now, lease_until)
        if claimed is not None:
            self._made(Transition.CLAIM, [claimed[0].jobid])
        return claimed

    def progress(self, job: Job, lease_until: int, percent: int | None, now: int) -> bool:
        """Renew the lease of the attempt `job` runs, with its progress when it changed; False
        when that attempt no longer runs it (ended, or taken back). A renewal without progress
        is no change a waiter sees: it is not announced."""
        renewed = job_queries.renew_lease(
            self.conn, job.id, job.attempts, lease_until, progress=percent, now=now
        )
        if renewed and percent is not None:
            self._made(Transition.PROGRESS, [job.jobid])
        return renewed

    def finish(
        self, job: Job, images: Sequence[StoredImage], description: str | None, now: int
    ) -> bool:
        """End the attempt `job` runs as completed, with its images; False when that attempt
        no longer runs it."""
        freed: list[int] = []
        finished = job_queries.finish_job(
            self.conn,
            job,
            status=Status.COMPLETED,
            now=now,
            attempt=job.attempts,
            images=images,
            description=description,
            freed=freed,
        )
        if finished:
            self._made(Transition.FINISH, [job.jobid])
        self._promote(freed, now)
        return finished

    def fail(
        self,
        job: Job,
        error: str,
        details: str | None,
        now: int,
        *,
        expired_before: int | None = None,
    ) -> bool:
        """End the attempt `job` runs as failed; False when that attempt no longer runs it.
        With `expired_before` (the reaper), only while its lease has not been renewed since."""
        freed: list[int] = []
        failed = job_queries.finish_job(
            self.conn,
            job,
            status=Status.FAILED,
            now=now,
            attempt=job.attempts,
            expired_before=expired_before,
            error=error,
            error_details=details,
            freed=freed,
        )
        if failed:
            self._made(Transition.FAIL, [job.jobid])
        self._promote(freed, now)
        return failed

    def cancel(self, job: Job, error: str, now: int) -> bool:
        """End an unfinished job as failed, whoever runs it (the runner learns it at its next
        renewal, or at once through the dispatcher); False when it had ended."""
        freed: list[int] = []
        cancelled = job_queries.finish_job(
            self.conn, job, status=Status.FAILED, now=now, error=error, freed=freed
        )
        if cancelled:
            self._made(Transition.CANCEL, [job.jobid])
        self._promote(freed, now)
        return cancelled

    def give_up_waiting(self, job: Job, error: str, now: int) -> bool:
        """End a job still waiting for a slot as failed (its `queueSeconds` ran out); False
        when it took a slot or ended meanwhile."""
        ended = job_queries.end_waiting(self.conn, job, error, now)
        if ended:
            self._made(Transition.FAIL, [job.jobid])
        return ended

    def promote_account_of(self, job_id: int, now: int) -> list[tuple[int, str]]:
        """`promote` the account of the job (the one whose queue it joined)."""
        account_id = job_queries.account_id_of(self.conn, job_id)
        return [] if account_id is None else self._promote([account_id], now)

    def promote(self, account_id: int, now: int) -> list[tuple[int, str]]:
        """Give the account's free slots to the jobs waiting in its queue (round robin by
        user); the promoted (id, jobid), dispatched by `JobStore.write` once this commits."""
        return self._promote([account_id], now)

    def _promote(self, account_ids: Sequence[int], now: int) -> list[tuple[int, str]]:
        made: list[tuple[int, str]] = []
        for account_id in account_ids:
            lease_until = now + self._lease_ms
            promoted = job_queries.promote_waiting(self.conn, account_id, now, lease_until)
            if promoted:
                self._made(Transition.PROMOTE, [jobid for _, jobid in promoted])
                made.extend(promoted)
        self.promoted.extend(made)
        return made

    def cancel_account(self, account_id: int, error: str, details: str, now: int) -> list[EndedJob]:
        """Cancel every unfinished job of an account, whose row stays locked until the
        transaction ends (for it to be deleted): an admission on it either committed before
        (its job is cancelled here) or waits, then finds no account; those jobs.

        The jobs' rows are locked before the account's, in the order in which a job that ends
        takes them (its row, then its account's to give its slot back): in the other order the
        two deadlock on PostgreSQL."""
        job_queries.lock_account_jobs(self.conn, account_id)
        account_queries.lock_account(self.conn, account_id)
        cancelled = job_queries.cancel_account_jobs(self.conn, account_id, error, details, now)
        self._made(Transition.CANCEL, [job.jobid for job in cancelled])
        return cancelled

    def requeue(self, job_id: int, jobid: str, attempt: int, now: int, lease_until: int) -> bool:
        """Take a job back from the runner of `attempt` (or its lost dispatch) whose lease ran
        out before `now`, so that it runs again; False when the lease was renewed or the job
        ended."""
        requeued = job_queries.requeue_job(self.conn, job_id, attempt, now, lease_until)
        if requeued:
            self._made(Transition.REQUEUE, [jobid])
        return requeued

    def recover(self, max_attempts: int, error: str, now: int, lease_until: int) -> list[EndedJob]:
        """At the start of the process that runs the database's jobs (it holds the runner
        lock, so every unfinished job is an orphan and every taken slot belongs to one): fail
        those started `max_attempts` times, requeue the others, and set every account's taken
        slots to its unfinished jobs. The jobs given up on."""
        failed = job_queries.fail_exhausted_jobs(self.conn, max_attempts, error, now)
        self._made(Transition.FAIL, [job.jobid for job in failed])
        requeued = job_queries.release_unfinished_jobs(self.conn, lease_until)
        self._made(Transition.REQUEUE, requeued)
        account_queries.recount_slots(self.conn)
        return failed

    def expire(self, before: int, limit: int) -> tuple[int, list[str]]:
        """Delete up to `limit` jobs that ended before `before`, with their assets: how many,
        and the blob keys of their images, for the caller to delete once this commits."""
        return job_queries.delete_finished_jobs(self.conn, before, limit)


# Sends a job promoted from its account's queue to a runner (the dispatcher's `dispatch`).
Dispatch = Callable[[int], Awaitable[None]]


class JobStore:
    def __init__(self, db: Database, events: JobEvents, lease_ms: int = 30_000) -> None:
        self.db = db
        self.events = events
        self.lease_ms = lease_ms
        self.dispatch: Dispatch | None = None  # set once the dispatcher exists

    async def write(self, change: Callable[[JobTransaction], T]) -> T:
        """Run `change` in one transaction; then tell this process's waiters of every
        transition it made, and dispatch the jobs it promoted from a queue."""
        made: list[JobTransaction] = []

        def run(conn: Connection) -> T:
            # A retried transaction starts anew.
            made[:] = [JobTransaction(conn, self.events, self.lease_ms)]
            return change(made[0])

        result = await self.db.write(run)
        if made:
            for call in made[0].committed:
                call()
            for ended in (False, True):
                jobids = [jobid for jobid, end in made[0].changes if end is ended]
                if jobids:
                    self.events.publish(jobids, ended=ended)
            if self.dispatch is not None:
                for job_id, _ in made[0].promoted:
                    await self.dispatch(job_id)
        return result

    def seen_ended(self, jobid: str) -> None:
        """A job found ended (or taken back) by a change another process made without telling
        this one (on SQLite, a CLI command): wake its waiters here to read it again."""
        self.events.publish([jobid], ended=True, surely=False)

    async def queued(self) -> list[int]:
        """The ids of the jobs waiting for a runner, oldest first (to dispatch at start)."""
        return await self.db.read(job_queries.queued_jobs)
