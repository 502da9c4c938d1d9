"""Prepared statements: SQLAlchemy's SQL on the DBAPI cursor, with JSON in and out."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import bindparam, insert, select
from sqlalchemy.exc import InvalidRequestError

from dreamserve.storage.database import SqliteDatabase
from dreamserve.storage.prepared import Prepared
from dreamserve.storage.tables import SHARED, accounts

pytestmark = pytest.mark.anyio

INSERT = Prepared(
    insert(accounts).returning(accounts.c.id),
    columns=[
        "name", "owner", "email", "region", "engine", "settings", "models", "max_jobs",
        "running", "created_at", "updated_at",
    ],
)  # fmt: skip
BY_NAME = Prepared(select(accounts).where(accounts.c.name == bindparam("name")))
SHARED_ONES = Prepared(select(accounts.c.name).where(accounts.c.owner.in_([SHARED, -1])))


@pytest.fixture
async def db(tmp_path: Path):
    database = SqliteDatabase(f"sqlite:///{tmp_path / 'p.db'}")
    await database.migrate()
    yield database
    await database.close()


def row(name: str, **changes: object) -> dict[str, object]:
    values: dict[str, object] = {
        "name": name,
        "owner": SHARED,
        "email": "e",
        "region": "US",
        "engine": "procedural",
        "settings": {"nested": {"list": [1, 2.5, None, "ünïcode ✓"]}, "flag": True},
        "models": None,
        "max_jobs": 3,
        "running": 0,
        "created_at": 1,
        "updated_at": 2,
    }
    return values | changes


async def test_json_columns_round_trip_and_none_is_sql_null(db: SqliteDatabase) -> None:
    def write(conn):
        cursor = INSERT.execute(conn, row("US:a"))
        (new_id,) = cursor.fetchone()
        cursor.close()
        return new_id

    new_id = await db.write(write)
    found = await db.read(lambda conn: BY_NAME.first(conn, {"name": "US:a"}))
    assert found is not None
    assert found["id"] == new_id
    assert found["settings"] == row("US:a")["settings"]
    assert found["models"] is None
    raw = await db.read(
        lambda conn: conn.exec_driver_sql("SELECT models IS NULL FROM accounts").scalar()
    )
    assert raw == 1


async def test_literals_in_the_statement_are_bound_too(db: SqliteDatabase) -> None:
    await db.write(lambda conn: INSERT.rowcount(conn, row("US:b", models=["m"])))
    names = await db.read(lambda conn: SHARED_ONES.first(conn, {}))
    assert names == {"name": "US:b"}


async def test_no_row_is_none(db: SqliteDatabase) -> None:
    assert await db.read(lambda conn: BY_NAME.first(conn, {"name": "nobody"})) is None


INSERTING = Prepared.inserting(
    insert(accounts),
    accounts.c.id,
    [
        "name", "owner", "email", "region", "engine", "settings", "models", "max_jobs",
        "running", "created_at", "updated_at",
    ],
)  # fmt: skip


async def test_insert_id_is_the_id_of_the_row_made(db: SqliteDatabase) -> None:
    first = await db.write(lambda conn: INSERTING.insert_id(conn, row("US:c")))
    second = await db.write(lambda conn: INSERTING.insert_id(conn, row("US:d")))
    assert second == first + 1
    found = await db.read(lambda conn: BY_NAME.first(conn, {"name": "US:d"}))
    assert found is not None
    assert found["id"] == second


async def test_a_missing_parameter_is_an_error_naming_it(db: SqliteDatabase) -> None:
    values = row("US:e")
    del values["email"]
    with pytest.raises(InvalidRequestError, match="A value is required for bind parameter 'email'"):
        await db.write(lambda conn: INSERT.rowcount(conn, values))
    assert await db.read(lambda conn: BY_NAME.first(conn, {"name": "US:e"})) is None
