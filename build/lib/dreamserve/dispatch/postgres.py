"""The scale-out dispatcher: admitted jobs go through procrastinate, on the server's own
PostgreSQL, to whichever process works their account's queue (an API process that runs jobs,
or `dreamserve worker`).

procrastinate only carries the job's id: the runner (worker.JobRunner) claims the job by a
conditional update, so a job delivered twice runs once, and a job whose enqueue was lost (a
crash between the job's commit and its `defer`) keeps the lease admission gave it: when that
runs out, the reaper of any process takes it back and dispatches it again.

procrastinate's own rows follow the lease: each worker sends a heartbeat every third of the
lease, and a row left `doing` by a worker without one for a whole lease (SIGKILLed, its host
gone) is deleted by any process's sweep, never retried by procrastinate: the reaper already
sends the dreamserve job again when its lease runs out, and two deliveries would only cost a
refused claim. A procrastinate worker that stops on a database error (a listener that could not
reconnect, a heartbeat refused) is started again a second later; the jobs it ran go on (they
run in tasks of the dispatcher's, under their leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import psycopg
from procrastinate import App, PsycopgConnector
from procrastinate.app import WorkerOptions
from procrastinate.jobs import Status
from sqlalchemy.engine import make_url

from dreamserve.dispatch.base import Runner, run_guarded, wait_for_jobs

log = logging.getLogger(__name__)

# The name of the account of an unfinished job (its queue), or None.
AccountLookup = Callable[[int], Awaitable[str | None]]

TASK = "dreamserve.run_job"
QUEUE_PREFIX = "account:"
# How many jobs one process's procrastinate worker runs at once: admission already bounds the
# jobs of each account by its slots, so this only needs to exceed what they add up to here.
WORKER_CONCURRENCY = 100
# Taken (in a transaction) while procrastinate's schema is checked and applied: processes that
# start together apply it once.
_SCHEMA_LOCK = 7237955865294632567
# The pause before a procrastinate worker that stopped on an error is started again.
RESTART_SECONDS = 1.0


def queue_of(account: str) -> str:
    """The procrastinate queue of the jobs of the account named `account`."""
    return QUEUE_PREFIX + account


def conninfo(url: str) -> str:
    """A libpq connection string for a `postgresql://` (or `postgresql+driver://`) URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def apply_schema(url: str) -> bool:
    """Create procrastinate's tables unless they are there (idempotent, and safe for processes
    that start at once); whether it created them."""
    async with await psycopg.AsyncConnection.connect(conninfo(url)) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        found = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
        row = await found.fetchone()
        if row is not None and row[0]:
            return False
        app = App(connector=PsycopgConnector(conninfo=conninfo(url)))
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
        return True


class PostgresDispatcher:
    """Enqueues each job on its account's queue; with `runs_jobs`, also works the queues of
    `accounts` (every queue when None; more with `work`) with the runner.

    `lease_seconds` is the jobs' lease: a procrastinate worker without a heartbeat for that
    long is dead, and its rows are swept."""

    def __init__(
        self,
        runner: Runner,
        url: str,
        *,
        runs_jobs: bool,
        accounts: Sequence[str] | None = None,
        account_of: AccountLookup,
        lease_seconds: float = 30.0,
    ) -> None:
        self._runner = runner
        self._url = url
        self._runs_jobs = runs_jobs
        self._accounts = None if accounts is None else list(dict.fromkeys(accounts))
        self._account_of = account_of
        self._stalled_seconds = lease_seconds
        self._app = App(connector=PsycopgConnector(conninfo=conninfo(url), min_size=1, max_size=4))
        self._app.task(name=TASK, queue=queue_of(""))(self._run)
        self._tasks: list[asyncio.Task[None]] = []
        self._running: set[asyncio.Task[None]] = set()  # the jobs running here
        self._worked: set[str] = set()  # the accounts whose queues a worker task works
        self._started = False
        self._is_open = False
        self._is_closed = False
        self._is_draining = False  # `drain`: its procrastinate workers stopped

    async def open(self) -> None:
        """Apply procrastinate's schema if missing and open its connections: jobs can be
        dispatched from now on."""
        await apply_schema(self._url)
        await self._app.open_async()
        self._is_open = True

    def start(self) -> None:
        """Start sweeping procrastinate's stalled rows and, when this process runs jobs, working
        the queues: after the jobs a dead process left were recovered (`Scheduler.resume`),
        which takes back every unfinished job."""
        if self._started or self._is_closed or self._is_draining:
            return
        self._started = True
        self._tasks.append(asyncio.create_task(self._sweep_forever(), name="procrastinate-sweep"))
        if not self._runs_jobs:
            return
        if self._accounts is None:
            self._tasks.append(asyncio.create_task(self._work(None), name="procrastinate-worker"))
        else:
            self.work(self._accounts)

    def work(self, accounts: Sequence[str]) -> list[str]:
        """Work the queues of `accounts` too, beside those worked already (a procrastinate
        worker takes a fixed list of queues: the new ones get a worker of their own, and the
        jobs running meanwhile go on); the accounts that were new. Nothing before `start`, or
        when this process runs no jobs or works every queue."""
        stopped = self._is_closed or self._is_draining
        if not self._started or not self._runs_jobs or stopped or self._accounts is None:
            return []
        new = [name for name in dict.fromkeys(accounts) if name not in self._worked]
        if new:
            self._worked.update(new)
            queues = [queue_of(name) for name in new]
            name = f"procrastinate-worker-{len(self._tasks)}"
            self._tasks.append(asyncio.create_task(self._work(queues), name=name))
        return new

    def tasks(self) -> list[asyncio.Task[None]]:
        """Its long-lived tasks (the sweep, the queues' workers), for /readyz: each runs until
        `close`, a worker started again on its own when it stops."""
        return list(self._tasks)

    async def _work(self, queues: list[str] | None) -> None:
        """A procrastinate worker on `queues` (None: every queue), started again whenever it
        stops on an error (the database went away longer than its listener waits)."""
        options: WorkerOptions = {
            "concurrency": WORKER_CONCURRENCY,
            "install_signal_handlers": False,
            "delete_jobs": "always",
            "shutdown_graceful_timeout": 0,  # at close the jobs stop (and run again later)
            "update_heartbeat_interval": self._stalled_seconds / 3,
            "stalled_worker_timeout": self._stalled_seconds,
        }
        if queues is not None:
            options["queues"] = queues
        where = "every queue" if queues is None else ", ".join(queues)
        for run in itertools.count():
            options["name"] = f"dreamserve-{os.getpid()}-{id(queues):x}-{run}"
            try:
                await self._app.run_worker_async(**options)
                log.warning("procrastinate worker of %s stopped; starting it again", where)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning(
                    "procrastinate worker of %s stopped (%s); starting it again", where, error
                )
            await asyncio.sleep(RESTART_SECONDS)

    async def sweep_stalled(self) -> int:
        """Delete procrastinate's rows left `doing` by workers without a heartbeat for a lease
        (and those workers' rows): how many jobs. Their dreamserve jobs are the reaper's."""
        manager = self._app.job_manager
        await manager.prune_stalled_workers(self._stalled_seconds)
        stalled = await manager.get_stalled_jobs(
            task_name=TASK, seconds_since_heartbeat=self._stalled_seconds
        )
        deleted = 0
        for job in stalled:
            try:
                await manager.finish_job(job, status=Status.ABORTED, delete_job=True)
            except Exception:  # deleted meanwhile by another process's sweep
                continue
            deleted += 1
            log.warning(
                "procrastinate job %s (%s) of a dead worker deleted: the reaper sends the "
                "job again when its lease runs out",
                job.id,
                job.queue,
            )
        return deleted

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._stalled_seconds / 3)
            try:
                await self.sweep_stalled()
            except Exception as error:  # the database is down: next round
                log.warning("procrastinate's stalled jobs not swept (%s)", error)

    async def _run(self, job_id: int) -> None:
        """procrastinate's task: the job runs in a task of this dispatcher's, which a
        procrastinate worker stopping on a database error (it cancels its tasks) leaves
        running under its lease; only `close` stops it."""
        running = asyncio.create_task(run_guarded(self._runner, job_id), name=f"job-{job_id}")
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        await asyncio.shield(running)

    async def dispatch(self, job_id: int, account: str | None = None) -> None:
        if self._is_closed or not self._is_open:  # the job keeps its lease: a reaper sends it
            return
        if account is None:  # a job sent again (the reaper): its account, if it is unfinished
            account = await self._account_of(job_id)
        if account is None:  # deleted meanwhile, or ended: nothing to run
            return
        task = self._app.configure_task(TASK, queue=queue_of(account))
        try:
            await task.defer_async(job_id=job_id)
        except Exception as error:  # the database is down: the reaper sends it again
            log.warning("job %s not enqueued (%s); the reaper will", job_id, error)

    def cancel(self, job_id: int) -> None:
        self._runner.cancel(job_id)

    async def drain(self, grace: float) -> int:
        """The process is stopping: its procrastinate workers stop taking jobs (the jobs they
        run go on: they run in tasks of this dispatcher's), then wait up to `grace` seconds for
        the running jobs to end; how many still run (`close` stops them). Jobs dispatched
        meanwhile are still enqueued, for another process (or the next start) to run."""
        workers, self._tasks = self._tasks, []
        self._is_draining = True
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return await wait_for_jobs(self._running, grace)

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        tasks = [*self._tasks, *self._running]  # at close the jobs stop (and run again later)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._is_open:
            await self._app.close_async()
