"""Scale-out on PostgreSQL: jobs go through procrastinate (one queue per account) to whichever
process runs them, any number of servers share one database, and a cancel made anywhere stops
the engine where the job runs."""

from __future__ import annotations

import pytest
from support import (
    SMALL,
    CancellableEngine,
    GatedEngine,
    eventually,
    in_process_worker,
    open_harness,
    procrastinate_rows,
    wait_started,
)

from dreamserve.config import ConfigError
from dreamserve.dispatch.postgres import PostgresDispatcher, apply_schema
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

ACCOUNT = "LOCAL:procedural"


def _settings(settings: Settings, postgres_url: str, **changes: object) -> Settings:
    return settings.model_copy(update={"database_url": postgres_url, **changes})


async def test_a_job_runs_through_procrastinate(settings: Settings, postgres_url: str) -> None:
    on_postgres = _settings(settings, postgres_url)
    async with open_harness(on_postgres, dispatcher=None) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        assert (await harness.wait(jobid))["status"] == "completed"
        assert await harness.slots() == {ACCOUNT: 0}


async def test_two_servers_on_one_postgresql_both_start_and_serve(
    settings: Settings, postgres_url: str
) -> None:
    on_postgres = _settings(settings, postgres_url)
    async with (
        open_harness(on_postgres, dispatcher=None) as first,
        open_harness(on_postgres, dispatcher=None) as second,
    ):
        jobs = [(await api.post(SMALL)).json()["jobid"] for api in (first, second)]
        # Each waited on through the other server.
        assert (await second.wait(jobs[0]))["status"] == "completed"
        assert (await first.wait(jobs[1]))["status"] == "completed"
        assert await first.slots() == {ACCOUNT: 0}


async def test_a_worker_runs_only_the_queues_of_its_accounts(
    settings: Settings, postgres_url: str
) -> None:
    api_only = _settings(settings, postgres_url, run_jobs=False)
    engines = {"procedural": GatedEngine().factory}
    async with open_harness(api_only, dispatcher=None) as api:
        async with in_process_worker(api_only, ["LOCAL:elsewhere"], engines):
            jobid = (await api.post(SMALL)).json()["jobid"]
            # Enqueued on its account's queue, which no process works yet.
            assert procrastinate_rows(postgres_url) == [("account:" + ACCOUNT, "todo")]
            assert (await api.get(jobid)).json()["status"] == "created"
        engine = GatedEngine()
        engine.gate.set()
        async with in_process_worker(api_only, [ACCOUNT], {"procedural": engine.factory}):
            record = await api.wait(jobid)
            assert record["status"] == "completed", (record.get("error"), record.get("details"))
        assert engine.started == 1
        assert await api.slots() == {ACCOUNT: 0}


async def test_a_cancel_through_the_api_stops_the_engine_on_thein_process_worker(
    settings: Settings, postgres_url: str
) -> None:
    # A lease renewed every 40 s: a cancel seen within the 10 s of `eventually` came through
    # the notifications, not the renewal that finds the job ended.
    api_only = _settings(settings, postgres_url, run_jobs=False, lease_seconds=120.0)
    engine = CancellableEngine()
    async with (
        open_harness(api_only, dispatcher=None) as api,
        in_process_worker(api_only, None, {"procedural": engine.factory}),
    ):
        jobid = (await api.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        reply = await api.call("DELETE", f"/scheduler/{jobid}")
        assert reply.status_code == 200, reply.text
        # Heard through PostgreSQL's notifications, long before the lease's next renewal.
        await eventually(lambda: engine.cancelled == 1)
        record = (await api.get(jobid)).json()
        assert (record["status"], record["error"]) == ("failed", "Cancelled by user")
        assert await api.slots() == {ACCOUNT: 0}


class LosesItsEnqueue:
    """The process dies between the job's commit and its enqueue: the job is admitted, leased,
    and on no queue."""

    def __init__(self, runner: object) -> None:
        return None

    async def dispatch(self, job_id: int, account: str | None = None) -> None:
        return None

    def cancel(self, job_id: int) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_a_job_whose_enqueue_was_lost_is_sent_again_by_a_reaper(
    settings: Settings, postgres_url: str
) -> None:
    quick = _settings(
        settings, postgres_url, lease_seconds=3.0, reaper_interval_seconds=0.1, run_jobs=False
    )
    engine = GatedEngine()
    engine.gate.set()
    async with (
        in_process_worker(quick, None, {"procedural": engine.factory}),  # runs jobs, and reaps
        open_harness(quick, dispatcher=LosesItsEnqueue, resume=False) as api,
    ):
        jobid = (await api.post(SMALL)).json()["jobid"]
        assert procrastinate_rows(postgres_url) == []
        # The worker's reaper finds it queued with its lease run out and enqueues it.
        record = await api.wait(jobid)
        assert record["status"] == "completed", (record.get("error"), record.get("details"))
        assert await api.slots() == {ACCOUNT: 0}
    assert engine.started == 1


async def test_run_jobs_false_is_refused_on_sqlite(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="DREAMSERVE_RUN_JOBS=false needs PostgreSQL"):
        async with open_harness(settings.model_copy(update={"run_jobs": False})):
            pass


async def test_procrastinate_schema_is_applied_once(postgres_url: str) -> None:
    await apply_schema(postgres_url)  # there already, or made now
    assert await apply_schema(postgres_url) is False


async def test_a_dispatch_that_names_the_account_enqueues_without_a_lookup(
    postgres_url: str,
) -> None:
    """A submission knows its job's account: the enqueue goes to that account's queue without
    reading the job (a lookup is only for jobs sent again, by the reaper)."""

    class Idle:
        async def run(self, job_id: int) -> None: ...

        def cancel(self, job_id: int) -> None: ...

    async def no_lookup(job_id: int) -> str | None:
        raise AssertionError("the account was given")

    dispatcher = PostgresDispatcher(Idle(), postgres_url, runs_jobs=False, account_of=no_lookup)
    await dispatcher.open()
    try:
        await dispatcher.dispatch(7, "LOCAL:gpu0")
    finally:
        await dispatcher.close()
    assert ("account:LOCAL:gpu0", "todo") in procrastinate_rows(postgres_url)
