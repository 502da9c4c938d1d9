"""The SQL of users and their API tokens (only a token's hash is stored)."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, func, insert, select, text

from dreamserve.storage.tables import tokens, users

_USER_OF_TOKEN = select(tokens.c.user_id).where(tokens.c.token_hash == bindparam("hash"))


_FIRST_START_LOCK = text("SELECT pg_advisory_xact_lock(7463222)")


def lock_first_start(conn: Connection) -> None:
    """Hold off other processes' first start until this transaction ends (PostgreSQL: API
    processes that start at once on an empty database make one user 1, not two; SQLite's
    writes take turns already)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_FIRST_START_LOCK)


def count_users(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(users)).scalar_one())


def user_exists(conn: Connection, user_id: int) -> bool:
    return conn.execute(select(users.c.id).where(users.c.id == user_id)).first() is not None


def insert_user(conn: Connection, now: int) -> int:
    return int(
        conn.execute(insert(users).values(created_at=now).returning(users.c.id)).scalar_one()
    )


def insert_token(conn: Connection, user_id: int, token_hash: str, now: int) -> None:
    conn.execute(insert(tokens).values(user_id=user_id, token_hash=token_hash, created_at=now))


def user_of_token(conn: Connection, token_hash: str) -> int | None:
    user_id: int | None = conn.execute(_USER_OF_TOKEN, {"hash": token_hash}).scalar_one_or_none()
    return user_id
