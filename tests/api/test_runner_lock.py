"""PostgreSQL's runner lock lives with a connection: a server whose connection ends takes the lock
again; servers share it, and one that starts beside another takes none of its jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
import pytest
from PIL import Image
from support import SMALL, CancellableEngine, GatedEngine, open_harness, wait_started

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


async def test_a_second_server_runs_jobs_beside_the_first_and_takes_none_of_its_jobs(
    pg_settings: Settings,
) -> None:
    """On PostgreSQL servers share the runner lock: one that starts while another runs jobs
    recovers nothing (the running job is not run twice), and runs the jobs it admits."""
    engine = SignalEngine()
    gated = GatedEngine()
    async with open_harness(pg_settings, engines={"procedural": engine.factory}) as first:
        running = (await first.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        async with open_harness(pg_settings, engines={"procedural": gated.factory}) as second:
            gated.gate.set()
            later = (await second.post(SMALL)).json()["jobid"]
            assert (await second.wait(later, 5))["status"] == "completed"
            assert gated.started == 1  # its own job, not the first's
            assert not engine.signals[0].is_set
            assert (await second.get(running)).json()["status"] == "created"
        assert engine.started == 1
