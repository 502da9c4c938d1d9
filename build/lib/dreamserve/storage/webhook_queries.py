"""The SQL of the webhook outbox, signing secrets and idempotency keys.

A delivery is queued in the transaction that ends its job (job_queries.finish_job and the other
paths that end jobs call `queue`), so a job never ends without its webhook nor sends one for an
end that was rolled back. Deliverers on any node claim due rows with a conditional UPDATE that
pushes `next_at` past the try's timeout: a node that dies mid-try leaves the row due again.
The claim itself, fair between users and receiver hosts, is webhook_claims.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, delete, insert, select, text, update

from dreamserve.ids import new_message_id
from dreamserve.storage.prepared import Prepared
from dreamserve.storage.tables import (
    idempotency_keys,
    webhook_deliveries,
    webhook_secrets,
    webhook_tries,
)

PENDING = "pending"


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    user_id: int
    message_id: str
    url: str
    status: str
    tries: int
    next_at: int | None
    created_at: int
    host: str


@dataclass(frozen=True)
class Try:
    at: int
    status_code: int | None
    error: str | None
    duration_ms: int


def queue(conn: Connection, job_id: int, user_id: int, url: str | None, now: int) -> None:
    """Queue the delivery of an ended job's record, when it has a replyUrl."""
    if url:
        _insert_delivery(conn, job_id, user_id, url, new_message_id(), now)


def receiver_host(url: str) -> str:
    """The receiver a URL reaches, as caps and cooldowns count it: its host name (lower case)
    and port, `hooks.example:443`; another port is another receiver."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # refused at submit; kept apart from every other host all the same
        return parts.netloc.lower()
    name = (parts.hostname or "").lower()
    if ":" in name:
        name = f"[{name}]"
    return f"{name}:{port or (443 if parts.scheme.lower() == 'https' else 80)}"


def _insert_delivery(
    conn: Connection, job_id: int, user_id: int, url: str, message_id: str, now: int
) -> None:
    conn.execute(
        insert(webhook_deliveries).values(
            job_id=job_id,
            user_id=user_id,
            message_id=message_id,
            url=url,
            host=receiver_host(url),
            status=PENDING,
            tries=0,
            next_at=now,
            created_at=now,
            updated_at=now,
        )
    )


_NEXT_DUE = Prepared(
    select(webhook_deliveries.c.next_at)
    .where(webhook_deliveries.c.status == PENDING)
    .order_by(webhook_deliveries.c.next_at)
    .limit(1)
)


def next_due(conn: Connection) -> int | None:
    """When the earliest pending delivery is due (ms), or None when none is pending. One
    index lookup, read on every job's end: most jobs have no webhook."""
    row = _NEXT_DUE.first(conn, {})
    return None if row is None else int(row["next_at"])


def record_try(
    conn: Connection,
    delivery: Delivery,
    attempt: Try,
    *,
    status: str,
    next_at: int | None,
) -> None:
    """Record a try of a claimed delivery and what comes next: `status` pending with `next_at`,
    or an end (delivered, stopped, failed, refused). A delivery redelivered meanwhile (its
    `next_at` is no longer the claim's) or claimed again (its `tries` moved on) keeps its new
    state, and is sent again; the try is recorded all the same. The claim's hold ends (unless
    the delivery was claimed again)."""
    conn.execute(
        insert(webhook_tries).values(
            delivery_id=delivery.id,
            at=attempt.at,
            status_code=attempt.status_code,
            error=attempt.error,
            duration_ms=attempt.duration_ms,
        )
    )
    recorded = conn.execute(
        update(webhook_deliveries)
        .where(
            webhook_deliveries.c.id == delivery.id,
            webhook_deliveries.c.status == PENDING,
            webhook_deliveries.c.tries == delivery.tries,
            webhook_deliveries.c.next_at == delivery.next_at,
        )
        .values(
            status=status,
            next_at=next_at if status == PENDING else None,
            held_until=None,
            updated_at=attempt.at + attempt.duration_ms,
        )
    ).rowcount
    if not recorded:
        conn.execute(
            update(webhook_deliveries)
            .where(
                webhook_deliveries.c.id == delivery.id,
                webhook_deliveries.c.tries == delivery.tries,
            )
            .values(held_until=None)
        )


def release(conn: Connection, deliveries: Iterable[Delivery], now: int) -> None:
    """Make claimed deliveries whose tries were given up unrecorded (a server stopping) due
    again at `now`, each only while it is as its claim left it (fenced as `record_try` is).
    Their tries stay counted: they may have reached the receiver."""
    for delivery in deliveries:
        conn.execute(
            update(webhook_deliveries)
            .where(
                webhook_deliveries.c.id == delivery.id,
                webhook_deliveries.c.status == PENDING,
                webhook_deliveries.c.tries == delivery.tries,
                webhook_deliveries.c.next_at == delivery.next_at,
            )
            .values(next_at=now, updated_at=now)
        )


def deliveries_of(conn: Connection, job_id: int) -> list[tuple[Delivery, list[Try]]]:
    """A job's deliveries, oldest first, each with its tries: one statement, so that a
    delivery's state and its tries are read as of one moment."""
    rows = conn.execute(
        select(
            webhook_deliveries,
            webhook_tries.c.at,
            webhook_tries.c.status_code,
            webhook_tries.c.error,
            webhook_tries.c.duration_ms,
        )
        .select_from(
            webhook_deliveries.outerjoin(
                webhook_tries, webhook_tries.c.delivery_id == webhook_deliveries.c.id
            )
        )
        .where(webhook_deliveries.c.job_id == job_id)
        .order_by(webhook_deliveries.c.id, webhook_tries.c.id)
    ).mappings()
    found: dict[int, tuple[Delivery, list[Try]]] = {}
    for row in rows:
        _, tries = found.setdefault(row["id"], (delivery_of(row), []))
        if row["at"] is not None:
            tries.append(Try(row["at"], row["status_code"], row["error"], row["duration_ms"]))
    return list(found.values())


def redeliver(conn: Connection, job_id: int, user_id: int, url: str, now: int) -> None:
    """Make a job's record due for delivery now: its pending delivery, or else a new delivery
    with the message id of the last one (the same event, so receivers can tell a resend)."""
    pending = conn.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.job_id == job_id, webhook_deliveries.c.status == PENDING)
        .values(next_at=now, updated_at=now)
    ).rowcount
    if pending:
        return
    last = conn.execute(
        select(webhook_deliveries.c.message_id)
        .where(webhook_deliveries.c.job_id == job_id)
        .order_by(webhook_deliveries.c.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    _insert_delivery(conn, job_id, user_id, url, last or new_message_id(), now)


# Signing secrets (sealed by the caller)


@dataclass(frozen=True)
class SecretRow:
    secret: str
    previous: str | None
    previous_until: int | None


_SECRET = select(
    webhook_secrets.c.secret, webhook_secrets.c.previous, webhook_secrets.c.previous_until
)


def secret_of(conn: Connection, user_id: int, *, lock: bool = False) -> SecretRow | None:
    """The user's secret row; with `lock`, locked until the transaction ends (PostgreSQL;
    SQLite writes are serialized anyway)."""
    query = _SECRET.where(webhook_secrets.c.user_id == user_id)
    row = conn.execute(query.with_for_update() if lock else query).first()
    return None if row is None else SecretRow(*row)


def save_secret(conn: Connection, user_id: int, row: SecretRow, now: int, *, exists: bool) -> None:
    values = {
        "secret": row.secret,
        "previous": row.previous,
        "previous_until": row.previous_until,
        "updated_at": now,
    }
    if exists:
        conn.execute(
            update(webhook_secrets).where(webhook_secrets.c.user_id == user_id).values(**values)
        )
    else:
        conn.execute(insert(webhook_secrets).values(user_id=user_id, **values))


# Idempotency keys


@dataclass(frozen=True)
class KeyUse:
    fingerprint: str
    job_id: int
    created_at: int


_LOCK = text("SELECT pg_advisory_xact_lock(:lock)")


def lock_key(conn: Connection, user_id: int, key: str) -> None:
    """Hold a user's key until the transaction ends, so that requests with the same key run
    one after the other (PostgreSQL; SQLite runs every write transaction alone anyway)."""
    if conn.dialect.name == "postgresql":
        digest = hashlib.sha256(f"idempotency:{user_id}:{key}".encode()).digest()
        conn.execute(_LOCK, {"lock": int.from_bytes(digest[:8], "big", signed=True)})


def key_use(conn: Connection, user_id: int, key: str) -> KeyUse | None:
    row = conn.execute(
        select(
            idempotency_keys.c.fingerprint,
            idempotency_keys.c.job_id,
            idempotency_keys.c.created_at,
        ).where(idempotency_keys.c.user_id == user_id, idempotency_keys.c.key == key)
    ).first()
    return None if row is None else KeyUse(*row)


def remember_key(
    conn: Connection,
    user_id: int,
    key: str,
    fingerprint: str,
    job_id: int,
    *,
    now: int,
    stale_before: int,
) -> None:
    """Bind a key to the job it made, replacing a use from before `stale_before` (the key's
    lifetime). A fresh use committed meanwhile by a concurrent request is kept: the insert
    then fails on the unique key, and the caller's retry returns that request's job."""
    conn.execute(
        delete(idempotency_keys).where(
            idempotency_keys.c.user_id == user_id,
            idempotency_keys.c.key == key,
            idempotency_keys.c.created_at < stale_before,
        )
    )
    conn.execute(
        insert(idempotency_keys).values(
            user_id=user_id, key=key, fingerprint=fingerprint, job_id=job_id, created_at=now
        )
    )


def forget_keys_before(conn: Connection, before: int) -> int:
    return conn.execute(
        delete(idempotency_keys).where(idempotency_keys.c.created_at < before)
    ).rowcount


def delivery_of(row: Mapping[Any, Any]) -> Delivery:
    """A webhook_deliveries row as a Delivery."""
    return Delivery(
        id=row["id"],
        job_id=row["job_id"],
        user_id=row["user_id"],
        message_id=row["message_id"],
        url=row["url"],
        status=row["status"],
        tries=row["tries"],
        next_at=row["next_at"],
        created_at=row["created_at"],
        host=row["host"],
    )
