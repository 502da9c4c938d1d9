"""Database access: async SQLAlchemy engines for SQLite (the default) or PostgreSQL, and migrations.

SQLite gets the classic one-writer, many-readers layout: every write transaction goes through a
single connection and starts with BEGIN IMMEDIATE, so concurrent writers queue in the pool instead
of failing with "database is locked"; reads use a small pool of their own and, in WAL mode, never
wait for a writer. PostgreSQL uses one pool for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


class Database:
    """The two entry points every query goes through: `read()` and `write()`."""

    def __init__(self, url: str, *, read_pool: int = 4) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if self.is_sqlite:
            _make_parent_dir(url)
            self._writer = _sqlite_engine(url, pool_size=1, begin="BEGIN IMMEDIATE")
            self._reader = _sqlite_engine(url, pool_size=read_pool, begin=None)
        else:
            self._writer = create_async_engine(url, pool_size=10, max_overflow=10)
            self._reader = self._writer

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that commits when the block ends and rolls back if it raises."""
        async with self._writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads; each statement sees the latest committed state."""
        async with self._reader.connect() as conn:
            yield conn

    async def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        async with self._writer.begin() as conn:
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        await self._writer.dispose()
        if self._reader is not self._writer:
            await self._reader.dispose()


def _sqlite_engine(url: str, *, pool_size: int, begin: str | None) -> AsyncEngine:
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=60)

    # The sqlite3 module opens transactions on its own terms; take that over so that writes
    # begin IMMEDIATE (no lock upgrade deadlocks) and reads run in autocommit.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if begin:
            conn.exec_driver_sql(begin)

    return engine


def _make_parent_dir(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _upgrade(connection: Connection) -> None:
    config = Config()
    location = resources.files("dreamserve") / "storage" / "migrations"
    config.set_main_option("script_location", str(location))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
