"""Database access: every transaction is a plain function run by `read()` or `write()`.

Callers write a transaction as a synchronous function of a SQLAlchemy `Connection`, and await it:

    job = await db.write(lambda conn: job_queries.insert_job(conn, ...))

The backend is chosen by URL, each run where it is fastest (docs/benchmarks.md has the figures):

- SQLite (the default): one connection, used on the event loop thread itself. A point query takes
  tens of microseconds, less than handing it to a thread and back, and since a transaction never
  awaits, transactions of one process never interleave. Writes are committed in groups: those
  asked for within two turns of the event loop run one after the other, each in a savepoint of
  its own, and commit together (the commit is most of a small write's cost). Writes begin
  IMMEDIATE. The connection never waits for a lock (busy_timeout 0): a group that finds the
  write lock held by another process (the CLI, a backup) is tried again from the event loop
  with short pauses between tries, the writes asked for meanwhile joining it, so the loop
  serves every other request as it waits. In WAL mode reads need no lock. WAL checkpoints
  (the only step that waits on the disk) run on a background thread instead of inside a
  request.
- PostgreSQL: a pool of psycopg connections, each transaction run on a worker thread, with
  `lock_timeout` and `statement_timeout` set on every connection. Each round trip costs the
  server CPU (a thread's wake-up as well as the driver's work), so none is spent on a ping
  (`_discard_ended`) nor on BEGIN and ROLLBACK around reads (autocommit).

Either way a transaction waits at most `DatabaseConfig.busy_seconds` for another's lock (or, on
PostgreSQL, for a connection), then fails with `DatabaseBusy` (503 with Retry-After); a write
that finds the disk full fails with `StorageFull` (507), rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool, StaticPool

from dreamserve.config import ConfigError
from dreamserve.errors import DatabaseBusy, StorageFull

log = logging.getLogger(__name__)

T = TypeVar("T")
Transaction = Callable[[Connection], T]


@dataclass(frozen=True)
class DatabaseConfig:
    # The longest a transaction waits for another's lock (SQLite's write lock, PostgreSQL's
    # lock_timeout) or for a free connection (PostgreSQL), then DatabaseBusy.
    busy_seconds: float = 5.0
    statement_seconds: float = 30.0  # PostgreSQL's statement_timeout
    retry_after: int = 5  # DatabaseBusy's Retry-After


class RunnerLock(Enum):
    """What `Database.keep_runner_lock` found."""

    HELD = "held"  # held all along
    RETAKEN = "retaken"  # lost (PostgreSQL: its connection ended) and taken again: it was free
    TAKEN = "taken"  # lost, and another process holds it now


class Database(Protocol):
    # Whether other servers may run jobs of this database (PostgreSQL), so that a process does
    # not see every job change made (SQLite: one server, and the CLI now and then).
    shared: bool

    async def read(self, fn: Transaction[T]) -> T:
        """Run `fn` on a connection for reads; each statement sees the latest committed state.
        DatabaseBusy when the database stayed locked past the busy bound (rare: on SQLite in
        WAL mode, and on PostgreSQL, reads take no lock that writers hold)."""

    async def write(self, fn: Transaction[T]) -> T:
        """Run `fn` in one transaction: committed when this returns, rolled back if it raises.
        DatabaseBusy, with nothing of `fn` committed, when another transaction held a lock it
        needed past the busy bound (on SQLite `fn` has not run at all).
        A caller cancelled while it waits may find its transaction committed all the same
        (on PostgreSQL it runs on a thread; on SQLite it may be committing with others)."""

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""

    async def lock_runner(self) -> bool:
        """Become a process that runs this database's jobs, until close (or death, which frees
        it too): whether it is the only one, for now. Resuming every unfinished job is only
        right then: they are orphans of a process that is gone.

        SQLite: one process runs the jobs; False when another does (the start is refused).
        PostgreSQL: any number do; True, holding every other one off until
        `share_runner_lock`, when none did (then it recovers every unfinished job); False
        when others run jobs (then those of a dead one wait for their leases to run out)."""

    async def share_runner_lock(self) -> None:
        """After `lock_runner` (and the recovery it allowed): let other processes run jobs too
        (nothing on SQLite, where one process runs them)."""

    async def keep_runner_lock(self) -> RunnerLock:
        """After `lock_runner` returned True: whether this process still holds the lock. One lost
        (on PostgreSQL, whose lock lives as long as its connection, when that connection ended)
        is taken again at once if it is free: RETAKEN; TAKEN when another process has it. Raises
        the database's error when it cannot tell (the database unreachable): ask again."""

    async def close(self) -> None: ...


def open_database(url: str, config: DatabaseConfig | None = None) -> Database:
    """The database a URL names: `sqlite:///path` or `postgresql://...`."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return SqliteDatabase(url, config)
    if backend == "postgresql":
        return PostgresDatabase(url, config)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


class SqliteDatabase:
    """One connection on the event loop thread, which never waits for a lock; writes
    committed in groups; WAL, with checkpoints on a thread of their own."""

    CHECKPOINT_SECONDS = 1.0
    shared = False

    def __init__(self, url: str, config: DatabaseConfig | None = None) -> None:
        path = make_url(url).database
        if not path or path == ":memory:":
            raise ValueError("the SQLite database must be a file")
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.config = config or DatabaseConfig()
        self._engine = create_engine(url, poolclass=StaticPool)
        event.listen(self._engine, "connect", _configure_sqlite)
        try:
            _create_private(path)
            self._conn = self._engine.connect()
        except (OSError, sqlite3.Error, DBAPIError) as error:  # a directory it cannot write
            self._engine.dispose()
            reason = _reason(error)
            raise ConfigError(f"{path}: the SQLite database cannot be opened ({reason})") from None
        self._runner_lock: int | None = None
        # The writes asked for since the last group commit, with the futures their callers
        # wait on; the group runs two turns of the loop after the first (`_commit_soon`), or,
        # while another process holds the write lock, at the next try (`_retry`).
        self._queued: list[tuple[Transaction[Any], asyncio.Future[Any]]] = []
        self._retry: asyncio.TimerHandle | None = None
        # While the write lock is held elsewhere: when each waiting write gets DatabaseBusy.
        self._deadlines: dict[asyncio.Future[Any], float] = {}
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="dreamserve-checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def read(self, fn: Transaction[T]) -> T:
        pauses: Iterator[float] | None = None
        while True:
            try:
                return fn(self._conn)
            except (DBAPIError, sqlite3.Error) as error:
                # Another connection holds the database exclusively (in WAL mode only while
                # it recovers a crashed writer's WAL, or in exclusive locking mode): a read
                # has nothing to undo, so it is tried again, from the loop, never on it.
                if not _is_busy(error):
                    raise
            finally:
                self._conn.rollback()
            pauses = pauses or _pauses(self.config.busy_seconds)
            pause = next(pauses, None)
            if pause is None:
                raise DatabaseBusy(self.config.retry_after)
            await asyncio.sleep(pause)

    async def write(self, fn: Transaction[T]) -> T:
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[T] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._commit_soon, loop)
        self._queued.append((fn, committed))
        return await committed

    def _commit_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        # One more turn: the requests read from the sockets in between reach their write
        # before the group runs, and join it (in a busy server groups about double).
        loop.call_soon(self._commit_queued)

    def _commit_queued(self) -> None:
        """Run the queued writes in one transaction, each in its own savepoint: one that
        raises is rolled back alone and gets its error; the others commit together and get
        their results. A caller that was cancelled before its turn is skipped."""
        if self._retry is not None:  # run now (at close): the waiting writes are in the group
            self._retry.cancel()
            self._retry = None
        queued, self._queued = self._queued, []
        while queued:
            queued = self._commit_group(queued)

    def _commit_group(
        self, queued: list[tuple[Transaction[Any], asyncio.Future[Any]]]
    ) -> list[tuple[Transaction[Any], asyncio.Future[Any]]]:
        """Commit as many of `queued` as one transaction can hold; those left for another
        (after one whose error ended the transaction: SQLite rolls some errors back whole).
        Whatever fails, every caller of the group gets a result or an error, and no
        transaction is left open."""
        conn = self._conn
        ran: list[tuple[asyncio.Future[Any], Any]] = []
        try:
            driver = conn.connection.driver_connection  # raises once the database is closed
            assert driver is not None
            if not _begin_immediate(driver):
                self._wait_for_lock(queued)
                return []
            if self._deadlines:  # the lock came free: the writes that waited for it run now
                self._deadlines.clear()
            for position, (fn, committed) in enumerate(queued):
                if committed.cancelled():
                    continue
                driver.execute("SAVEPOINT write")
                try:
                    result = fn(conn)
                except BaseException as error:
                    if not driver.in_transaction:  # the error rolled the whole transaction back
                        conn.rollback()
                        _fail([committed, *(done for done, _ in ran)], error)
                        return queued[position + 1 :]
                    driver.execute("ROLLBACK TO write")
                    driver.execute("RELEASE write")
                    _fail([committed], error)
                    continue
                driver.execute("RELEASE write")
                ran.append((committed, result))
            conn.commit()
            if driver.in_transaction:  # no statement went through SQLAlchemy
                driver.commit()
        except BaseException as error:  # BEGIN, a savepoint or the COMMIT failed
            self._roll_back()
            _fail((committed for _, committed in queued), error)
            if not isinstance(error, Exception):
                raise
            return []
        for committed, result in ran:
            committed.set_result(result)
        return []

    def _wait_for_lock(self, queued: list[tuple[Transaction[Any], asyncio.Future[Any]]]) -> None:
        """Another connection holds the write lock: try the group again after a pause, from
        the loop (never waiting on it), with the writes asked for meanwhile behind it. A write
        that waited `busy_seconds` gets DatabaseBusy instead; it never ran."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        bound = self.config.busy_seconds
        waiting = []
        for fn, committed in queued:
            if committed.done():  # cancelled while it waited
                self._deadlines.pop(committed, None)
                continue
            deadline = self._deadlines.setdefault(committed, now + bound)
            if deadline <= now:
                del self._deadlines[committed]
                committed.set_exception(DatabaseBusy(self.config.retry_after))
            else:
                waiting.append((fn, committed))
        self._queued[:0] = waiting  # ahead of any asked for since: the order is kept
        if self._queued:
            first = min((self._deadlines[committed] for _, committed in waiting), default=now)
            waited = bound - (first - now)  # by the write that waited longest
            self._retry = loop.call_later(_pause(waited, bound), self._commit_queued)

    def _roll_back(self) -> None:
        with contextlib.suppress(Exception):  # a closed connection has nothing to undo
            self._conn.rollback()
            driver = self._conn.connection.driver_connection
            if driver is not None and driver.in_transaction:
                driver.rollback()

    async def migrate(self) -> None:
        # In a transaction of its own rather than a group's savepoint: Alembic's DDL as before.
        conn = self._conn
        driver = conn.connection.driver_connection
        assert driver is not None
        pauses = _pauses(self.config.busy_seconds)
        while not _begin_immediate(driver):
            pause = next(pauses, None)
            if pause is None:
                raise DatabaseBusy(self.config.retry_after)
            await asyncio.sleep(pause)
        try:
            _upgrade(conn)
            conn.commit()
            if driver.in_transaction:  # no statement went through SQLAlchemy
                driver.commit()
        except BaseException:
            conn.rollback()
            if driver.in_transaction:  # a failed commit, or no statement went through SQLAlchemy
                driver.rollback()
            raise

    async def lock_runner(self) -> bool:
        if self._runner_lock is None:
            fd = os.open(f"{self.path}.runner", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._runner_lock = fd
        return True

    async def share_runner_lock(self) -> None:
        return None

    async def keep_runner_lock(self) -> RunnerLock:
        return RunnerLock.HELD  # a file lock: held as long as this process keeps the file open

    async def close(self) -> None:
        self._commit_queued()  # writes asked for just before: before the connection goes
        # Those waiting for another process's lock: each commits or fails within the bound.
        while waiting := [committed for _, committed in self._queued if not committed.done()]:
            await asyncio.wait(waiting)
        if self._retry is not None:  # only writes cancelled meanwhile were left
            self._retry.cancel()
        if self._runner_lock is not None:
            os.close(self._runner_lock)  # closing the file releases the lock
        self._stop.set()
        self._checkpointer.join()
        self._conn.close()
        self._engine.dispose()
        # Leave no WAL behind, unless another process holds the lock past the busy bound (not
        # SQLite's own 5 s): the next start reads it.
        conn = sqlite3.connect(self.path, timeout=self.config.busy_seconds)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        failing = False
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            while not self._stop.wait(self.CHECKPOINT_SECONDS):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as error:
                    # A full disk (the database file must grow to take the WAL's pages), an
                    # I/O error: the next round tries again. Were this thread to end, no
                    # checkpoint would run until a restart, and the WAL would grow without end.
                    if not failing:
                        log.warning("WAL checkpoint failed (%s); trying again every second", error)
                    failing = True
                else:
                    failing = False
        finally:
            conn.close()


def _fail(waiting: Iterable[asyncio.Future[Any]], error: BaseException) -> None:
    """Give `error` to each caller still waiting: the transaction of its write is gone. A
    disk with no space left ("database or disk is full") is StorageFull (507) for each."""
    if _is_full(error):
        log.warning("SQLite write rolled back: %s", getattr(error, "orig", error))
        full = StorageFull()
        full.__cause__ = error
        error = full
    elif isinstance(error, StopIteration):  # no future takes it: as a coroutine would (PEP 479)
        stopped = RuntimeError("transaction raised StopIteration")
        stopped.__cause__ = error
        error = stopped
    for committed in waiting:
        if not committed.done():
            committed.set_exception(error)


def _create_private(path: str) -> None:
    """An empty file (SQLite's empty database) readable by the owner only, when there is none:
    SQLite gives the WAL and its index the database file's mode, and would create it with the
    process's umask (world-readable, usually). An existing file is left as it is."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _reason(error: OSError | sqlite3.Error | DBAPIError) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error.orig if isinstance(error, DBAPIError) else error)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # Take transactions over from the sqlite3 module: reads run in autocommit, writes start
    # with the explicit BEGIN IMMEDIATE above.
    dbapi_connection.isolation_level = None
    for pragma in (
        "PRAGMA journal_mode=WAL",  # at the start, with sqlite3's default wait (5 s)
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
        "PRAGMA wal_autocheckpoint=0",  # the checkpoint thread does it
        # From now on on the event loop: SQLite's busy handler would sleep on it. A lock held
        # elsewhere is waited for by `_wait_for_lock`, `read` and `migrate` instead.
        "PRAGMA busy_timeout=0",
    ):
        dbapi_connection.execute(pragma)


def _begin_immediate(driver: sqlite3.Connection) -> bool:
    """Take the write lock (straight on sqlite3: it is on every write path); False, at once,
    when another connection holds it."""
    try:
        driver.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        if _is_busy(error):
            return False
        raise
    return True


def _is_full(error: BaseException) -> bool:
    """Whether `error` (sqlite3's, or SQLAlchemy's around it) is SQLITE_FULL: the disk (or the
    quota) had no space for the database, its journal or its WAL."""
    cause = getattr(error, "orig", error)
    return isinstance(cause, sqlite3.Error) and cause.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL


def _is_busy(error: BaseException) -> bool:
    """Whether `error` (sqlite3's, or SQLAlchemy's around it) is SQLITE_BUSY: a lock that
    another connection holds."""
    cause = getattr(error, "orig", error)
    return isinstance(cause, sqlite3.Error) and cause.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


# Pauses between tries for a lock: short at first (most locks are held for milliseconds),
# growing by half of what was waited, at most `_LONGEST_PAUSE` (how late a freed lock is seen).
_SHORTEST_PAUSE = 0.001
_LONGEST_PAUSE = 0.05


def _pause(waited: float, bound: float) -> float:
    return max(_SHORTEST_PAUSE, min(waited / 2, _LONGEST_PAUSE, bound - waited))


def _pauses(bound: float) -> Iterator[float]:
    """The pauses between tries for a lock, until `bound` seconds are waited."""
    waited = 0.0
    while waited < bound:
        pause = _pause(waited, bound)
        yield pause
        waited += pause


# Any fixed key works; this one spells "dreamsrv".
# Every process that runs jobs holds the runner lock shared; one that finds none holds it
# exclusively as well while it recovers the jobs a dead one left, then shares it.
_RUNNER_LOCK_KEY = 7237955865294632566
_TRY_RUNNER_LOCK = text(f"SELECT pg_try_advisory_lock({_RUNNER_LOCK_KEY})")
_TRY_SHARED_RUNNER_LOCK = text(f"SELECT pg_try_advisory_lock_shared({_RUNNER_LOCK_KEY})")
_SHARE_RUNNER_LOCK = text(f"SELECT pg_advisory_unlock({_RUNNER_LOCK_KEY})")
_SHARED_LOCK_TRIES = 600  # 0.05 s apart: how long a start waits for another's recovery
# Migrations of processes that start at once run one after the other.
_MIGRATION_LOCK = text("SELECT pg_advisory_xact_lock(7237955865294632568)")
_ALIVE = text("SELECT 1")


class PostgresDatabase:
    """A connection pool; each transaction runs on one of as many threads as connections.

    Nothing waits unbounded: a lock for `busy_seconds` (lock_timeout), a statement for
    `statement_seconds` (statement_timeout), a thread (and so a connection) for
    `busy_seconds`; then DatabaseBusy, the transaction rolled back or never begun."""

    POOL_SIZE = 10
    shared = True

    def __init__(self, url: str, config: DatabaseConfig | None = None) -> None:
        self.config = config or DatabaseConfig()
        driver_url = make_url(url).set(drivername="postgresql+psycopg")
        self._engine: Engine = create_engine(
            driver_url,
            pool_size=self.POOL_SIZE,
            max_overflow=0,
            pool_timeout=self.config.busy_seconds,
            connect_args={"options": _session_options(driver_url, self.config)},
        )
        event.listen(self._engine, "checkout", _discard_ended)
        # Reads in autocommit, on the same pool: a statement is one round trip, without the
        # BEGIN and ROLLBACK around it; each statement sees the latest committed state, as it
        # does in a READ COMMITTED transaction.
        self._reader = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        self._threads = ThreadPoolExecutor(self.POOL_SIZE, thread_name_prefix="dreamserve-db")
        self._runner_lock: Connection | None = None
        self._is_alone = False  # holding the runner lock exclusively as well
        # The lock's connection is checked on a thread of its own: a pool busy with long
        # transactions must not delay the check (nor a hung check take a pool thread).
        self._lock_thread = ThreadPoolExecutor(1, thread_name_prefix="dreamserve-runner-lock")

    async def read(self, fn: Transaction[T]) -> T:
        return await self._run(self._reader.connect, fn)

    async def write(self, fn: Transaction[T]) -> T:
        return await self._run(self._engine.begin, fn)

    async def migrate(self) -> None:
        await self.write(_long_upgrade)

    async def lock_runner(self) -> bool:
        if self._runner_lock is not None:
            return self._is_alone
        loop = asyncio.get_running_loop()
        self._runner_lock, self._is_alone = await loop.run_in_executor(
            self._lock_thread, self._take_runner_lock, True
        )
        return self._is_alone

    async def share_runner_lock(self) -> None:
        if self._runner_lock is not None and self._is_alone:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._lock_thread, self._share_runner_lock)

    def _share_runner_lock(self) -> None:
        assert self._runner_lock is not None
        self._runner_lock.execute(_SHARE_RUNNER_LOCK)
        self._runner_lock.commit()
        self._is_alone = False

    async def keep_runner_lock(self) -> RunnerLock:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._lock_thread, self._keep_runner_lock)

    def _keep_runner_lock(self) -> RunnerLock:
        # A session lock is held while its session lives: a statement that goes through on
        # the connection proves it. One that fails means the session ended (a terminated
        # backend, a restarted server, a broken network) and the lock went with it.
        if self._runner_lock is not None:
            try:
                self._runner_lock.execute(_ALIVE)
                self._runner_lock.commit()
                return RunnerLock.HELD
            except DBAPIError:
                with contextlib.suppress(Exception):
                    self._runner_lock.close()
                self._runner_lock = None
        # Lost (or lost at an earlier check that could not take it again): taken again,
        # shared (this process runs jobs: it may not recover those of the others); a
        # connection error now propagates and the caller asks again.
        self._runner_lock, self._is_alone = self._take_runner_lock(False)
        return RunnerLock.RETAKEN

    def _take_runner_lock(self, exclusive: bool) -> tuple[Connection, bool]:
        """The runner lock, shared (and, with `exclusive`, exclusively too when no other process
        holds it): a session-level advisory lock on a connection outside the pool, open until
        close, with the pool's timeouts, so that no check of it hangs on the server. Whether it
        is held exclusively."""
        options = _session_options(self._engine.url, self.config)
        engine = create_engine(
            self._engine.url, poolclass=NullPool, connect_args={"options": options}
        )
        conn = engine.connect()
        try:
            alone = exclusive and bool(conn.scalar(_TRY_RUNNER_LOCK))
            for _ in range(_SHARED_LOCK_TRIES):  # held exclusively by a process that recovers
                if conn.scalar(_TRY_SHARED_RUNNER_LOCK):
                    conn.commit()
                    return conn, alone
                conn.commit()
                time.sleep(0.05)
            raise RuntimeError("the runner lock stayed held by a process recovering jobs")
        except BaseException:
            conn.close()
            raise

    async def close(self) -> None:
        self._lock_thread.shutdown(wait=True)  # a check under way ends before its connection
        if self._runner_lock is not None:
            self._runner_lock.close()
        self._threads.shutdown(wait=True)
        self._engine.dispose()

    async def _run(
        self, opening: Callable[[], AbstractContextManager[Connection]], fn: Transaction[T]
    ) -> T:
        loop = asyncio.get_running_loop()
        asked_at = time.monotonic()
        return await loop.run_in_executor(self._threads, self._transaction, opening, fn, asked_at)

    def _transaction(
        self,
        opening: Callable[[], AbstractContextManager[Connection]],
        fn: Transaction[T],
        asked_at: float,
    ) -> T:
        if time.monotonic() - asked_at > self.config.busy_seconds:
            # Every thread (every connection) was taken, by transactions waiting on a lock,
            # say, for as long as a lock may be waited for: this one does not begin.
            raise DatabaseBusy(self.config.retry_after)
        tries = 0
        while True:
            tries += 1
            try:
                with opening() as conn:
                    return fn(conn)
            except (DBAPIError, PoolTimeout) as error:
                if isinstance(error, PoolTimeout) or _sqlstate(error) in _BUSY_STATES:
                    raise DatabaseBusy(self.config.retry_after) from error  # rolled back
                if _sqlstate(error) == _DISK_FULL:
                    raise StorageFull from error
                if _sqlstate(error) not in _RETRY_STATES:
                    raise
                # Chosen as a deadlock's victim (or a serialization failure): rolled back
                # whole, so it runs again from the start, as PostgreSQL's manual advises
                # (a transaction function keeps no state of a try that failed).
                if tries == _DEADLOCK_TRIES:
                    raise DatabaseBusy(self.config.retry_after) from error
                log.warning("transaction tried again: %s", _reason(error).splitlines()[0])


def _discard_ended(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """At checkout: a pooled connection whose session the server ended (a restart, a failover,
    pg_terminate_backend) is replaced with a new one. The one place the PostgreSQL path leaves
    SQLAlchemy's usual road: instead of `pool_pre_ping`, a `SELECT 1` round trip before every
    transaction (a fifth of a submission's; docs/benchmarks.md), the socket is looked at
    without waiting. An idle connection has nothing to read, unless the server sent its last
    message (FATAL) or closed it: then DisconnectionError, on which the pool discards it and
    connects anew (up to three times).
    A connection lost silently (a network cut) is not seen here; its transaction fails, as it
    would after a ping that passed a moment before."""
    if dbapi_connection.closed:
        raise DisconnectionError("the connection is closed")
    socket = select.poll()  # not select.select: its descriptors must be below 1024
    socket.register(dbapi_connection.fileno(), select.POLLIN)
    if socket.poll(0):  # readable, or hung up, or in error
        raise DisconnectionError("the server ended this connection's session")


# lock_not_available (lock_timeout) and query_canceled (statement_timeout).
_BUSY_STATES = {"55P03", "57014"}
# A deadlock's victim, a serialization failure: tried again, at most `_DEADLOCK_TRIES` times.
_RETRY_STATES = {"40P01", "40001"}
_DEADLOCK_TRIES = 3
_DISK_FULL = "53100"


def _sqlstate(error: Exception) -> str | None:
    return getattr(getattr(error, "orig", None), "sqlstate", None)


def _session_options(url: URL, config: DatabaseConfig) -> str:
    """The connection's `options`: our timeouts, then any the URL gives (which win)."""
    ours = (
        f"-c lock_timeout={_milliseconds(config.busy_seconds)} "
        f"-c statement_timeout={_milliseconds(config.statement_seconds)}"
    )
    given = url.query.get("options")
    return f"{ours} {given}" if isinstance(given, str) else ours


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))  # 0 would turn the timeout off


def _long_upgrade(connection: Connection) -> None:
    # A migration may rewrite a large table: its length is no sign of a busy database (its
    # lock waits stay bounded).
    connection.execute(text("SET LOCAL statement_timeout = 0"))
    connection.execute(text("SET LOCAL lock_timeout = 0"))  # behind another process's migration
    connection.execute(_MIGRATION_LOCK)
    _upgrade(connection)


def _upgrade(connection: Connection) -> None:
    config = Config()
    location = resources.files("dreamserve") / "storage" / "migrations"
    config.set_main_option("script_location", str(location))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
