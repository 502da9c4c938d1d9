"""SQLite's group commit: the writes asked for in one turn of the event loop run one after the
other, each in a savepoint of its own, and commit together; a write lock held by another
connection is waited for off the event loop, up to the busy bound."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import IntegrityError, ResourceClosedError

from dreamserve.errors import DatabaseBusy
from dreamserve.storage import user_queries
from dreamserve.storage.database import DatabaseConfig, SqliteDatabase
from dreamserve.storage.tables import users

pytestmark = pytest.mark.anyio


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqliteDatabase]:
    database = SqliteDatabase(f"sqlite:///{tmp_path / 'g.db'}")
    await database.migrate()
    yield database
    await database.close()


def add_user(created_at: int):
    return lambda conn: user_queries.insert_user(conn, created_at)


def fail_after_adding(created_at: int):
    def write(conn: Connection) -> None:
        user_queries.insert_user(conn, created_at)
        raise ValueError(f"no user {created_at}")

    return write


async def stored(db: SqliteDatabase) -> list[int]:
    """The users' created_at values, as another connection sees them: committed only."""
    with sqlite3.connect(db.path) as other:
        return [row[0] for row in other.execute("SELECT created_at FROM users ORDER BY id")]


def statements(db: SqliteDatabase) -> list[str]:
    """Every statement the server's connection runs from now on."""
    seen: list[str] = []
    driver = db._conn.connection.driver_connection
    assert driver is not None
    driver.set_trace_callback(seen.append)
    return seen


async def test_the_writes_of_one_turn_commit_once(db: SqliteDatabase) -> None:
    seen = statements(db)
    ids = await asyncio.gather(*(db.write(add_user(n)) for n in range(5)))
    assert len(set(ids)) == 5
    assert seen.count("BEGIN IMMEDIATE") == 1
    assert seen.count("COMMIT") == 1
    assert await stored(db) == [0, 1, 2, 3, 4]


async def test_writes_a_turn_apart_commit_apart(db: SqliteDatabase) -> None:
    seen = statements(db)
    await db.write(add_user(1))
    await db.write(add_user(2))
    assert seen.count("COMMIT") == 2
    assert await stored(db) == [1, 2]


async def test_a_write_sees_the_writes_queued_before_it(db: SqliteDatabase) -> None:
    def count(conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(users)).scalar_one())

    results = await asyncio.gather(db.write(add_user(1)), db.write(count), db.write(add_user(2)))
    assert results[1] == 1


async def test_a_write_that_raises_is_rolled_back_alone(db: SqliteDatabase) -> None:
    results = await asyncio.gather(
        db.write(add_user(1)),
        db.write(fail_after_adding(2)),
        db.write(add_user(3)),
        return_exceptions=True,
    )
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "no user 2"
    assert await stored(db) == [1, 3]


async def test_a_write_cancelled_before_its_turn_does_not_run(db: SqliteDatabase) -> None:
    ran: list[int] = []

    def tracked(conn: Connection) -> int:
        ran.append(1)
        return user_queries.insert_user(conn, 2)

    first = asyncio.ensure_future(db.write(add_user(1)))
    cancelled = asyncio.ensure_future(db.write(tracked))
    await asyncio.sleep(0)  # both are queued, the group not yet run
    cancelled.cancel()
    await first
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert ran == []
    assert await stored(db) == [1]


async def test_an_error_that_rolls_back_the_transaction_fails_the_writes_before_it(
    db: SqliteDatabase,
) -> None:
    """ON CONFLICT ROLLBACK ends the whole transaction: the writes already run in it are lost
    and told so; the writes after it run in a transaction of their own."""
    await db.write(add_user(0))

    def conflict(conn: Connection) -> None:
        conn.execute(text("INSERT OR ROLLBACK INTO users (id, created_at) VALUES (1, 99)"))

    results = await asyncio.gather(
        db.write(add_user(1)),
        db.write(conflict),
        db.write(add_user(3)),
        return_exceptions=True,
    )
    assert isinstance(results[1], IntegrityError)
    assert results[0] is results[1]  # lost with the transaction it ran in
    assert isinstance(results[2], int)
    assert await stored(db) == [0, 3]


async def test_a_commit_that_fails_fails_every_write_of_its_group(db: SqliteDatabase) -> None:
    """A deferred foreign key is checked at COMMIT: the group's commit fails, and so does
    every write in it; nothing of theirs is stored."""

    def orphan_token(conn: Connection) -> None:
        conn.execute(text("PRAGMA defer_foreign_keys = ON"))
        user_queries.insert_token(conn, 12345, "0" * 64, "user:12345-000000", 0)

    results = await asyncio.gather(
        db.write(add_user(1)), db.write(orphan_token), return_exceptions=True
    )
    assert all(isinstance(result, IntegrityError) for result in results)
    assert await stored(db) == []
    assert await db.write(add_user(2)) > 0  # the connection works on
    assert await stored(db) == [2]


async def test_writes_queued_when_the_database_closes_are_committed(tmp_path: Path) -> None:
    database = SqliteDatabase(f"sqlite:///{tmp_path / 'c.db'}")
    await database.migrate()
    pending = asyncio.ensure_future(database.write(add_user(7)))
    await asyncio.sleep(0)  # queued, not yet run
    await database.close()
    assert await pending > 0
    assert await stored(database) == [7]


async def test_a_write_that_raises_stopiteration_fails_alone(db: SqliteDatabase) -> None:
    """No future takes StopIteration: like a coroutine, its caller gets a RuntimeError, and
    the group and the writes after it carry on."""

    def first_of_nothing(conn: Connection) -> int:
        user_queries.insert_user(conn, 2)
        return next(iter([]))

    async with asyncio.timeout(5):
        results = await asyncio.gather(
            db.write(add_user(1)),
            db.write(first_of_nothing),
            db.write(add_user(3)),
            return_exceptions=True,
        )
        assert isinstance(results[1], RuntimeError)
        assert str(results[1]) == "transaction raised StopIteration"
        assert await db.write(add_user(4)) > 0
    assert await stored(db) == [1, 3, 4]


@pytest.fixture
async def quick(tmp_path: Path) -> AsyncIterator[SqliteDatabase]:
    """A database that waits at most 0.3 s for a lock held elsewhere."""
    database = SqliteDatabase(f"sqlite:///{tmp_path / 'q.db'}", DatabaseConfig(busy_seconds=0.3))
    await database.migrate()
    yield database
    await database.close()


@contextmanager
def locked(db: SqliteDatabase) -> Iterator[sqlite3.Connection]:
    """Another connection holds the write lock (BEGIN IMMEDIATE) until the block ends or its
    rollback."""
    other = sqlite3.connect(db.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        other.rollback()
        other.close()


async def test_a_group_that_cannot_begin_in_time_fails_every_write_and_the_next_one_works(
    quick: SqliteDatabase,
) -> None:
    """Another process holds the write lock past the busy bound: the whole group gets
    DatabaseBusy, no transaction is left open, and writes work again once the lock is free."""
    started = time.monotonic()
    with locked(quick):
        results = await asyncio.gather(
            quick.write(add_user(1)), quick.write(add_user(2)), return_exceptions=True
        )
    for result in results:
        assert isinstance(result, DatabaseBusy)
        assert (result.status, result.message) == (503, "Database busy, retry later")
        assert result.headers == {"Retry-After": "5"}
    assert time.monotonic() - started >= 0.3
    driver = quick._conn.connection.driver_connection
    assert driver is not None
    assert not driver.in_transaction
    assert await quick.write(add_user(3)) > 0
    assert await stored(quick) == [3]


async def test_writes_wait_for_the_lock_off_the_loop_and_commit_together_once_it_is_free(
    db: SqliteDatabase,
) -> None:
    """While another connection holds the lock, the loop runs on: this test's own steps run
    while the writes wait (a write waiting on the loop's thread would hold them up until its
    busy timeout, and fail, before they could run); the writes asked for meanwhile join the
    waiting group, and all of them commit in one transaction when the lock comes free."""
    seen = statements(db)
    with locked(db) as other:
        first = asyncio.gather(*(db.write(add_user(n)) for n in range(3)))
        await asyncio.sleep(0.1)
        assert not first.done()
        later = asyncio.ensure_future(db.write(add_user(3)))
        await asyncio.sleep(0.1)
        assert await stored(db) == []  # a read runs while the writes wait
        assert not first.done()
        other.rollback()
        ids = [*await first, await later]
    assert len(set(ids)) == 4
    assert await stored(db) == [0, 1, 2, 3]
    assert seen.count("COMMIT") == 1


async def test_each_write_waits_for_the_lock_from_when_it_began_to(quick: SqliteDatabase) -> None:
    """A write that waited the bound gets DatabaseBusy; one asked for later waits on and
    commits when the lock comes free within its own bound."""
    with locked(quick) as other:
        early = asyncio.ensure_future(quick.write(add_user(1)))
        await asyncio.sleep(0.2)
        late = asyncio.ensure_future(quick.write(add_user(2)))
        with pytest.raises(DatabaseBusy):
            await early
        assert not late.done()
        other.rollback()
        assert await late > 0
    assert await stored(quick) == [2]


async def test_a_write_cancelled_while_it_waits_for_the_lock_never_runs(
    quick: SqliteDatabase,
) -> None:
    ran: list[int] = []

    def tracked(conn: Connection) -> int:
        ran.append(1)
        return user_queries.insert_user(conn, 2)

    with locked(quick) as other:
        cancelled = asyncio.ensure_future(quick.write(tracked))
        kept = asyncio.ensure_future(quick.write(add_user(1)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.sleep(0.05)
        other.rollback()
        await kept
    assert ran == []
    assert await stored(quick) == [1]


async def test_reads_flow_while_another_connection_holds_the_write_lock(
    quick: SqliteDatabase,
) -> None:
    await quick.write(add_user(1))
    with locked(quick):
        count = await quick.read(
            lambda conn: conn.execute(select(func.count()).select_from(users)).scalar_one()
        )
    assert count == 1


def busy_error(path: str) -> sqlite3.OperationalError:
    """The error SQLite gives a connection that finds the database locked (SQLITE_BUSY)."""
    holder = sqlite3.connect(path, isolation_level=None)
    waiter = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN IMMEDIATE")
        waiter.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        return error
    finally:
        holder.rollback()
        holder.close()
        waiter.close()
    raise AssertionError("the database was not locked")


async def test_a_read_that_finds_the_database_locked_is_tried_again_off_the_loop(
    quick: SqliteDatabase,
) -> None:
    """In WAL mode a read finds the database locked only while another connection holds it
    exclusively (recovering a crashed writer's WAL, exclusive locking mode): it is tried
    again after a pause, the loop running on, and gets DatabaseBusy past the bound."""
    error = busy_error(quick.path)
    tries: list[float] = []

    def locked_twice(conn: Connection) -> int:
        tries.append(time.monotonic())
        if len(tries) <= 2:
            raise error
        return int(conn.execute(select(func.count()).select_from(users)).scalar_one())

    assert await quick.read(locked_twice) == 0
    assert len(tries) == 3

    def locked_for_ever(conn: Connection) -> int:
        raise error

    started = time.monotonic()
    with pytest.raises(DatabaseBusy):
        await quick.read(locked_for_ever)
    assert time.monotonic() - started >= 0.3


async def test_migrate_waits_for_the_lock_off_the_loop(tmp_path: Path) -> None:
    database = SqliteDatabase(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        with locked(database) as other:
            # The lock is let go by the loop: a migrate waiting on the loop's thread would
            # never see it go, and fail at its busy timeout.
            asyncio.get_running_loop().call_later(0.2, other.rollback)
            await database.migrate()
        assert await database.write(add_user(1)) > 0
    finally:
        await database.close()


async def test_a_write_waiting_for_the_lock_at_close_is_committed_once_it_is_free(
    tmp_path: Path,
) -> None:
    database = SqliteDatabase(f"sqlite:///{tmp_path / 'c.db'}")
    await database.migrate()
    with locked(database) as other:
        pending = asyncio.ensure_future(database.write(add_user(7)))
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_later(0.1, other.rollback)
        await database.close()
    assert await pending > 0
    assert await stored(database) == [7]


async def test_close_waits_for_another_process_lock_no_longer_than_the_busy_bound(
    tmp_path: Path,
) -> None:
    """Its last checkpoint, which empties the WAL, waits for a lock another process holds at
    most `busy_seconds` (as every wait does), not SQLite's own 5 s: the lock, let go 2 s later,
    is still held when it gives up, and the WAL is left for the next start."""
    database = SqliteDatabase(f"sqlite:///{tmp_path / 'c.db'}", DatabaseConfig(busy_seconds=0.1))
    await database.migrate()
    await database.write(add_user(1))
    other = sqlite3.connect(database.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    letting_go = threading.Timer(2.0, other.rollback)
    letting_go.start()
    try:
        await database.close()
        assert letting_go.is_alive()  # the lock still held: close did not wait for it
        assert (tmp_path / "c.db-wal").stat().st_size > 0
    finally:
        letting_go.cancel()
        letting_go.join()
        if other.in_transaction:
            other.rollback()
        other.close()
    assert await stored(database) == [1]


async def test_a_write_after_close_fails_instead_of_waiting_for_ever(tmp_path: Path) -> None:
    database = SqliteDatabase(f"sqlite:///{tmp_path / 'closed.db'}")
    await database.migrate()
    await database.close()
    async with asyncio.timeout(5):
        with pytest.raises(ResourceClosedError):
            await database.write(add_user(1))
