"""GET /healthz and GET /readyz: no token; /readyz 503 naming each failing check (the database
unreachable or not migrated, the blob store not writable, a job runner ended)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import POSTGRES_SERVER
from httpx import ASGITransport, AsyncClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from support import Harness, open_harness

from dreamserve import __version__
from dreamserve.api.health import (
    NOT_RUN_HERE,
    Readiness,
    check_blobs,
    check_database,
    check_runners,
    migration_heads,
)
from dreamserve.app import create_app
from dreamserve.errors import StorageFull
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

READY = {"status": "ready", "checks": {"database": "ok", "blobs": "ok", "runners": "ok"}}
HEAD = ", ".join(sorted(migration_heads()))


def _task(name: str) -> asyncio.Task[None]:
    tasks = [task for task in asyncio.all_tasks() if task.get_name() == name]
    assert len(tasks) == 1, [task.get_name() for task in asyncio.all_tasks()]
    return tasks[0]


async def _stopped(name: str) -> None:
    task = _task(name)
    task.cancel()
    await asyncio.wait([task])


async def test_healthz_answers_with_the_version_without_a_token(harness: Harness) -> None:
    reply = await harness.client.get("/healthz")
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "version": __version__}
    assert reply.headers["cache-control"] == "no-store"


async def test_the_probes_are_root_paths_only(harness: Harness) -> None:
    for path in ("/v1/dreamina/healthz", "/v1/dreamina/readyz"):
        reply = await harness.client.get(path)
        assert (reply.status_code, reply.json()) == (404, {"error": "Not Found"})
    reply = await harness.client.post("/readyz")
    assert reply.status_code == 405
    assert reply.headers["allow"] == "GET"


@pytest.mark.both_databases
async def test_readyz_is_ready_without_a_token(harness: Harness) -> None:
    reply = await harness.client.get("/readyz")
    assert reply.status_code == 200, reply.text
    assert reply.json() == READY
    assert reply.headers["cache-control"] == "no-store"
    # The probe blob is deleted: nothing is left under the reserved prefix.
    assert not list((harness.app.state.readiness.blobs.root / "readiness").iterdir())


@pytest.mark.both_databases
async def test_readyz_names_a_database_not_at_the_newest_migration(harness: Harness) -> None:
    await harness.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    try:
        reply = await harness.client.get("/readyz")
    finally:
        restore = text("UPDATE alembic_version SET version_num = :head").bindparams(head=HEAD)
        await harness.execute(restore)
    assert reply.status_code == 503
    assert reply.json() == {
        "error": f"Not ready: database: schema at 0001, this version needs {HEAD}",
        "checks": {
            "database": f"schema at 0001, this version needs {HEAD}",
            "blobs": "ok",
            "runners": "ok",
        },
    }
    assert (await harness.client.get("/readyz")).json() == READY


@contextmanager
def refusing_connections(url: str) -> Iterator[None]:
    """The PostgreSQL database refuses new connections and its sessions are ended, as if its
    server were gone; allowed again after the block."""
    name = make_url(url).database
    with psycopg.connect(POSTGRES_SERVER, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


async def test_readyz_names_an_unreachable_postgresql_database(postgres_url: str, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    async with open_harness(settings) as harness:
        with refusing_connections(postgres_url):
            reply = await harness.client.get("/readyz")
        assert reply.status_code == 503
        assert reply.json() == {
            "error": "Not ready: database: unreachable (OperationalError)",
            "checks": {
                "database": "unreachable (OperationalError)",
                "blobs": "ok",
                "runners": "ok",
            },
        }
        # Back once it is: the pool connects again.
        assert (await harness.client.get("/readyz")).json() == READY


async def test_readyz_names_a_blob_directory_that_cannot_be_written(harness: Harness) -> None:
    blobs: Path = harness.app.state.readiness.blobs.root
    shutil.rmtree(blobs, ignore_errors=True)
    await asyncio.to_thread(blobs.write_bytes, b"a file, not the blob directory")  # even for root
    reply = await harness.client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json() == {
        "error": "Not ready: blobs: not writable (Not a directory)",
        "checks": {"database": "ok", "blobs": "not writable (Not a directory)", "runners": "ok"},
    }


async def test_readyz_names_an_object_store_that_refuses_the_probe(
    s3: str, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bucket that does not exist (deleted, or a wrong name) refuses every write; the log
    says more than the reply, once."""
    bucket = f"dreamserve-missing-{uuid.uuid4().hex[:12]}"
    settings = Settings(data_dir=tmp_path / "data", blob_url=f"s3://{bucket}/blobs")
    async with open_harness(settings) as harness:
        reply = await harness.client.get("/readyz")
        assert (await harness.client.get("/readyz")).status_code == 503
    assert reply.status_code == 503
    assert reply.json()["error"] == "Not ready: blobs: not writable (FileNotFoundError)"
    assert reply.json()["checks"]["database"] == "ok"
    logged = [r.getMessage() for r in caplog.records if r.name == "dreamserve.api.health"]
    assert len(logged) == 1
    assert logged[0].startswith("not ready: blobs: not writable (FileNotFoundError): ")
    assert bucket in logged[0]


@pytest.mark.both_databases
async def test_readyz_names_a_runner_that_stopped(harness: Harness) -> None:
    await _stopped("reaper")
    reply = await harness.client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json() == {
        "error": "Not ready: runners: reaper stopped",
        "checks": {"database": "ok", "blobs": "ok", "runners": "reaper stopped"},
    }


async def test_readyz_names_a_procrastinate_worker_that_stopped(
    postgres_url: str, tmp_path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    async with open_harness(settings, dispatcher=None) as harness:  # procrastinate's workers
        assert (await harness.client.get("/readyz")).json() == READY
        await _stopped("procrastinate-worker")
        reply = await harness.client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json()["error"] == "Not ready: runners: procrastinate-worker stopped"


async def test_a_process_that_runs_no_jobs_checks_no_runners(postgres_url: str, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url, run_jobs=False)
    async with open_harness(settings, dispatcher=None) as harness:
        await _stopped("reaper")  # it runs here too, but the runners are the workers' concern
        reply = await harness.client.get("/readyz")
    assert reply.status_code == 200, reply.text
    assert reply.json()["checks"] == {"database": "ok", "blobs": "ok", "runners": NOT_RUN_HERE}


async def test_readyz_before_the_server_opened(settings: Settings) -> None:
    app = create_app(settings)  # no lifespan: nothing open
    async with AsyncClient(transport=ASGITransport(app=app), base_url="http://t") as client:
        reply = await client.get("/readyz")
        assert (await client.get("/healthz")).status_code == 200
    assert reply.status_code == 503
    assert reply.json()["error"] == (
        "Not ready: database: not open; blobs: not open; runners: not open"
    )


# The checks themselves, on stubs.


class Blobs:
    """A blob store whose put raises `error`, or waits for `release`; counts its puts."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.release: asyncio.Event | None = None
        self.puts: list[str] = []
        self.deleted: list[str] = []

    async def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        if self.release is not None:
            await self.release.wait()
        if self.error is not None:
            raise self.error

    async def delete(self, key: str) -> None:
        self.deleted.append(key)


class Db:
    def __init__(self, result: Any) -> None:
        self.result = result

    async def read(self, fn: Any) -> Any:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


async def test_the_blob_check_writes_and_deletes_a_probe_under_its_prefix() -> None:
    blobs = Blobs()
    assert await check_blobs(blobs) == "ok"  # type: ignore[arg-type]
    assert blobs.deleted == blobs.puts
    assert blobs.puts[0].startswith("readiness/")
    assert blobs.puts[0].endswith(".probe")


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (StorageFull(), "not writable (no space left)"),
        (PermissionError(13, "Permission denied"), "not writable (Permission denied)"),
        (RuntimeError("boom"), "not writable (RuntimeError)"),
    ],
)
async def test_the_blob_check_says_why_a_write_failed(error: Exception, reason: str) -> None:
    assert await check_blobs(Blobs(error)) == reason  # type: ignore[arg-type]


async def test_the_database_check_names_the_revisions() -> None:
    assert await check_database(Db(migration_heads())) == "ok"  # type: ignore[arg-type]
    empty = await check_database(Db(frozenset()))  # type: ignore[arg-type]
    assert empty == f"schema at no revision, this version needs {HEAD}"
    down = await check_database(Db(ConnectionRefusedError()))  # type: ignore[arg-type]
    assert down == "unreachable (ConnectionRefusedError)"


async def test_a_check_that_hangs_is_cut_at_its_bound() -> None:
    blobs = Blobs()
    blobs.release = asyncio.Event()  # never set: the store does not answer
    readiness = Readiness(Db(migration_heads()), blobs, None, seconds=0.05)  # type: ignore[arg-type]
    assert await readiness.check() == {
        "database": "ok",
        "blobs": "no answer within 0.05 s",
        "runners": NOT_RUN_HERE,
    }


async def test_probes_that_come_together_share_one_check() -> None:
    blobs = Blobs()
    blobs.release = asyncio.Event()
    readiness = Readiness(Db(migration_heads()), blobs, None)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(readiness.check()) for _ in range(20)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    blobs.release.set()
    results = await asyncio.gather(*waiting)
    assert len(blobs.puts) == 1
    assert all(result["blobs"] == "ok" for result in results)
    await readiness.check()
    assert len(blobs.puts) == 2  # the next probe checks again


async def test_the_runner_check_says_which_task_ended_and_how() -> None:
    async def crash() -> None:
        raise RuntimeError("bug")

    async def forever() -> None:
        await asyncio.Event().wait()

    async def done() -> None:
        return None

    crashed = asyncio.create_task(crash(), name="reaper")
    ended = asyncio.create_task(done(), name="runner-lock")
    running = asyncio.create_task(forever(), name="procrastinate-worker")
    await asyncio.wait([crashed, ended])
    assert check_runners([running]) == "ok"
    assert check_runners([crashed, running, ended]) == (
        "reaper crashed (RuntimeError), runner-lock ended"
    )
    running.cancel()
    await asyncio.wait([running])
    assert check_runners([running]) == "procrastinate-worker stopped"
