"""PostgreSQL's bounded waits (issue 14): no transaction waits longer than the busy bound for a
lock or for a connection, nor runs a statement longer than the statement bound; each is
answered DatabaseBusy instead, with nothing committed."""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Connection, text

from dreamserve.app import open_server
from dreamserve.errors import DatabaseBusy
from dreamserve.jobs import Spec
from dreamserve.settings import Settings
from dreamserve.storage import account_queries, job_queries, user_queries
from dreamserve.storage.database import DatabaseConfig, PostgresDatabase, RunnerLock
from dreamserve.storage.job_store import JobTransaction

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
    # Every connection held until the write has waited past its bound (a fixed 0.4 s hold,
    # begun late on a loaded machine, once let the write have a connection within it).
    holding = threading.Semaphore(0)
    release = threading.Event()

    def hold(conn: Connection) -> None:
        conn.execute(text("SELECT 1"))
        holding.release()
        release.wait(30)

    def all_held() -> bool:
        return all(holding.acquire(timeout=30) for _ in range(PostgresDatabase.POOL_SIZE))

    held = [asyncio.ensure_future(db.read(hold)) for _ in range(PostgresDatabase.POOL_SIZE)]
    ran: list[int] = []
    try:
        assert await asyncio.to_thread(all_held)
        write = asyncio.ensure_future(
            db.write(lambda conn: ran.append(user_queries.insert_user(conn, 1)))
        )
        await asyncio.sleep(QUICK.busy_seconds + 0.2)  # at least this long, the write waited
    finally:
        release.set()
        await asyncio.gather(*held)
    with pytest.raises(DatabaseBusy):
        await write
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


CONFLICT = text(
    "DO $$ BEGIN RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001'; END $$"
)


def created_at(user: int):
    def read(conn: Connection) -> int:
        query = text("SELECT created_at FROM users WHERE id = :id")
        return int(conn.execute(query, {"id": user}).scalar_one())

    return read


async def test_a_transaction_rolled_back_for_a_conflict_runs_again(db: PostgresDatabase) -> None:
    """A serialization failure (or a deadlock's victim) is rolled back whole by the server:
    the transaction runs again from the start, and what its last try wrote is committed."""
    user = await db.write(lambda conn: user_queries.insert_user(conn, 1))
    tries: list[int] = []

    def conflicting_once(conn: Connection) -> int:
        tries.append(len(tries) + 1)
        update = text("UPDATE users SET created_at = :at WHERE id = :id")
        conn.execute(update, {"at": 100 + len(tries), "id": user})
        if len(tries) == 1:
            conn.execute(CONFLICT)
        return len(tries)

    assert await db.write(conflicting_once) == 2
    assert await db.read(created_at(user)) == 102


async def test_a_transaction_that_conflicts_at_every_try_is_answered_busy(
    db: PostgresDatabase,
) -> None:
    """Three tries, then DatabaseBusy (503 with Retry-After) with nothing committed, rather
    than the server's error as a 500."""
    user = await db.write(lambda conn: user_queries.insert_user(conn, 1))
    tries: list[int] = []

    def always_conflicting(conn: Connection) -> None:
        tries.append(1)
        conn.execute(text("UPDATE users SET created_at = 7 WHERE id = :id"), {"id": user})
        conn.execute(CONFLICT)

    with pytest.raises(DatabaseBusy):
        await db.write(always_conflicting)
    assert len(tries) == 3
    assert await db.read(created_at(user)) == 1


async def test_a_deadlock_victim_runs_again_and_commits(postgres_url: str) -> None:
    """Two transactions that take two rows in opposite orders: PostgreSQL ends the deadlock by
    rolling back ours (the only one to look for deadlocks within 30 s), which runs again once
    the other committed. Its lock bound is above the deadlock timeout, as by
    default: below it, the wait would end as DatabaseBusy before any deadlock is seen."""
    db = PostgresDatabase(postgres_url, DatabaseConfig(busy_seconds=10))
    await db.migrate()
    try:
        one, two = [await db.write(lambda conn: user_queries.insert_user(conn, 1)) for _ in "12"]
        holds_one = threading.Event()
        tries: list[int] = []
        touch = "UPDATE users SET created_at = created_at + 1 WHERE id = "

        def one_then_two(conn: Connection) -> int:
            tries.append(1)
            conn.execute(text(touch + ":id"), {"id": one})
            holds_one.set()
            conn.execute(text(touch + ":id"), {"id": two})
            return len(tries)

        with psycopg.connect(postgres_url) as other:
            other.execute("SET deadlock_timeout = '30s'")  # the deadlock is seen by ours alone
            other.execute(touch + "%s", (two,))
            ours = asyncio.ensure_future(db.write(one_then_two))
            assert await asyncio.to_thread(holds_one.wait, 10)
            await waiting_for_a_lock(postgres_url)  # ours waits for `two`, first
            await asyncio.to_thread(other.execute, touch + "%s", (one,))  # the deadlock
            other.commit()
            assert await ours >= 2  # ran again (more, if its retry took `one` first)
        assert await db.read(created_at(one)) == 3  # the other's, then our second try's
        assert await db.read(created_at(two)) == 3
    finally:
        await db.close()


async def waiting_for_a_lock(url: str) -> None:
    """Until one session of the database waits for a lock."""
    async with asyncio.timeout(10):
        while True:
            with psycopg.connect(url) as conn:
                waiting = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                ).fetchone()
            if waiting and waiting[0]:
                return
            await asyncio.sleep(0.02)


async def test_deleting_an_account_locks_its_jobs_rows_before_its_own(
    postgres_url: str, tmp_path: Path
) -> None:
    """A job that ends locks its row, then its account's (its slot given back); deleting the
    account cancels its jobs: it must take the rows in the same order, or the two deadlock
    (seen as a 500 on DELETE /accounts while a job of the account was finishing). While a job's
    row is held, the deletion waits for it without holding the account's row."""
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    async with open_server(settings, runs_jobs=False) as server:

        def make(tx: JobTransaction) -> tuple[int, int, int]:
            user = user_queries.insert_user(tx.conn, 1)
            account_id = account_queries.insert_account(
                tx.conn,
                name="LOCAL:doomed",
                owner=user,
                email="doomed",
                region="LOCAL",
                engine="procedural",
                max_jobs=2,
                now=1,
            )
            account = account_queries.account_by_id(tx.conn, account_id)
            assert account is not None
            assert account_queries.take_slot(tx.conn, account)
            job_id = tx.admit(
                jobid="job-1",
                kind="image",
                user_id=user,
                account_id=account_id,
                account="LOCAL:doomed",
                model="seedream-4.0",
                request={"prompt": "p"},
                spec=Spec(width=8, height=8, count=1, prompt="p"),
                forecast_cost=1,
                created_at=1,
                lease_until=10_000,
            )
            return user, account_id, job_id

        user, account_id, job_id = await server.store.write(make)
        with psycopg.connect(postgres_url) as ending:  # a runner ending the job
            ending.execute("UPDATE jobs SET lease_until = lease_until WHERE id = %s", (job_id,))
            deleting = asyncio.ensure_future(server.service.accounts.delete(user, "LOCAL:doomed"))
            await waiting_for_a_lock(postgres_url)
            # Below the deadlock timeout: a lock held by the deletion fails here, at once.
            ending.execute("SET LOCAL lock_timeout = '500ms'")
            ending.execute("UPDATE accounts SET running = running - 1 WHERE id = %s", (account_id,))
            ending.commit()
            deleted = await deleting
        assert deleted == {"account": "LOCAL:doomed", "deleted": True, "remaining": 0}
        job = await server.db.read(lambda conn: job_queries.job_by_id(conn, job_id))
        assert job is not None
        assert job.error == "Cancelled by user"
