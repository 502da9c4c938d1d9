"""The SQL of users and their API tokens (only a token's hash is stored), and of users' limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    text,
    update,
)

from dreamserve.jobs import Status
from dreamserve.storage.tables import jobs, tokens, users

_USER_OF_TOKEN = select(tokens.c.id, tokens.c.user_id, tokens.c.last_used_at).where(
    tokens.c.token_hash == bindparam("hash"), tokens.c.revoked_at.is_(None)
)


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


def insert_token(conn: Connection, user_id: int, token_hash: str, prefix: str, now: int) -> int:
    return int(
        conn.execute(
            insert(tokens)
            .values(user_id=user_id, token_hash=token_hash, prefix=prefix, created_at=now)
            .returning(tokens.c.id)
        ).scalar_one()
    )


@dataclass(frozen=True)
class TokenUse:
    id: int
    user_id: int
    last_used_at: int | None


def user_of_token(conn: Connection, token_hash: str) -> TokenUse | None:
    """The token of that hash, unless revoked."""
    row = conn.execute(_USER_OF_TOKEN, {"hash": token_hash}).first()
    return None if row is None else TokenUse(row.id, row.user_id, row.last_used_at)


def mark_used(conn: Connection, token_id: int, now: int) -> None:
    conn.execute(update(tokens).where(tokens.c.id == token_id).values(last_used_at=now))


def count_tokens(conn: Connection, user_id: int) -> int:
    """Every token ever made for the user, revoked ones too."""
    return int(
        conn.execute(
            select(func.count()).select_from(tokens).where(tokens.c.user_id == user_id)
        ).scalar_one()
    )


def list_users(conn: Connection) -> list[dict[str, Any]]:
    """Each user with its usable (unrevoked) tokens and its limits, by id."""
    usable = (
        select(tokens.c.user_id, func.count().label("tokens"))
        .where(tokens.c.revoked_at.is_(None))
        .group_by(tokens.c.user_id)
        .subquery()
    )
    rows = conn.execute(
        select(
            users.c.id,
            users.c.created_at,
            func.coalesce(usable.c.tokens, 0).label("tokens"),
            users.c.max_running,
            users.c.max_per_minute,
        )
        .select_from(users.outerjoin(usable, usable.c.user_id == users.c.id))
        .order_by(users.c.id)
    )
    return [dict(row._mapping) for row in rows]


def list_tokens(conn: Connection, user_id: int | None) -> list[dict[str, Any]]:
    query = select(
        tokens.c.id,
        tokens.c.user_id,
        tokens.c.prefix,
        tokens.c.created_at,
        tokens.c.last_used_at,
        tokens.c.revoked_at,
    ).order_by(tokens.c.id)
    if user_id is not None:
        query = query.where(tokens.c.user_id == user_id)
    return [dict(row._mapping) for row in conn.execute(query)]


def tokens_named(conn: Connection, name: str) -> list[dict[str, Any]]:
    """The tokens `name` designates: the token of that id (digits), else those whose prefix
    starts with `name`."""
    if name.isdigit():
        condition = tokens.c.id == int(name)
    else:
        condition = tokens.c.prefix.startswith(name, autoescape=True)
    rows = conn.execute(
        select(tokens.c.id, tokens.c.user_id, tokens.c.prefix, tokens.c.revoked_at).where(condition)
    )
    return [dict(row._mapping) for row in rows]


def revoke_token(conn: Connection, token_id: int, now: int) -> None:
    conn.execute(
        update(tokens)
        .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )


def set_limits(
    conn: Connection, user_id: int, values: dict[str, int | None]
) -> dict[str, int | None] | None:
    """Set some of a user's limits (`max_running`, `max_per_minute`; None removes one); the
    user's limits after, or None for a missing user."""
    if values:
        conn.execute(update(users).where(users.c.id == user_id).values(**values))
    row = conn.execute(
        select(users.c.max_running, users.c.max_per_minute).where(users.c.id == user_id)
    ).first()
    return None if row is None else dict(row._mapping)


def limits_of(conn: Connection, user_id: int) -> tuple[int | None, int | None]:
    """The user's (max_running, max_per_minute); (None, None) for none or no such user."""
    row = conn.execute(
        select(users.c.max_running, users.c.max_per_minute).where(users.c.id == user_id)
    ).first()
    return (None, None) if row is None else (row.max_running, row.max_per_minute)


def take_submission(conn: Connection, user_id: int, minute: int, limit: int | None) -> bool:
    """Count one submission of the user in the minute starting at `minute` (epoch ms), unless
    `limit` of them were counted already (False then). One conditional UPDATE: it also holds
    the user's row until the transaction ends, so the user's submissions are admitted one at
    a time (what keeps `count_running` exact on PostgreSQL)."""
    within = users.c.minute == minute
    counted = case((within, users.c.minute_count + 1), else_=1)
    condition = users.c.id == user_id
    if limit is not None:
        room = or_(users.c.minute.is_(None), ~within, users.c.minute_count < limit)
        condition = and_(condition, room)
    result = conn.execute(
        update(users).where(condition).values(minute=minute, minute_count=counted)
    )
    return result.rowcount == 1


def lock_user(conn: Connection, user_id: int) -> None:
    """Hold the user's row until the transaction ends (PostgreSQL; SQLite's writes take turns)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(users.c.id).where(users.c.id == user_id).with_for_update())


def count_running(conn: Connection, user_id: int) -> int:
    """The user's unfinished jobs: running, queued for a runner, or waiting for a slot."""
    return int(
        conn.execute(
            select(func.count())
            .select_from(jobs)
            .where(jobs.c.status == Status.CREATED.value, jobs.c.user_id == user_id)
        ).scalar_one()
    )
