"""Database access: every transaction is a plain function run by `read()` or `write()`.

Callers write a transaction as a synchronous function of a SQLAlchemy `Connection`, and await it:

    job = await db.write(lambda conn: job_queries.insert_job(conn, ...))

The backend is chosen by URL, each run where it is fastest (docs/benchmarks.md has the figures):

- SQLite (the default): one connection, used on the event loop thread itself. A point query takes
  tens of microseconds, less than handing it to a thread and back, and since a transaction never
  awaits, transactions of one process never interleave. Writes are committed in groups: those
  asked for within two turns of the event loop run one after the other, each in a savepoint of
  its own, and commit together (the commit is most of a small write's cost). Writes begin
  IMMEDIATE, so a second process (the CLI) waits for the lock instead of failing. WAL
  checkpoints (the only step that waits on the disk) run on a background thread instead of
  inside a request.
- PostgreSQL: a pool of psycopg connections, each transaction run on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool, StaticPool

from dreamserve.config import ConfigError

T = TypeVar("T")
Transaction = Callable[[Connection], T]


class Database(Protocol):
    # Whether other servers may run jobs of this database (PostgreSQL), so that a process does
    # not see every job change made (SQLite: one server, and the CLI now and then).
    shared: bool

    async def read(self, fn: Transaction[T]) -> T:
        """Run `fn` on a connection for reads; each statement sees the latest committed state."""

    async def write(self, fn: Transaction[T]) -> T:
        """Run `fn` in one transaction: committed when this returns, rolled back if it raises.
        A caller cancelled while it waits may find its transaction committed all the same
        (on PostgreSQL it runs on a thread; on SQLite it may be committing with others)."""

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""

    async def lock_runner(self) -> bool:
        """Become the one process that runs this database's jobs, until close (or death, which
        frees it too); False when another process is. Resuming unfinished jobs is only right
        for the holder: they are orphans of a process that is gone."""

    async def close(self) -> None: ...


def open_database(url: str) -> Database:
    """The database a URL names: `sqlite:///path` or `postgresql://...`."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return SqliteDatabase(url)
    if backend == "postgresql":
        return PostgresDatabase(url)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")


class SqliteDatabase:
    """One connection on the event loop thread; writes committed in groups; WAL, with
    checkpoints on a thread of their own."""

    CHECKPOINT_SECONDS = 1.0
    shared = False

    def __init__(self, url: str) -> None:
        path = make_url(url).database
        if not path or path == ":memory:":
            raise ValueError("the SQLite database must be a file")
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
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
        # wait on; the group runs two turns of the loop after the first (`_commit_soon`).
        self._queued: list[tuple[Transaction[Any], asyncio.Future[Any]]] = []
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="dreamserve-checkpoint", daemon=True
        )
        self._checkpointer.start()

    async def read(self, fn: Transaction[T]) -> T:
        try:
            return fn(self._conn)
        finally:
            self._conn.rollback()

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
            driver.execute("BEGIN IMMEDIATE")  # may wait out another process's lock, then fail
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

    def _roll_back(self) -> None:
        with contextlib.suppress(Exception):  # a closed connection has nothing to undo
            self._conn.rollback()
            driver = self._conn.connection.driver_connection
            if driver is not None and driver.in_transaction:
                driver.rollback()

    def _transaction(self, fn: Transaction[T]) -> T:
        conn = self._conn
        driver = conn.connection.driver_connection
        assert driver is not None
        driver.execute("BEGIN IMMEDIATE")  # straight to sqlite3: it is on every write path
        try:
            result = fn(conn)
            conn.commit()
            if driver.in_transaction:  # fn ran no statement through SQLAlchemy
                driver.commit()
        except BaseException:
            conn.rollback()
            if driver.in_transaction:  # a failed commit, or no statement went through SQLAlchemy
                driver.rollback()
            raise
        return result

    async def migrate(self) -> None:
        self._transaction(_upgrade)

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

    async def close(self) -> None:
        self._commit_queued()  # writes asked for just before: before the connection goes
        if self._runner_lock is not None:
            os.close(self._runner_lock)  # closing the file releases the lock
        self._stop.set()
        self._checkpointer.join()
        self._conn.close()
        self._engine.dispose()
        conn = sqlite3.connect(self.path)
        try:  # leave no WAL behind
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            while not self._stop.wait(self.CHECKPOINT_SECONDS):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()


def _fail(waiting: Iterable[asyncio.Future[Any]], error: BaseException) -> None:
    """Give `error` to each caller still waiting: the transaction of its write is gone."""
    if isinstance(error, StopIteration):  # no future takes it: as a coroutine would (PEP 479)
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
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=5000",
        "PRAGMA wal_autocheckpoint=0",  # the checkpoint thread does it
    ):
        dbapi_connection.execute(pragma)


# Any fixed key works; this one spells "dreamsrv".
_TRY_RUNNER_LOCK = text("SELECT pg_try_advisory_lock(7237955865294632566)")


class PostgresDatabase:
    """A connection pool; each transaction runs on one of as many threads as connections."""

    POOL_SIZE = 10
    shared = True

    def __init__(self, url: str) -> None:
        driver_url = make_url(url).set(drivername="postgresql+psycopg")
        self._engine: Engine = create_engine(
            driver_url, pool_size=self.POOL_SIZE, max_overflow=0, pool_pre_ping=True
        )
        self._threads = ThreadPoolExecutor(self.POOL_SIZE, thread_name_prefix="dreamserve-db")
        self._runner_lock: Connection | None = None

    async def read(self, fn: Transaction[T]) -> T:
        return await self._run(self._read, fn)

    async def write(self, fn: Transaction[T]) -> T:
        return await self._run(self._write, fn)

    async def migrate(self) -> None:
        await self.write(_upgrade)

    async def lock_runner(self) -> bool:
        if self._runner_lock is None:
            loop = asyncio.get_running_loop()
            self._runner_lock = await loop.run_in_executor(self._threads, self._try_runner_lock)
        return self._runner_lock is not None

    def _try_runner_lock(self) -> Connection | None:
        # A session-level advisory lock, on a connection outside the pool, open until close.
        conn = create_engine(self._engine.url, poolclass=NullPool).connect()
        taken = bool(conn.scalar(_TRY_RUNNER_LOCK))
        conn.commit()
        if not taken:
            conn.close()
            return None
        return conn

    async def close(self) -> None:
        if self._runner_lock is not None:
            self._runner_lock.close()
        self._threads.shutdown(wait=True)
        self._engine.dispose()

    async def _run(self, runner: Callable[[Transaction[T]], T], fn: Transaction[T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, runner, fn)

    def _read(self, fn: Transaction[T]) -> T:
        with self._engine.connect() as conn:
            return fn(conn)

    def _write(self, fn: Transaction[T]) -> T:
        with self._engine.begin() as conn:
            return fn(conn)


def _upgrade(connection: Connection) -> None:
    config = Config()
    location = resources.files("dreamserve") / "storage" / "migrations"
    config.set_main_option("script_location", str(location))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
