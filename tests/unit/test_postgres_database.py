"""PostgreSQL's bounded waits (issue 14): no transaction waits longer than the busy bound for a
lock or for a connection, nor runs a statement longer than the statement bound; each is
answered DatabaseBusy instead, with nothing committed."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import AsyncIterator

import psycopg
import pytest
from sqlalchemy import Connection, text

from dreamserve.app import open_server
from dreamserve.errors import DatabaseBusy
from dreamserve.settings import Settings
from dreamserve.storage import user_queries
from dreamserve.storage.database import DatabaseConfig, PostgresDatabase, RunnerLock

pytestmark = pytest.mark.anyio

QUICK = DatabaseConfig(busy_seconds=0.3, statement_seconds=0.5)


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[PostgresDatabase]:
    database = PostgresDatabase(postgres_url, QUICK)
    await database.migrate()
    yield database
    await database.close()


def sleep(seconds: float):
    def run(conn: Connection) -> None:
        conn.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})

    return run


async def test_every_connection_has_the_lock_and_statement_timeouts(db: PostgresDatabase) -> None:
    def timeouts(conn: Connection) -> tuple[str, str]:
        return (
            conn.execute(text("SHOW lock_timeout")).scalar_one(),
            conn.execute(text("SHOW statement_timeout")).scalar_one(),
        )

    assert await db.read(timeouts) == ("300ms", "500ms")


async def test_options_of_the_url_win_over_the_timeouts(postgres_url: str) -> None:
    database = PostgresDatabase(f"{postgres_url}?options=-c%20lock_timeout%3D1234", QUICK)
    try:
        setting = await database.read(lambda conn: conn.execute(text("SHOW lock_timeout")))
        assert setting.scalar_one() == "1234ms"
    finally:
        await database.close()


async def test_writes_behind_a_held_lock_are_answered_busy_in_time(
    db: PostgresDatabase, postgres_url: str
) -> None:
    """Fifteen writes behind another transaction's lock (more than there are connections):
    each gets DatabaseBusy within the bound (those that waited for a connection as long as
    that, without waiting for the lock after it); the next works once the lock is free."""
    user = await db.write(lambda conn: user_queries.insert_user(conn, 1))

    def touch(conn: Connection) -> None:
        conn.execute(text("UPDATE users SET created_at = 2 WHERE id = :id"), {"id": user})

    with psycopg.connect(postgres_url) as other:
        other.execute("SELECT id FROM users FOR UPDATE")
        started = time.monotonic()
        async with asyncio.timeout(20):  # unbounded, they would wait for the rollback below
            writes = [db.write(touch) for _ in range(15)]
            results = await asyncio.gather(*writes, return_exceptions=True)
        waited = time.monotonic() - started
        other.rollback()
    assert all(isinstance(result, DatabaseBusy) for result in results), results
    assert waited >= 0.3
    await db.write(touch)


async def test_a_transaction_that_waited_the_bound_for_a_connection_does_not_begin(
    db: PostgresDatabase,
) -> None:
    slow = [asyncio.ensure_future(db.read(sleep(0.4))) for _ in range(PostgresDatabase.POOL_SIZE)]
    await asyncio.sleep(0.05)  # every connection taken
    ran: list[int] = []
    with pytest.raises(DatabaseBusy):
        await db.write(lambda conn: ran.append(user_queries.insert_user(conn, 1)))
    await asyncio.gather(*slow)
    assert ran == []


async def test_a_statement_past_the_statement_bound_is_cancelled(db: PostgresDatabase) -> None:
    # Unbounded, pg_sleep(60) would outlast the 20 s limit (a limit, not a timing: the bound is
    # 0.5 s, and machines are noisy).
    with pytest.raises(DatabaseBusy):
        async with asyncio.timeout(20):
            await db.read(sleep(60))


def runner_lock_backend(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
        assert row is not None
        conn.execute("SELECT pg_terminate_backend(%s, 2000)", (row[0],))
        return int(row[0])


async def test_a_runner_lock_lost_with_its_connection_is_retaken_shared(
    db: PostgresDatabase, postgres_url: str
) -> None:
    assert await db.lock_runner()  # the only one: it may recover every unfinished job
    await db.share_runner_lock()
    assert await db.keep_runner_lock() is RunnerLock.HELD
    await asyncio.to_thread(runner_lock_backend, postgres_url)
    assert await db.keep_runner_lock() is RunnerLock.RETAKEN
    assert await db.keep_runner_lock() is RunnerLock.HELD
    await asyncio.to_thread(runner_lock_backend, postgres_url)
    other = PostgresDatabase(postgres_url, QUICK)
    third = PostgresDatabase(postgres_url, QUICK)
    try:
        assert await other.lock_runner()  # alone, before the first server's next check
        await other.share_runner_lock()  # recovered: the others may run jobs again
        assert await db.keep_runner_lock() is RunnerLock.RETAKEN  # shared, beside the other
        assert await third.lock_runner() is False  # others run jobs: it recovers none
        assert await other.keep_runner_lock() is RunnerLock.HELD
    finally:
        await third.close()
        await other.close()


async def test_servers_starting_at_once_on_an_empty_database_make_one_first_start(
    postgres_url: str, tmp_path
) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    async with open_server(settings) as one, open_server(settings) as two:
        servers = [one, two] * 3
        tokens = await asyncio.gather(*(each.service.tokens.bootstrap() for each in servers))
        users = await one.db.read(user_queries.count_users)
    assert len([token for token in tokens if token is not None]) == 1
    assert users == 1


def end_sessions(url: str) -> int:
    """End every other session of the database, as a restart or a failover does: how many."""
    with psycopg.connect(url, autocommit=True) as conn:
        ended = conn.execute(
            "SELECT pg_terminate_backend(pid, 2000) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(ended)


async def test_connections_whose_sessions_ended_are_replaced_before_use(
    db: PostgresDatabase, postgres_url: str
) -> None:
    """Every pooled session ended by the server (no ping at checkout any more): each next read
    and write gets a new connection, without an error."""
    await asyncio.gather(*(db.read(sleep(0.2)) for _ in range(4)))  # (at least) four in the pool
    assert await asyncio.to_thread(end_sessions, postgres_url) >= 2
    for _ in range(PostgresDatabase.POOL_SIZE):
        assert await db.read(lambda conn: conn.execute(text("SELECT 1")).scalar_one()) == 1
        await db.write(lambda conn: user_queries.insert_user(conn, 1))


async def test_reads_open_no_transaction_and_writes_do(db: PostgresDatabase) -> None:
    """A read's statements run in autocommit (no BEGIN and ROLLBACK round trips); a write's in
    one transaction."""

    def status(conn: Connection) -> psycopg.pq.TransactionStatus:
        conn.execute(text("SELECT 1"))
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        return driver.info.transaction_status

    assert await db.read(status) is psycopg.pq.TransactionStatus.IDLE
    assert await db.write(status) is psycopg.pq.TransactionStatus.INTRANS


async def test_connections_above_descriptor_1024_are_checked_out(postgres_url: str) -> None:
    """A busy server holds over a thousand sockets (clients waiting with `?wait=`): a pooled
    connection's descriptor above 1024 is checked at checkout as well (select() takes none)."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2048:
        pytest.skip("the process may not open 1100 more files")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    database = PostgresDatabase(postgres_url, QUICK)
    try:
        assert await database.read(lambda conn: conn.execute(text("SELECT 1")).scalar_one()) == 1
        fileno = await database.read(lambda conn: conn.connection.driver_connection.fileno())
        assert fileno > 1024
    finally:
        await database.close()
        for descriptor in held:
            os.close(descriptor)
