"""A database locked by another transaction (issue 14): the server keeps serving what needs no
lock, answers a write that cannot get one in time with 503 and Retry-After, and its background
work (runners, webhooks) outlives the wait. Another process holds SQLite's write lock; another
PostgreSQL connection holds a row lock."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from receiver import Answer, receiving
from sqlalchemy import Connection, select
from support import (
    SMALL,
    FakeClock,
    GatedEngine,
    Harness,
    eventually,
    holding_write_lock,
    open_harness,
    wait_started,
)

from dreamserve.engines.registry import BUILTIN
from dreamserve.settings import Settings
from dreamserve.storage import job_queries
from dreamserve.storage.tables import jobs

pytestmark = pytest.mark.anyio

BUSY = {"error": "Database busy, retry later"}


@pytest.fixture
def busy(settings: Settings) -> Settings:
    """The settings with a short bound on lock waits."""
    return settings.model_copy(update={"database_busy_seconds": 0.3})


@pytest.fixture
async def harness(busy: Settings) -> AsyncIterator[Harness]:
    async with open_harness(busy) as opened:
        yield opened


@contextmanager
def holding_a_lock(settings: Settings) -> Iterator[None]:
    """Another transaction holds the lock a submission needs: on SQLite another process holds
    the write lock; on PostgreSQL another connection holds the accounts' rows (admission
    takes a slot with an UPDATE of one)."""
    if settings.database_url is None:
        with holding_write_lock(settings.data_dir / "dreamserve.db"):
            yield
        return
    with psycopg.connect(settings.database_url) as other:
        other.execute("SELECT id FROM accounts FOR UPDATE")
        yield
        other.rollback()


@pytest.mark.both_databases
async def test_a_lock_held_elsewhere_makes_writes_503_and_holds_up_nothing_else(
    busy: Settings,
) -> None:
    """While a write waits for the lock (a bound of 2 s here), requests that need no lock are
    answered: they come back before the write does, which a write waiting on the event loop's
    thread would not let happen. Then the write is a 503, and writes work once the lock is
    free. Checked by order, not by timing."""
    patient = busy.model_copy(update={"database_busy_seconds": 2.0})
    async with open_harness(patient) as harness:
        done = await harness.post(SMALL)
        jobid = done.json()["jobid"]
        await harness.wait(jobid)
        with holding_a_lock(patient):
            started = time.monotonic()
            submission = asyncio.create_task(harness.post(SMALL))
            await asyncio.sleep(0.05)  # the write waits for the lock
            assert not submission.done()
            models = await harness.call("GET", "/models")  # no database
            assert models.status_code == 200
            record = await harness.get(jobid)  # a read: no lock needed
            assert record.status_code == 200
            assert record.json()["status"] == "completed"
            assert not submission.done()  # answered while the write waited
            refused = await submission
            waited = time.monotonic() - started
        assert refused.status_code == 503
        assert refused.json() == BUSY
        assert refused.headers["Retry-After"] == str(patient.retry_after_seconds)
        assert waited >= 2.0
        again = await harness.post(SMALL)
        assert again.status_code == 200, again.text
        assert (await harness.wait(again.json()["jobid"]))["status"] == "completed"


async def test_a_runner_whose_lease_renewal_meets_the_lock_keeps_its_job(
    busy: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal that gets DatabaseBusy is tried again: the job is not taken back from a
    runner that is still working, so it runs once.

    The lock is taken just after a renewal and held until a renewal was refused (order, not
    timing: taking it starts a process, which a loaded machine may take a second to do), then
    released well before the runner would give its lease up (two thirds of the lease after its
    last renewal, worker.py); the gate opens only once that renewal's lease has run out."""
    settings = busy.model_copy(
        update={
            "database_busy_seconds": 0.1,
            "lease_seconds": 4.5,  # renewals every 1.5 s; given up 3 s after the last one
            "reaper_interval_seconds": 0.1,
        }
    )
    engine = GatedEngine()
    async with open_harness(settings, engines={**BUILTIN, "procedural": engine.factory}) as h:
        reply = await h.post(SMALL)
        jobid = reply.json()["jobid"]
        await wait_started(engine, 1)

        def lease_until(conn: Connection) -> int | None:
            job = job_queries.job_by_jobid(conn, jobid, 1)
            assert job is not None
            return int(
                conn.execute(select(jobs.c.lease_until).where(jobs.c.id == job.id)).scalar_one()
            )

        def refusals() -> int:
            return sum("lease renewal failed" in r.getMessage() for r in caplog.records)

        first = await h.server.db.read(lease_until)
        deadline = time.monotonic() + 30
        while await h.server.db.read(lease_until) == first:  # a renewal (1.5 s after the claim)
            assert time.monotonic() < deadline, "the lease was never renewed"
            await asyncio.sleep(0.01)
        renewed = time.monotonic()  # after the renewal: its lease ends before renewed + 4.5 s
        with holding_write_lock(settings.data_dir / "dreamserve.db"):
            await eventually(lambda: refusals() > 0, seconds=30)  # the next renewal met it
        # Past the lease of the last renewal before the lock: had the runner not renewed it
        # once the lock was free, the reaper (every 0.1 s) would have taken the job back.
        await asyncio.sleep(max(0.0, renewed + 4.5 + 0.5 - time.monotonic()))
        engine.gate.set()
        record = await h.wait(jobid, seconds=30)
        assert record["status"] == "completed"
        assert engine.started == 1
    refused = [r.getMessage() for r in caplog.records if "lease renewal failed" in r.getMessage()]
    assert refused, "no renewal met the lock"
    assert all("Database busy" in message for message in refused)


async def test_a_runner_whose_final_write_meets_the_lock_writes_it_once_the_lock_is_free(
    busy: Settings,
) -> None:
    """The job's end is tried again while the lock is held: the images made are kept and
    the job is not run a second time."""
    settings = busy.model_copy(update={"lease_seconds": 3.0, "reaper_interval_seconds": 0.1})
    engine = GatedEngine()
    async with open_harness(settings, engines={**BUILTIN, "procedural": engine.factory}) as h:
        reply = await h.post(SMALL)
        jobid = reply.json()["jobid"]
        await wait_started(engine, 1)
        with holding_write_lock(settings.data_dir / "dreamserve.db"):
            engine.gate.set()
            await asyncio.sleep(0.8)  # the job's end is refused at least twice
            assert (await h.get(jobid)).json()["status"] == "created"
        # A generous bound: an end given up on would run the job again once its lease (3 s)
        # ran out, which `engine.started` would show.
        record = await h.wait(jobid, seconds=30)
        assert record["status"] == "completed"
        [image] = record["response"]["images"]
        assert (await h.client.get(image["imageUrl"])).status_code == 200
        assert engine.started == 1


async def test_a_webhook_try_that_cannot_be_recorded_is_sent_again_not_failed(
    busy: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver got the try, but the lock kept it from being recorded: no failed try is
    made up; the delivery's claim runs out (the try's timeout and the claim's grace after the
    claim, not before) and it is sent again, then recorded.

    The receiver answers only once the lock is taken, which is held until the deliverer says
    it could not record the try (order, not timing)."""
    settings = busy.model_copy(
        update={
            "webhook_allow_private": True,
            "webhook_timeout_seconds": 5.0,
            "webhook_claim_grace_seconds": 3.0,
        }
    )
    clock = FakeClock()
    not_recorded = "try not recorded, the database is busy"
    locked = threading.Event()
    with receiving(Answer(until=locked)) as receiver:
        async with open_harness(settings, clock=clock) as h:
            reply = await h.post({**SMALL, "replyUrl": receiver.url})
            jobid = reply.json()["jobid"]
            await h.wait(jobid)
            await eventually(lambda: receiver.count() == 1)
            with holding_write_lock(settings.data_dir / "dreamserve.db"):
                locked.set()
                await eventually(
                    lambda: any(not_recorded in r.getMessage() for r in caplog.records)
                )
            await h.server.deliverer.drain()
            [delivery] = (await h.call("GET", f"/images/{jobid}/webhooks")).json()["deliveries"]
            assert delivery["tries"] == []
            clock.advance(5.0 + 3.0 - 0.5)  # the claim still holds it
            assert await h.server.deliverer.deliver_due() == 0
            clock.advance(1.0)  # past the claim: timeout and grace
            h.server.deliverer.wake()
            await eventually(lambda: receiver.count() == 2)
            await h.server.deliverer.drain()
            [delivery] = (await h.call("GET", f"/images/{jobid}/webhooks")).json()["deliveries"]
            assert delivery["status"] == "delivered"
            assert [attempt["statusCode"] for attempt in delivery["tries"]] == [200]
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
