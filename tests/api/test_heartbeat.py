"""The runner's heartbeat: a lease renewal that fails is retried; a runner that cannot renew in
time stops its engine before its lease ends and leaves the job to the reaper, so that a job never
runs twice at once."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from support import (
    SMALL,
    Harness,
    ReturnsOnCancelEngine,
    eventually,
    open_harness,
    wait_started,
    watch_puts,
)

from dreamserve.jobs import Job
from dreamserve.settings import Settings
from dreamserve.storage import job_queries
from dreamserve.storage.job_store import JobTransaction
from dreamserve.storage.tables import jobs

pytestmark = [pytest.mark.anyio, pytest.mark.both_databases]


def quick(settings: Settings) -> Settings:
    """A lease short enough for the test to see it run out: renewed every second, given up on
    with a second left; the server's reaper looks every 0.1 s. (A 0.9 s lease, given up on after
    0.6 s, was given up on under the load of a parallel suite on two cores: a flaky test.)"""
    return settings.model_copy(
        update={
            "lease_seconds": 3.0,
            "progress_interval_seconds": 0.05,
            "reaper_interval_seconds": 0.1,
        }
    )


class FlakyRenewals:
    """The lease renewals of a job's first attempt fail, as on a database blip, the first
    `failures` times (every time for None); the others are the store's."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failures: int | None) -> None:
        self.failures = failures
        self.failed = 0
        self.renewed = 0
        real = JobTransaction.progress

        def progress(tx: JobTransaction, **change: Any) -> bool:
            if change["job"].attempts == 1 and (failures is None or self.failed < failures):
                self.failed += 1
                raise OperationalError("UPDATE jobs ...", {}, Exception("database is locked"))
            renewed = real(tx, **change)
            self.renewed += renewed
            return renewed

        monkeypatch.setattr(JobTransaction, "progress", progress)


async def stored_job(harness: Harness, jobid: str) -> Job:
    job = await harness.server.db.read(lambda conn: job_queries.job_by_jobid(conn, jobid, 1))
    assert job is not None
    return job


async def lease_until(harness: Harness, jobid: str) -> int:
    query = select(jobs.c.lease_until).where(jobs.c.jobid == jobid)
    return int(await harness.server.db.read(lambda conn: conn.execute(query).scalar_one()))


def worker_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "dreamserve.worker"]


async def test_a_renewal_that_fails_a_few_times_is_retried_and_the_job_runs_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ReturnsOnCancelEngine()
    renewals = FlakyRenewals(monkeypatch, failures=3)
    async with open_harness(quick(settings), engines={"procedural": engine.factory}) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        await eventually(lambda: renewals.renewed > 0, seconds=10)
        engine.gate.set()
        record = await harness.wait(jobid, seconds=10)
        assert record["status"] == "completed"
        assert (await stored_job(harness, jobid)).attempts == 1
    assert renewals.failed == 3
    assert engine.events == [("started", 1)]  # never cancelled, never run again
    logs = worker_logs(caplog)
    assert [(log.levelno, log.exc_info) for log in logs] == [(logging.WARNING, None)] * 3
    assert all(log.getMessage().count("\n") == 0 for log in logs)  # one line each
    assert "lease renewal failed (OperationalError" in logs[0].getMessage()


async def test_a_runner_that_cannot_renew_stops_before_its_lease_ends_and_the_job_runs_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ReturnsOnCancelEngine()
    renewals = FlakyRenewals(monkeypatch, failures=None)  # the first attempt never renews
    async with open_harness(quick(settings), engines={"procedural": engine.factory}) as harness:
        puts = watch_puts(harness, monkeypatch)
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        first_lease_until = await lease_until(harness, jobid)
        await wait_started(engine, 2)  # the server's reaper requeued it; a new runner claimed it
        # The first attempt's engine saw its cancel before its lease ended, and before the
        # second attempt started: never two at once.
        assert engine.events == [("started", 1), ("cancelled", 1), ("started", 2)]
        assert engine.cancels_seen_at[0] < first_lease_until
        assert puts == []  # the first runner stored none of the images its engine returned
        engine.gate.set()
        record = await harness.wait(jobid, seconds=10)
        assert record["status"] == "completed"  # no final state written by the first runner
        assert (await stored_job(harness, jobid)).attempts == 2
        assert len(puts) == 1
        assert await harness.slots() == {"LOCAL:procedural": 0}
    logs = worker_logs(caplog)
    assert all(log.levelno == logging.WARNING and log.exc_info is None for log in logs)
    # A line per failed renewal (the last try may also time out before it reaches the store),
    # and one when the runner gives up.
    assert renewals.failed >= 2  # retried
    assert len(logs[:-1]) >= renewals.failed
    assert all("lease renewal failed" in log.getMessage() for log in logs[:-1])
    assert "engine stopped, job left for the reaper" in logs[-1].getMessage()
