"""Shared fixtures: settings in a temp data dir, and an in-process harness.

A test that takes `settings` (or `database_url`) runs on SQLite, the embedded default. A test
marked `both_databases` (the storage contract, the job lifecycle, and the end-to-end tests of
what the two databases do differently: slots, leases, restarts, locks, notifications) runs on
PostgreSQL at 127.0.0.1:5432 too (user postgres, no password). Validation and the rest run
once: what they check is above the database.

The PostgreSQL runs of one test process (one pytest-xdist worker) share one database made for
it and dropped at its end; each test starts from empty tables. Without a PostgreSQL server
those runs are skipped, unless DREAMSERVE_TEST_POSTGRES is `required` (CI sets it), which
makes them fail instead.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from objectstore import moto_store, store_environment
from support import POSTGRES_SERVER, Harness, open_harness

from dreamserve.settings import Settings
from dreamserve.storage.tables import metadata


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str | None]:
    """A database of this test run (None when no server answers), dropped at the end."""
    try:
        admin = psycopg.connect(POSTGRES_SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        yield None
        return
    name = f"dreamserve_test_{os.getpid()}_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _empty_tables(url: str) -> None:
    """Remove every row a previous test left (the schema and its version stay)."""
    tables = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
    with psycopg.connect(url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('public.jobs')").fetchone()
        if exists is not None and exists[0] is not None:
            conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        queued = conn.execute("SELECT to_regclass('public.procrastinate_jobs')").fetchone()
        if queued is not None and queued[0] is not None:  # dispatch/postgres.py's queue
            conn.execute("TRUNCATE procrastinate_jobs, procrastinate_workers CASCADE")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database_url" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_databases") is not None
        kinds = ["sqlite", "postgresql"] if both else ["sqlite"]
        metafunc.parametrize("database_url", kinds, indirect=True)


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None for the default SQLite file of the data dir; else a PostgreSQL URL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def postgres_url(postgres_database: str | None) -> str:
    """The PostgreSQL database of this test process, its tables empty (for tests of PostgreSQL
    alone)."""
    if postgres_database is None:
        message = f"no PostgreSQL server at {POSTGRES_SERVER}"
        if os.environ.get("DREAMSERVE_TEST_POSTGRES") == "required":
            pytest.fail(message)
        pytest.skip(message)
    _empty_tables(postgres_database)
    return postgres_database


@pytest.fixture
def settings(tmp_path, database_url: str | None) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        public_url="http://testserver",
        progress_interval_seconds=0.05,
        render_threads=2,
    )


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    async with open_harness(settings) as opened:
        yield opened


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible store (moto) for this test process, started when a test first asks."""
    with moto_store() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The store's `AWS_*` variables set for this test (obstore reads them when a store opens):
    the store's URL."""
    for name, value in store_environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    return s3_endpoint


@pytest.fixture
def uvicorn_loggers() -> Any:
    """uvicorn's loggers as they are, restored after a test that lets uvicorn configure them."""
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg.handlers[:], lg.filters[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, (handlers, filters, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers, lg.filters, lg.level, lg.propagate = handlers, filters, level, propagate
