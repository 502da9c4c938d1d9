"""The scheduler: GET /scheduler lists the jobs holding slots; DELETE cancels one at once."""

from __future__ import annotations

import asyncio
import time

import pytest
from support import (
    SMALL,
    CancellableEngine,
    FakeClock,
    Harness,
    ReturnsOnCancelEngine,
    eventually,
    open_harness,
    public_dns,
    wait_started,
    watch_puts,
)

from dreamserve.dispatch.inprocess import InProcessDispatcher
from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.errors import Cancelled
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

HOOK = "https://example.com/hook"


@pytest.fixture
async def running(settings: Settings):
    engine = CancellableEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        yield harness, engine


@pytest.mark.both_databases
async def test_get_lists_running_jobs_by_account(settings: Settings) -> None:
    engine = CancellableEngine()
    clock = FakeClock()
    async with open_harness(
        settings, clock=clock, engines={"procedural": engine.factory}
    ) as harness:
        harness.service.submissions.resolver = (
            public_dns  # the job never ends here: nothing is sent
        )
        assert (await harness.call("GET", "/scheduler")).json() == {"executing": {}, "total": 0}
        first = (await harness.post(SMALL)).json()["jobid"]
        clock.advance(2.5)
        second = (await harness.post({**SMALL, "replyUrl": HOOK})).json()["jobid"]
        await wait_started(engine, 2)
        clock.advance(1)
        reply = await harness.call("GET", "/scheduler")
        assert reply.status_code == 200
        assert reply.json() == {
            "executing": {
                "LOCAL:procedural": [
                    {"jobid": first, "model": "nano-banana", "elapsedSeconds": 3},
                    {
                        "jobid": second,
                        "model": "nano-banana",
                        "elapsedSeconds": 1,
                        "replyUrl": HOOK,
                    },
                ]
            },
            "total": 2,
        }


async def test_get_lists_only_the_users_own_jobs(running) -> None:
    harness, engine = running
    await harness.post(SMALL)
    await wait_started(engine, 1)
    other = await harness.new_user()
    assert (await harness.call("GET", "/scheduler", token=other)).json() == {
        "executing": {},
        "total": 0,
    }


@pytest.mark.both_databases
async def test_cancel_frees_the_slot_at_once_and_stops_the_engine(running) -> None:
    harness, engine = running
    jobid = (await harness.post(SMALL)).json()["jobid"]
    await wait_started(engine, 1)
    reply = await harness.call("DELETE", f"/scheduler/{jobid}")
    assert reply.status_code == 200
    record = reply.json()
    assert (record["jobid"], record["status"], record["error"]) == (
        jobid,
        "failed",
        "Cancelled by user",
    )
    assert await harness.slots() == {"LOCAL:procedural": 0}  # before the engine has stopped
    await eventually(lambda: engine.cancelled == 1)
    assert (await harness.get(jobid)).json() == record
    assert (await harness.call("GET", "/scheduler")).json()["total"] == 0


@pytest.mark.both_databases
async def test_a_job_cancelled_while_its_engine_runs_stores_none_of_its_images(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine returns its images after the cancel (it was finishing a step): the runner
    neither encodes nor stores them."""
    engine = ReturnsOnCancelEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        puts = watch_puts(harness, monkeypatch)
        jobid = (await harness.post({**SMALL, "count": 2})).json()["jobid"]
        await wait_started(engine, 1)
        reply = await harness.call("DELETE", f"/scheduler/{jobid}")
        assert reply.status_code == 200
        await eventually(lambda: engine.events == [("started", 1), ("cancelled", 1)])
        dispatcher = harness.server.dispatcher
        await eventually(lambda: dispatcher.running == 0)  # type: ignore[attr-defined]
        assert puts == []
        record = (await harness.get(jobid)).json()
        assert (record["status"], record["error"]) == ("failed", "Cancelled by user")
        assert not [path for path in (settings.data_dir / "blobs").rglob("*") if path.is_file()]


async def test_cancel_accepts_the_jobid_percent_encoded(running) -> None:
    harness, _ = running
    jobid = (await harness.post(SMALL)).json()["jobid"]
    encoded = jobid.replace(":", "%3A").replace("@", "%40")
    assert (await harness.call("DELETE", f"/scheduler/{encoded}")).status_code == 200


class HeldDispatcher(InProcessDispatcher):
    """Hands jobs to the runner only once the test opens the gate."""

    gate = asyncio.Event()

    async def dispatch(self, job_id: int, account: str | None = None) -> None:
        async def later() -> None:
            await self.gate.wait()
            await InProcessDispatcher.dispatch(self, job_id)

        task = asyncio.create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def test_a_job_not_started_yet_is_cancelled_before_it_runs(settings: Settings) -> None:
    engine = CancellableEngine()
    HeldDispatcher.gate = asyncio.Event()
    async with open_harness(
        settings, engines={"procedural": engine.factory}, dispatcher=HeldDispatcher
    ) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        reply = await harness.call("DELETE", f"/scheduler/{jobid}")  # before any runner has it
        assert reply.json()["error"] == "Cancelled by user"
        HeldDispatcher.gate.set()  # the runner gets the job now, and must not run it
        await eventually(lambda: harness.server.dispatcher.running == 0)  # claim refused
        assert engine.started == 0
        assert (await harness.get(jobid)).json()["error"] == "Cancelled by user"


async def test_cancelling_an_ended_job_is_404(harness: Harness) -> None:
    jobid = (await harness.post(SMALL)).json()["jobid"]
    await harness.wait(jobid)
    reply = await harness.call("DELETE", f"/scheduler/{jobid}")
    assert reply.status_code == 404
    assert reply.json() == {"error": f"Job {jobid} is not running"}


async def test_cancelling_twice_is_404_the_second_time(running) -> None:
    harness, _ = running
    jobid = (await harness.post(SMALL)).json()["jobid"]
    assert (await harness.call("DELETE", f"/scheduler/{jobid}")).status_code == 200
    reply = await harness.call("DELETE", f"/scheduler/{jobid}")
    assert (reply.status_code, reply.json()) == (404, {"error": f"Job {jobid} is not running"})
    assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_unknown_or_foreign_jobs_are_404_as_not_found(running) -> None:
    harness, _ = running
    jobid = (await harness.post(SMALL)).json()["jobid"]
    other = await harness.new_user()
    reply = await harness.call("DELETE", f"/scheduler/{jobid}", token=other)
    assert (reply.status_code, reply.json()) == (404, {"error": f"Job {jobid} not found"})
    assert (await harness.get(jobid)).json()["status"] == "created"
    reply = await harness.call("DELETE", "/scheduler/not-a-job")
    assert (reply.status_code, reply.json()) == (404, {"error": "Job not-a-job not found"})


async def test_the_procedural_engine_stops_a_4k_job_when_cancelled(settings: Settings) -> None:
    """The real engine at the largest size: it sees the cancel between stripes and raises
    Cancelled instead of finishing its images; no file is written."""
    outcome: list[tuple[str, float]] = []

    class Watched(ProceduralEngine):
        async def generate(self, request, progress, cancel):  # type: ignore[no-untyped-def]
            try:
                images = await super().generate(request, progress, cancel)
            except Cancelled:
                outcome.append(("cancelled", time.monotonic()))
                raise
            outcome.append(("finished", time.monotonic()))
            return images

    body = {"prompt": "wide", "model": "seedream-4.0", "resolution": "4k", "ratio": "21:9"}
    async with open_harness(settings, engines={"procedural": Watched}) as harness:
        jobid = (await harness.post({**body, "count": 4})).json()["jobid"]

        async def progressed() -> bool:
            return bool((await harness.get(jobid)).json().get("progress"))

        for _ in range(1000):
            if await progressed():
                break
            await asyncio.sleep(0.01)
        cancelled_at = time.monotonic()
        await harness.call("DELETE", f"/scheduler/{jobid}")
        await eventually(lambda: bool(outcome))
        assert outcome[0][0] == "cancelled"
        record = (await harness.get(jobid)).json()
        assert (record["status"], record["error"]) == ("failed", "Cancelled by user")
        assert not [path for path in (settings.data_dir / "blobs").rglob("*") if path.is_file()]
        # Reported, not asserted (shared machines): the issue asks for under a second.
        print(f"4k procedural job stopped {outcome[0][1] - cancelled_at:.3f}s after the cancel")
