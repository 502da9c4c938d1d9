"""Leases and the reaper: a job whose runner stops renewing its lease runs again or fails, its
slot is released exactly once, and the runner it was taken from can change nothing."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Connection, func, select
from support import (
    SMALL,
    CancellableEngine,
    FakeClock,
    GatedEngine,
    Harness,
    eventually,
    open_harness,
    wait_started,
)

from dreamserve.app import utc_now
from dreamserve.dispatch.base import Runner
from dreamserve.dispatch.inprocess import InProcessDispatcher
from dreamserve.jobs import Status, millis
from dreamserve.reaper import RUNNER_LOST, Reaper, ReaperConfig
from dreamserve.settings import Settings
from dreamserve.storage import job_queries
from dreamserve.storage.tables import assets, idempotency_keys

pytestmark = [pytest.mark.anyio, pytest.mark.both_databases]


def now_millis() -> int:
    return millis(utc_now())


def reaper(harness: Harness, clock: FakeClock, max_attempts: int = 3) -> Reaper:
    server = harness.server
    config = ReaperConfig(1.0, max_attempts)
    return Reaper(server.store, server.blobs, server.dispatcher, clock, config)


async def stored_files(settings: Settings) -> list[Any]:
    return [path for path in (settings.data_dir / "blobs").rglob("*") if path.is_file()]


async def asset_count(harness: Harness) -> int:
    def count(conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(assets)).scalar_one())

    return await harness.server.db.read(count)


async def test_an_expired_lease_runs_the_job_again_and_fences_the_first_runner(
    settings: Settings,
) -> None:
    engine = GatedEngine()
    clock = FakeClock()
    async with open_harness(
        settings, clock=clock, engines={"procedural": engine.factory}
    ) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        assert (await reaper(harness, clock).sweep()).requeued == []  # lease still valid
        clock.advance(31)  # the lease is 30 s and the gated runner reported no progress
        sweep = await reaper(harness, clock).sweep()
        assert len(sweep.requeued) == 1
        await wait_started(engine, 2)  # a second runner claimed it (attempt 2)
        assert await harness.slots() == {"LOCAL:procedural": 1}
        engine.gate.set()  # both runners finish; only attempt 2 may write
        record = await harness.wait(jobid)
        dispatcher = harness.server.dispatcher
        await eventually(lambda: dispatcher.running == 0)  # type: ignore[attr-defined]
        assert record["status"] == "completed"
        assert len(record["response"]["images"]) == 1
        assert await asset_count(harness) == 1
        assert await harness.slots() == {"LOCAL:procedural": 0}
        assert len(await stored_files(settings)) == 1  # the fenced runner's file is deleted


async def test_a_job_reaped_max_attempts_times_fails_and_frees_its_slot(
    settings: Settings,
) -> None:
    engine = GatedEngine()
    clock = FakeClock()
    async with open_harness(
        settings, clock=clock, engines={"procedural": engine.factory}
    ) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        clock.advance(31)
        sweep = await reaper(harness, clock, max_attempts=1).sweep()
        assert (sweep.requeued, sweep.failed) == ([], [jobid])
        record = (await harness.get(jobid)).json()
        assert (record["status"], record["error"]) == ("failed", RUNNER_LOST)
        assert await harness.slots() == {"LOCAL:procedural": 0}
        engine.gate.set()  # the lost runner comes back: its result is thrown away
        await harness.server.dispatcher.close()
        assert (await harness.get(jobid)).json() == record
        assert await harness.slots() == {"LOCAL:procedural": 0}
        assert await stored_files(settings) == []


async def test_a_runner_stops_when_its_job_was_ended_by_another_process(
    settings: Settings,
) -> None:
    """Another process (the CLI deleting an account, another API node cancelling) can only
    write the database: the runner sees it when it next renews its lease (every second here:
    a 0.3 s lease, given up 0.2 s after its last renewal, was lost by a loaded machine's stall,
    and the job stopped for that, not for the change this test is about)."""
    engine = CancellableEngine()
    quick = settings.model_copy(update={"lease_seconds": 3.0})
    async with open_harness(quick, engines={"procedural": engine.factory}) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)

        def cancel_elsewhere(conn: Connection) -> bool:
            job = job_queries.job_by_jobid(conn, jobid, 1)
            assert job is not None
            return job_queries.finish_job(
                conn, job, status=Status.FAILED, now=now_millis(), error="Cancelled by user"
            )

        assert await harness.server.db.write(cancel_elsewhere)
        await eventually(lambda: engine.cancelled == 1)
        assert engine.started == 1
        assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_jobs_past_retention_are_deleted_with_their_images(settings: Settings) -> None:
    clock = FakeClock()
    async with open_harness(settings, clock=clock) as harness:
        old = (await harness.post({**SMALL, "count": 2})).json()["jobid"]
        await harness.wait(old)
        clock.advance(2 * 86_400)
        kept = (await harness.post(SMALL)).json()["jobid"]
        await harness.wait(kept)
        assert len(await stored_files(settings)) == 3
        clock.advance(29 * 86_400)  # `old` finished 31 days ago, `kept` 29 days ago
        sweep = await reaper(harness, clock).sweep()
        assert sweep.deleted_files == 2
        harness.service.records.forget()  # as after a restart: no record kept in memory
        reply = await harness.get(old)
        assert (reply.status_code, reply.json()) == (404, {"error": f"Job {old} not found"})
        assert (await harness.get(kept)).json()["status"] == "completed"
        assert len(await stored_files(settings)) == 1
        assert await asset_count(harness) == 1


class FirstDeliveryFails(InProcessDispatcher):
    """Runs jobs in process, except that the first delivery goes wrong (`first`)."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(runner)
        self.runner = runner
        self.failed = False

    async def dispatch(self, job_id: int, account: str | None = None) -> None:
        if self.failed:
            await super().dispatch(job_id)
            return
        self.failed = True
        await self.first(job_id)

    async def first(self, job_id: int) -> None:
        raise NotImplementedError


class LosesTheFirst(FirstDeliveryFails):
    """The first delivery is lost before any runner claims the job (a claim that failed on a
    database blip, a broker that dropped it); later deliveries run normally."""

    async def first(self, job_id: int) -> None:
        return None


async def test_a_job_no_runner_ever_claimed_is_delivered_again(settings: Settings) -> None:
    clock = FakeClock()
    async with open_harness(settings, clock=clock, dispatcher=LosesTheFirst) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        assert (await reaper(harness, clock).sweep()).requeued == []  # not due yet
        clock.advance(31)  # an unclaimed job is leased as long as a running one
        assert len((await reaper(harness, clock).sweep()).requeued) == 1
        assert (await harness.wait(jobid))["status"] == "completed"
        assert await harness.slots() == {"LOCAL:procedural": 0}


class ClaimsThenVanishes(FirstDeliveryFails):
    """The first job is claimed by a runner that dies at once (its lease is never renewed);
    later deliveries run normally."""

    async def first(self, job_id: int) -> None:
        now = now_millis()
        store = self.runner.store  # type: ignore[attr-defined]
        await store.write(lambda tx: tx.claim(job_id, now, now + 300))


async def test_the_servers_reaper_runs_again_a_job_whose_runner_died(settings: Settings) -> None:
    quick = settings.model_copy(update={"reaper_interval_seconds": 0.1})
    async with open_harness(quick, dispatcher=ClaimsThenVanishes) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        record = await harness.wait(jobid)
        assert record["status"] == "completed"
        job = await harness.server.db.read(lambda conn: job_queries.job_by_jobid(conn, jobid, 1))
        assert job is not None
        assert job.attempts == 2
        assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_the_reaper_deletes_idempotency_keys_after_a_day(settings: Settings) -> None:
    clock = FakeClock()
    async with open_harness(settings, clock=clock) as harness:
        headers = {**harness.auth, "Idempotency-Key": "old-key"}
        reply = await harness.client.post("/v1/dreamina/images", json=SMALL, headers=headers)
        await harness.wait(reply.json()["jobid"])

        def keys(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(idempotency_keys)).scalar())

        clock.advance(86_400 - 60)
        await reaper(harness, clock).sweep()
        assert await harness.server.db.read(keys) == 1  # a day not yet over: kept
        clock.advance(120)
        await reaper(harness, clock).sweep()
        assert await harness.server.db.read(keys) == 0
