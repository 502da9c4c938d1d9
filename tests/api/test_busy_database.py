"""A database locked by another transaction (issue 14): the server keeps serving what needs no
lock and answers a write that cannot get one in time with 503 and Retry-After. Another process
holds SQLite's write lock; another PostgreSQL connection holds a row lock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from support import (
    SMALL,
    Harness,
    LoopWatch,
    holding_write_lock,
    open_harness,
)

from dreamserve.settings import Settings

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
    harness: Harness, busy: Settings
) -> None:
    done = await harness.post(SMALL)
    jobid = done.json()["jobid"]
    await harness.wait(jobid)
    async with LoopWatch() as watch:
        with holding_a_lock(busy):
            started = time.monotonic()
            submission = asyncio.create_task(harness.post(SMALL))
            await asyncio.sleep(0.05)  # the write waits for the lock
            assert not submission.done()
            models = await harness.call("GET", "/models")  # no database
            assert models.status_code == 200
            record = await harness.get(jobid)  # a read: no lock needed
            assert record.status_code == 200
            assert record.json()["status"] == "completed"
            assert time.monotonic() - started < 0.25  # answered while the write waited
            refused = await submission
            waited = time.monotonic() - started
    assert refused.status_code == 503
    assert refused.json() == BUSY
    assert refused.headers["Retry-After"] == str(busy.retry_after_seconds)
    assert 0.3 <= waited < 1.5
    assert watch.longest < 0.2, f"the event loop stood still for {watch.longest:.3f} s"
    again = await harness.post(SMALL)
    assert again.status_code == 200, again.text
    assert (await harness.wait(again.json()["jobid"]))["status"] == "completed"
