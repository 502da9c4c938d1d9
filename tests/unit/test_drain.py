"""The in-process dispatcher at a stop (`drain`): no job started from then on, the running ones
waited for up to the grace, the number still running then returned (`close` stops them)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dreamserve.app import _finish_running
from dreamserve.dispatch.inprocess import InProcessDispatcher
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio


class GatedRunner:
    """A runner whose jobs run until their gate opens; what started, and what was cancelled."""

    def __init__(self) -> None:
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.stopped: list[int] = []

    async def run(self, job_id: int) -> None:
        self.started.append(job_id)
        try:
            await self.gates.setdefault(job_id, asyncio.Event()).wait()
        except asyncio.CancelledError:
            self.stopped.append(job_id)
            raise

    def cancel(self, job_id: int) -> None:
        raise AssertionError("not cancelled by the user here")


async def test_drain_waits_for_the_running_jobs_and_starts_none() -> None:
    runner = GatedRunner()
    dispatcher = InProcessDispatcher(runner)
    await dispatcher.dispatch(1)
    await dispatcher.dispatch(2)
    await asyncio.sleep(0)
    draining = asyncio.create_task(dispatcher.drain(5))
    await asyncio.sleep(0)
    await dispatcher.dispatch(3)  # promoted from a queue meanwhile: left for the next start
    runner.gates[1].set()
    runner.gates[2].set()
    assert await draining == 0
    assert runner.started == [1, 2]
    await dispatcher.close()
    assert runner.stopped == []


async def test_drain_returns_the_jobs_still_running_after_the_grace() -> None:
    runner = GatedRunner()
    dispatcher = InProcessDispatcher(runner)
    await dispatcher.dispatch(1)
    await dispatcher.dispatch(2)
    await asyncio.sleep(0)
    runner.gates[1].set()
    assert await dispatcher.drain(0.05) == 1
    await dispatcher.close()
    assert runner.stopped == [2]


def test_the_stop_grace_is_30_seconds_by_default_and_may_be_0() -> None:
    assert Settings().stop_grace_seconds == 30
    assert Settings(stop_grace_seconds=0).stop_grace_seconds == 0
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings(stop_grace_seconds=-1)


async def test_the_stop_says_when_the_grace_starts_and_what_it_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dreamserve.app")
    runner = GatedRunner()
    dispatcher = InProcessDispatcher(runner)
    await dispatcher.dispatch(1)
    await asyncio.sleep(0)
    assert await _finish_running(dispatcher, 0.05) == 1
    await dispatcher.close()
    assert [record.getMessage() for record in caplog.records] == [
        "stopping: submissions refused (503), no job started; the running ones get up to 0.05 s "
        "to end (DREAMSERVE_STOP_GRACE_SECONDS)",
        "stopping: 1 job(s) still running after 0.05 s (DREAMSERVE_STOP_GRACE_SECONDS): "
        "stopped, they run again at the next start",
    ]
