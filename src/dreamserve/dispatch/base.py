"""The dispatcher contract: how an admitted, committed job reaches a runner."""

from __future__ import annotations

from typing import Protocol


class Dispatcher(Protocol):
    async def dispatch(self, job_id: int) -> None:
        """Have the job run soon. Called after the job's transaction committed; running a job
        twice is harmless because runners claim jobs with a conditional update."""

    async def close(self) -> None:
        """Stop running jobs; unfinished ones stay `created` for the next start to resume."""
