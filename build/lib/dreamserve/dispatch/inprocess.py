"""The embedded dispatcher: each job runs as an asyncio task of the server process."""

from __future__ import annotations

import asyncio
import logging

from dreamserve.dispatch.base import Runner, run_guarded, wait_for_jobs

log = logging.getLogger(__name__)


class InProcessDispatcher:
    """Runs jobs as tasks; admission already bounds how many run per account, and the runner's
    render-memory budget how many of them hold images."""

    def __init__(self, runner: Runner) -> None:
        self._runner = runner
        self._tasks: set[asyncio.Task[None]] = set()
        self._is_closed = False
        self._is_draining = False

    async def dispatch(self, job_id: int, account: str | None = None) -> None:
        # Stopping: the job stays queued; the next start (or, past its lease, a reaper) runs it.
        if self._is_closed or self._is_draining:
            return
        task = asyncio.create_task(run_guarded(self._runner, job_id), name=f"job-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self, job_id: int) -> None:
        self._runner.cancel(job_id)

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def drain(self, grace: float) -> int:
        """The server is stopping: start no more jobs, and wait up to `grace` seconds for the
        running ones to end; how many still run (`close` stops them)."""
        self._is_draining = True
        return await wait_for_jobs(self._tasks, grace)

    async def close(self) -> None:
        self._is_closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
