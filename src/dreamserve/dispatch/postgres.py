"""The scale-out dispatcher: admitted jobs go through procrastinate, on the server's own
PostgreSQL, to whichever process works their account's queue (an API process that runs jobs,
or `dreamserve worker`).

procrastinate only carries the job's id: the runner (worker.JobRunner) claims the job by a
conditional update, so a job delivered twice runs once, and a job whose enqueue was lost (a
crash between the job's commit and its `defer`) keeps the lease admission gave it: when that
runs out, the reaper of any process takes it back and dispatches it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import psycopg
from procrastinate import App, PsycopgConnector
from procrastinate.app import WorkerOptions
from sqlalchemy.engine import make_url

from dreamserve.dispatch.base import Runner

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
    `accounts` (every queue when None) with the runner."""

    def __init__(
        self,
        runner: Runner,
        url: str,
        *,
        runs_jobs: bool,
        accounts: Sequence[str] | None = None,
        account_of: AccountLookup,
    ) -> None:
        self._runner = runner
        self._url = url
        self._runs_jobs = runs_jobs
        self._queues = None if accounts is None else [queue_of(name) for name in accounts]
        self._account_of = account_of
        self._app = App(connector=PsycopgConnector(conninfo=conninfo(url), min_size=1, max_size=4))
        self._app.task(name=TASK, queue=queue_of(""))(self._run)
        self._worker: asyncio.Task[None] | None = None
        self._is_open = False
        self._is_closed = False

    async def open(self) -> None:
        """Apply procrastinate's schema if missing and open its connections: jobs can be
        dispatched from now on."""
        await apply_schema(self._url)
        await self._app.open_async()
        self._is_open = True

    def start(self) -> None:
        """Start working the queues, when this process runs jobs: after the jobs a dead process
        left were recovered (`Scheduler.resume`), which takes back every unfinished job."""
        if self._runs_jobs and self._worker is None and not self._is_closed:
            options: WorkerOptions = {
                "concurrency": WORKER_CONCURRENCY,
                "install_signal_handlers": False,
                "delete_jobs": "always",
                "shutdown_graceful_timeout": 0,  # at close the jobs stop (and run again later)
                "name": f"dreamserve-{id(self):x}",
            }
            if self._queues is not None:  # else every queue
                options["queues"] = self._queues
            work = self._app.run_worker_async(**options)
            self._worker = asyncio.create_task(work, name="procrastinate-worker")

    async def _run(self, job_id: int) -> None:
        try:
            await self._runner.run(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # the runner records job failures itself; this is a bug or an outage
            log.exception("job %s: runner crashed", job_id)  # the reaper takes it back

    async def dispatch(self, job_id: int) -> None:
        if self._is_closed or not self._is_open:  # the job keeps its lease: a reaper sends it
            return
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

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        if self._is_open:
            await self._app.close_async()
