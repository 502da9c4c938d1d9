"""`dreamserve worker` without `--accounts` on PostgreSQL: it takes the accounts whose engine it
can load, leaves the others (saying why), and takes accounts added later without stopping the
jobs it runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import psycopg
import pytest
from support import (
    SMALL,
    GatedEngine,
    eventually,
    in_process_worker,
    open_harness,
    procrastinate_rows,
    wait_started,
)

from dreamserve.engines.registry import BUILTIN, EngineSource
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

ACCOUNT = "LOCAL:procedural"
# Engines the API process has: `gpu` and `remote` stand for engines a worker may lack.
API_ENGINES: Mapping[str, EngineSource] = {
    **BUILTIN,
    "gpu": BUILTIN["procedural"],
    "remote": BUILTIN["procedural"],
}


async def test_a_worker_takes_the_accounts_whose_engine_loads_and_says_which_it_leaves(
    settings: Settings, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    api_only = settings.model_copy(update={"database_url": postgres_url, "run_jobs": False})
    engine = GatedEngine()
    engine.gate.set()
    # On the worker's host: `gpu`'s module does not import (diffusers without torch, say), and
    # `remote` is no engine it has at all.
    worker_engines = {"procedural": engine.factory, "gpu": "dreamserve_no_such_module:Engine"}
    async with open_harness(api_only, dispatcher=None, engines=API_ENGINES) as api:
        await api.put_account({"account": "LOCAL:gpu", "engine": "gpu", "maxJobs": 2})
        await api.put_account({"account": "LOCAL:remote", "engine": "remote", "maxJobs": 2})
        with caplog.at_level(logging.INFO, logger="dreamserve.app"):
            async with in_process_worker(api_only, None, worker_engines):
                started = [r.getMessage() for r in caplog.records if "worker started" in r.msg]
                assert len(started) == 1, started
                assert "runs the jobs of LOCAL:procedural " in started[0]
                assert "leaves LOCAL:gpu: Engine gpu needs dreamserve_no_such_module" in started[0]
                assert "leaves LOCAL:remote: Engine remote is not installed" in started[0]
                taken = (await api.post({**SMALL, "account": ACCOUNT})).json()["jobid"]
                left = (await api.post({**SMALL, "account": "LOCAL:gpu"})).json()["jobid"]
                record = await api.wait(taken)
                assert record["status"] == "completed", record
                # The left account's job waits on its queue for a worker that can load gpu.
                await asyncio.sleep(0.5)
                assert (await api.get(left)).json()["status"] == "created"
                assert procrastinate_rows(postgres_url) == [("account:LOCAL:gpu", "todo")]
        assert engine.started == 1


async def test_a_worker_takes_accounts_added_later_without_stopping_its_jobs(
    settings: Settings, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    api_only = settings.model_copy(update={"database_url": postgres_url, "run_jobs": False})
    engine = GatedEngine()
    engines = {**API_ENGINES, "procedural": engine.factory}
    async with open_harness(api_only, dispatcher=None, engines=API_ENGINES) as api:
        with caplog.at_level(logging.INFO, logger="dreamserve.app"):
            async with in_process_worker(api_only, None, engines, relist_seconds=0.1):
                running = (await api.post({**SMALL, "account": ACCOUNT})).json()["jobid"]
                await wait_started(engine, 1)
                # Added while a job runs: the worker takes it at its next reading.
                await api.put_account({"account": "LOCAL:added", "engine": "gpu", "maxJobs": 2})
                added = (await api.post({**SMALL, "account": "LOCAL:added"})).json()["jobid"]
                record = await api.wait(added)
                assert record["status"] == "completed", record
                assert any(
                    "now also runs the jobs of LOCAL:added" in r.getMessage()
                    for r in caplog.records
                )
                # The job that ran meanwhile went on: it ends with its first (only) attempt.
                assert (await api.get(running)).json()["status"] == "created"
                engine.gate.set()
                record = await api.wait(running)
                assert record["status"] == "completed", record
        assert engine.started == 1
        await eventually(lambda: procrastinate_rows(postgres_url) == [])


async def test_a_worker_with_accounts_named_runs_them_and_says_which_cannot_run(
    settings: Settings, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    api_only = settings.model_copy(update={"database_url": postgres_url, "run_jobs": False})
    worker_engines = {**API_ENGINES, "gpu": "dreamserve_no_such_module:Engine"}
    async with open_harness(api_only, dispatcher=None, engines=API_ENGINES) as api:
        await api.put_account({"account": "LOCAL:gpu", "engine": "gpu", "maxJobs": 2})
        named = ["LOCAL:later", ACCOUNT, "LOCAL:gpu"]
        with caplog.at_level(logging.INFO, logger="dreamserve.app"):
            async with in_process_worker(api_only, named, worker_engines):
                messages = [record.getMessage() for record in caplog.records]
                assert "worker: account LOCAL:later does not exist (yet); its jobs run here" in (
                    messages
                )
                assert (
                    "worker: account LOCAL:gpu cannot run here: Engine gpu needs "
                    "dreamserve_no_such_module, which is not installed on this server: "
                    "pip install dreamserve_no_such_module"
                ) in messages
                assert (
                    "worker started: runs the jobs of LOCAL:later, LOCAL:procedural, LOCAL:gpu"
                ) in messages
                await api.put_account({"account": "LOCAL:later", "engine": "remote", "maxJobs": 2})
                jobid = (await api.post({**SMALL, "account": "LOCAL:later"})).json()["jobid"]
                record = await api.wait(jobid)
                assert record["status"] == "completed", record


FETCH = "procrastinate_fetch_job_v2(target_queue_names varchar[], p_worker_id bigint)"


@contextmanager
def fetches_refused(url: str) -> Iterator[None]:
    """procrastinate's fetch of a job fails (as on a lost connection): its worker stops on the
    error. The function is set aside for the block and put back after."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"ALTER FUNCTION {FETCH} RENAME TO procrastinate_fetch_job_v2_set_aside")
        conn.execute(
            f"CREATE FUNCTION {FETCH} RETURNS procrastinate_jobs LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'fetch refused by the test'; END $$"
        )
        try:
            yield
        finally:
            conn.execute(f"DROP FUNCTION {FETCH}")
            set_aside = FETCH.replace("v2(", "v2_set_aside(")
            conn.execute(f"ALTER FUNCTION {set_aside} RENAME TO procrastinate_fetch_job_v2")


async def test_a_procrastinate_worker_stopped_by_an_error_starts_again_and_its_job_goes_on(
    settings: Settings, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A procrastinate worker whose fetch fails stops (cancelling what it runs): it is started
    again, and the job it ran goes on to its end, in its first attempt."""
    quick = settings.model_copy(
        update={"database_url": postgres_url, "run_jobs": False, "lease_seconds": 3.0}
    )
    engine = GatedEngine()
    async with (
        open_harness(quick, dispatcher=None) as api,
        in_process_worker(quick, None, {"procedural": engine.factory}),
    ):
        jobid = (await api.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        with (
            caplog.at_level(logging.WARNING, logger="dreamserve.dispatch.postgres"),
            fetches_refused(postgres_url),
        ):
            await eventually(
                lambda: any("starting it again" in r.getMessage() for r in caplog.records),
                seconds=30,
            )
        engine.gate.set()
        record = await api.wait(jobid)
        assert record["status"] == "completed", record
        # A second job runs on the restarted worker.
        second = (await api.post(SMALL)).json()["jobid"]
        assert (await api.wait(second))["status"] == "completed"
    assert engine.started == 2  # the first job once, the second once
