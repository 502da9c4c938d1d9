"""The dispatcher contract: how an admitted, committed job reaches a runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What runs one job (worker.JobRunner)."""

    async def run(self, job_id: int) -> None: ...

    def cancel(self, job_id: int) -> None: ...


class Dispatcher(Protocol):
    async def dispatch(self, job_id: int, account: str | None = None) -> None:
        """Have the job run soon. Called after the job's transaction committed; running a job
        twice is harmless because runners claim jobs with a conditional update. `account`: the
        name of the job's account, when the caller knows it (a dispatcher that routes by
        account then reads nothing)."""

    def cancel(self, job_id: int) -> None:
        """The job was ended (its final state is committed): stop its engine if it runs where
        this dispatcher can reach. Runners elsewhere notice when they next renew the lease."""

    async def close(self) -> None:
        """Stop running jobs (each engine told to stop) and dispatch none after it (a later
        `dispatch` does nothing); unfinished ones stay `created`, for the next start (or the
        process that holds the runner lock) to run again. Idempotent."""


async def wait_for_jobs(running: set[asyncio.Task[None]], grace: float) -> int:
    """Wait up to `grace` seconds for the job tasks in `running` (a set their tasks leave when
    done) to end; how many still run then."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            while running:
                await asyncio.wait(list(running))
    return len(running)


async def run_guarded(runner: Runner, job_id: int) -> None:
    """Run a job, logging what escapes the runner (it records job failures itself: this is a
    bug or an outage); the job keeps its slot and lease, and the reaper takes it back."""
    try:
        await runner.run(job_id)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("job %s: runner crashed", job_id)
