"""PostgreSQL's runner lock lives with a connection: a server whose connection ends takes the lock
again when it is free, and stops running jobs when another server took it; no job runs twice."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
import pytest
from PIL import Image
from support import SMALL, CancellableEngine, GatedEngine, eventually, open_harness, wait_started

from dreamserve.engines.base import CancelSignal, GenerationRequest
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

RUNNER_LOCK = 7237955865294632566  # storage/database.py's key
HOLDERS = (
    "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' AND database = "
    "(SELECT oid FROM pg_database WHERE datname = current_database())"
)


@pytest.fixture
def pg_settings(tmp_path, postgres_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=postgres_url,
        public_url="http://testserver",
        progress_interval_seconds=0.05,
        render_threads=2,
    )


def advisory_locks(url: str) -> list[tuple[int, bool]]:
    """(backend pid, granted) of each advisory lock of the database, held or waited for."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [(pid, granted) for pid, granted in conn.execute(HOLDERS).fetchall()]


def terminate(url: str, pid: int) -> None:
    """End a backend as an adversary (or a failover) would, and wait until it is gone."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s, 2000)", (pid,))


async def until(condition: Callable[[], bool], seconds: float) -> None:
    """`eventually` for conditions that query the database (off the event loop)."""
    async with asyncio.timeout(seconds):
        while not await asyncio.to_thread(condition):  # noqa: ASYNC110 (another process's state)
            await asyncio.sleep(0.05)


class SignalEngine(CancellableEngine):
    """Runs until stopped (a cancelled task or its cancel signal), keeping each job's signal."""

    def __init__(self) -> None:
        super().__init__()
        self.signals: list[CancelSignal] = []

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        self.signals.append(cancel)
        return await super().generate(request, progress, cancel)


async def test_a_runner_lock_lost_with_its_connection_is_taken_again(
    pg_settings: Settings,
) -> None:
    url = pg_settings.database
    engine = GatedEngine()
    async with open_harness(pg_settings, engines={"procedural": engine.factory}) as harness:
        running = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        [(lost, _)] = await asyncio.to_thread(advisory_locks, url)
        await asyncio.to_thread(terminate, url, lost)

        def held_again() -> bool:
            return [granted for pid, granted in advisory_locks(url) if pid != lost] == [True]

        await until(held_again, 2.5)
        # The job that ran through the loss goes on (nothing resumed it), and new ones run.
        engine.gate.set()
        assert (await harness.wait(running, 5))["status"] == "completed"
        later = (await harness.post(SMALL)).json()["jobid"]
        assert (await harness.wait(later, 5))["status"] == "completed"
        assert engine.started == 2


async def test_a_runner_lock_taken_by_another_server_stops_this_ones_runners(
    pg_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    url = pg_settings.database
    engine = SignalEngine()
    async with open_harness(pg_settings, engines={"procedural": engine.factory}) as first:
        running = (await first.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        [(lost, _)] = await asyncio.to_thread(advisory_locks, url)
        # Another server waits for the lock: it has it the moment the first's connection ends.
        with psycopg.connect(url, autocommit=True) as other:
            take = f"SELECT pg_advisory_lock({RUNNER_LOCK})"
            taking = asyncio.create_task(asyncio.to_thread(other.execute, take))
            await until(lambda: len(advisory_locks(url)) == 2, 2)
            await asyncio.to_thread(terminate, url, lost)
            await taking
            await eventually(lambda: engine.signals[0].is_set, 2.5)
            # The first server claims nothing any more: a job it admits waits for the holder.
            later = (await first.post(SMALL)).json()["jobid"]
            await asyncio.sleep(0.3)
            assert engine.started == 1
            assert (await first.get(later)).json()["status"] == "created"
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert errors == [
                "runner lock lost to another dreamserve server: this one stops running jobs "
                "(they are the holder's to run) and serves only the API"
            ]
        # The other server goes; the next to start resumes both jobs, which the first never
        # runs again.
        async with open_harness(pg_settings) as second:
            assert (await second.wait(running, 5))["status"] == "completed"
            assert (await second.wait(later, 5))["status"] == "completed"
        assert engine.started == 1
