"""Restarts lose nothing: unfinished jobs run again (or fail clearly) and no slot leaks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Connection, select, update
from support import SMALL, GatedEngine, open_harness, wait_started

from dreamserve.service import AnotherRunner
from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts, jobs

pytestmark = [pytest.mark.anyio, pytest.mark.both_databases]


async def test_a_job_interrupted_by_a_stop_runs_again_on_the_next_start(settings: Settings) -> None:
    engine = GatedEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        token = harness.token
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        seed = await harness.server.db.read(spec_seed(jobid))
    # The server stopped with the job running: it is still `created` and holds its slot.
    async with open_harness(settings) as harness:
        assert harness.token != token  # a new token for the same user 1
        record = await harness.wait(jobid)
        assert record["status"] == "completed"
        assert len(record["response"]["images"]) == 1
        # The seed picked at admission (SMALL has none) is the one the second attempt used.
        assert isinstance(seed, int)
        assert record["response"]["images"][0]["seed"] == seed
        assert await harness.slots() == {"LOCAL:procedural": 0}


def spec_seed(jobid: str) -> Callable[[Connection], Any]:
    """What reads the seed stored in a job's spec."""

    def read(conn: Connection) -> Any:
        spec = conn.execute(select(jobs.c.spec).where(jobs.c.jobid == jobid)).scalar_one()
        return spec["seed"]

    return read


class NeverRun:
    """A dispatcher that takes jobs and runs none: the process 'dies' right after admission."""

    def __init__(self, runner: object) -> None:
        return None

    async def dispatch(self, job_id: int, account: str | None = None) -> None:
        return None

    def cancel(self, job_id: int) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_job_admitted_but_never_started_runs_on_the_next_start(settings: Settings) -> None:
    async with open_harness(settings, dispatcher=NeverRun) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        record = (await harness.get(jobid)).json()
        assert (record["status"], "started" in record) == ("created", False)
        assert await harness.slots() == {"LOCAL:procedural": 1}
    async with open_harness(settings) as harness:
        assert (await harness.wait(jobid))["status"] == "completed"
        assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_a_second_server_on_the_same_data_dir_is_refused(settings: Settings) -> None:
    if settings.database.startswith("postgresql"):
        pytest.skip("on PostgreSQL any number run jobs (test_postgres_dispatch.py)")
    async with open_harness(settings):
        with pytest.raises(AnotherRunner, match="run one server per data directory"):
            async with open_harness(settings):
                pass
    async with open_harness(settings) as harness:  # the lock went with the first server
        assert (await harness.post(SMALL)).status_code == 200


async def test_a_running_job_is_not_run_twice_when_dispatched_again(settings: Settings) -> None:
    engine = GatedEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        job = await harness.server.db.read(lambda c: c.execute(select(jobs.c.id)).scalar_one())
        await harness.server.dispatcher.dispatch(job)  # a duplicate delivery
        engine.gate.set()
        assert (await harness.wait(jobid))["status"] == "completed"
        assert engine.started == 1


async def test_a_job_interrupted_too_often_fails_with_a_clear_error(settings: Settings) -> None:
    engine = GatedEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        await harness.execute(update(jobs).values(attempts=3))
    async with open_harness(settings) as harness:
        record = (await harness.get(jobid)).json()
        assert record["status"] == "failed"
        assert record["error"] == "Server stopped while the job was running"
        assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_slot_counts_are_repaired_on_start(settings: Settings) -> None:
    async with open_harness(settings) as harness:
        await harness.execute(update(accounts).values(running=7))
    async with open_harness(settings) as harness:
        assert await harness.slots() == {"LOCAL:procedural": 0}
        no_jobs = await harness.server.db.read(lambda c: c.execute(select(jobs.c.id)).first())
        assert no_jobs is None
