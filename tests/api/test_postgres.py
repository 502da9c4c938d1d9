"""The same service on PostgreSQL: a database of its own per test, dropped afterwards.

The full suite on both databases comes with the accounts issue; these cover the PostgreSQL
paths that differ from SQLite (a connection pool on threads, real concurrent transactions).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from support import SMALL, GatedEngine, open_harness, wait_started

from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    try:
        admin = psycopg.connect(SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL at {SERVER}: {error}")
    name = f"dreamserve_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def pg_settings(settings: Settings, postgres_url: str) -> Settings:
    return settings.model_copy(update={"database_url": postgres_url})


async def test_a_job_runs_to_completed_on_postgresql(pg_settings: Settings) -> None:
    async with open_harness(pg_settings) as harness:
        reply = await harness.post(SMALL)
        assert reply.status_code == 200
        record = await harness.wait(reply.json()["jobid"])
        assert record["status"] == "completed"
        image = record["response"]["images"][0]
        download = await harness.client.get(image["imageUrl"])
        assert download.status_code == 200
        assert f":s{len(download.content)}-uri:" in image["assetRef"]
        assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_concurrent_submissions_never_over_admit_on_postgresql(pg_settings: Settings) -> None:
    """Transactions run on a pool of threads here, so the slot UPDATEs really race."""
    engine = GatedEngine()
    async with (
        open_harness(pg_settings, engines={"procedural": engine.factory}) as first,
        open_harness(pg_settings, engines={"procedural": engine.factory}, resume=False) as second,
    ):
        replies = await asyncio.gather(*(h.post(SMALL) for h in (first, second) * 30))
        statuses = [reply.status_code for reply in replies]
        assert statuses.count(200) == 10
        assert statuses.count(429) == 50
        await wait_started(engine, 10)
        assert await first.slots() == {"LOCAL:procedural": 10}
        engine.gate.set()
        for reply in replies:
            if reply.status_code == 200:
                assert (await first.wait(reply.json()["jobid"]))["status"] == "completed"
        assert await second.slots() == {"LOCAL:procedural": 0}


async def test_an_interrupted_job_runs_again_on_postgresql(pg_settings: Settings) -> None:
    engine = GatedEngine()
    async with open_harness(pg_settings, engines={"procedural": engine.factory}) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
    async with open_harness(pg_settings) as harness:
        assert (await harness.wait(jobid))["status"] == "completed"
        assert await harness.slots() == {"LOCAL:procedural": 0}
