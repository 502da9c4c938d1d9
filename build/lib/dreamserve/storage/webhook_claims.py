"""Claiming due webhook deliveries fairly, and the health of receiver hosts.

A claim takes due deliveries earliest first but skips the users and receiver hosts that already
have as many tries in flight as `Fairness` allows (counted on every node: a claimed row is
`held_until` its try ends), so one tenant's slow or silent receivers hold at most its share of
the deliverers' places. A host whose tries keep getting no answer (timeouts, refused
connections) cools down (`webhook_hosts`): its due deliveries wait, their tries unspent, until
the cooldown ends, and then it gets one try at a time until one is answered. The cooldown's
length is the caller's rule (webhooks/rules.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from dreamserve.storage.tables import webhook_deliveries, webhook_hosts
from dreamserve.storage.webhook_queries import PENDING, Delivery, delivery_of


@dataclass(frozen=True)
class Fairness:
    """How many tries may be in flight at once, on all nodes together: per user, per receiver
    host, and one per host whose last `probe_after` tries or more got no answer."""

    per_user: int
    per_host: int
    probe_after: int


# Candidates read per pass of a claim, at least; a pass that skips some at their caps leaves
# their users and hosts out of the next, so a few passes reach past any one tenant's backlog.
_PAGE = 16
_PASSES = 4
_CLAIM_LOCK = text("SELECT pg_advisory_xact_lock(7463221)")  # one claim at a time, all nodes


def claim_due(
    conn: Connection, now: int, until: int, limit: int, max_tries: int, fairness: Fairness
) -> tuple[list[Delivery], bool]:
    """Take up to `limit` pending deliveries due at `now`, earliest first, skipping those of a
    user or receiver host at its cap (`fairness`, counting tries in flight on every node) and
    deferring those of a host cooling down to its cooldown's end (their tries unspent). Each
    taken one is counted one more try and held until `until` (another deliverer skips it
    meanwhile). A delivery due again after `max_tries` claims (its last tries died before they
    were recorded) is failed instead. Also says whether due deliveries may be left (skipped at
    a cap or not looked at): the caller claims again as soon as a try ends."""
    if conn.dialect.name == "postgresql":  # caps are counted, then taken: never two at once
        conn.execute(_CLAIM_LOCK)
    conn.execute(
        update(webhook_deliveries)
        .where(
            webhook_deliveries.c.status == PENDING,
            webhook_deliveries.c.next_at <= now,
            webhook_deliveries.c.tries >= max_tries,
        )
        .values(status="failed", next_at=None, held_until=None, updated_at=now)
    )
    _defer_cooling(conn, now)
    caps = _Caps(fairness)
    caps.count_in_flight(conn, now)
    claimed: list[Delivery] = []
    page = max(_PAGE, 4 * limit)
    for _ in range(_PASSES):
        rows = conn.execute(_candidates(now, caps, page)).all()
        chosen: list[int] = []
        for delivery_id, user_id, host, failures in rows:
            if len(claimed) + len(chosen) == limit:
                return claimed + _claim(conn, chosen, now, until), True
            if caps.take(user_id, host, failures or 0):
                chosen.append(delivery_id)
        claimed += _claim(conn, chosen, now, until)
        if len(rows) < page:
            return claimed, caps.crowded or len(claimed) == limit
    return claimed, True


class _Caps:
    """The tries in flight per user and per host, as a claim takes more."""

    def __init__(self, fairness: Fairness) -> None:
        self.fairness = fairness
        self.users: Counter[int] = Counter()
        self.hosts: Counter[str] = Counter()
        self.full_users: set[int] = set()
        self.full_hosts: set[str] = set()
        self.skipped = False

    def count_in_flight(self, conn: Connection, now: int) -> None:
        rows = conn.execute(
            select(
                webhook_deliveries.c.user_id,
                webhook_deliveries.c.host,
                func.count(),
                func.max(webhook_hosts.c.failures),
            )
            .select_from(_with_host_state)
            # held_until is cleared whenever a row leaves `pending`: its index alone answers
            .where(webhook_deliveries.c.held_until > now)
            .group_by(webhook_deliveries.c.user_id, webhook_deliveries.c.host)
        )
        for user_id, host, count, failures in rows:
            self.users[user_id] += count
            self.hosts[host] += count
            self._check(user_id, host, failures or 0)

    @property
    def crowded(self) -> bool:
        """Whether a user or host reached its cap: it may have more due."""
        return self.skipped or bool(self.full_users or self.full_hosts)

    def take(self, user_id: int, host: str, failures: int) -> bool:
        """Count one more try of this user to this host, if both are below their caps."""
        if user_id in self.full_users or host in self.full_hosts:
            self.skipped = True
            return False
        self.users[user_id] += 1
        self.hosts[host] += 1
        self._check(user_id, host, failures)
        return True

    def _check(self, user_id: int, host: str, failures: int) -> None:
        if self.users[user_id] >= self.fairness.per_user:
            self.full_users.add(user_id)
        probing = failures >= self.fairness.probe_after  # one try at a time tells
        if self.hosts[host] >= (1 if probing else self.fairness.per_host):
            self.full_hosts.add(host)


_with_host_state = webhook_deliveries.outerjoin(
    webhook_hosts, webhook_hosts.c.host == webhook_deliveries.c.host
)


def _candidates(now: int, caps: _Caps, page: int) -> Any:
    """Due deliveries of users and hosts below their caps, earliest first, with their host's
    failures in a row."""
    query = (
        select(
            webhook_deliveries.c.id,
            webhook_deliveries.c.user_id,
            webhook_deliveries.c.host,
            webhook_hosts.c.failures,
        )
        .select_from(_with_host_state)
        .where(
            webhook_deliveries.c.status == PENDING,
            webhook_deliveries.c.next_at <= now,
            or_(webhook_hosts.c.cooldown_until.is_(None), webhook_hosts.c.cooldown_until <= now),
        )
        .order_by(webhook_deliveries.c.next_at, webhook_deliveries.c.id)
        .limit(page)
    )
    # Only when there are some: an empty IN list still costs its expansion on every run.
    if caps.full_users:
        query = query.where(webhook_deliveries.c.user_id.not_in(sorted(caps.full_users)))
    if caps.full_hosts:
        query = query.where(webhook_deliveries.c.host.not_in(sorted(caps.full_hosts)))
    return query


def _defer_cooling(conn: Connection, now: int) -> None:
    """Due deliveries of a host cooling down wait for its cooldown's end (a delivery queued or
    retried since the host began cooling): `nextTry` says when they will be tried."""
    if conn.execute(_ANY_COOLING, {"now": now}).first() is None:  # the usual case: a tiny read
        return
    cooling = and_(
        webhook_hosts.c.host == webhook_deliveries.c.host, webhook_hosts.c.cooldown_until > now
    )
    conn.execute(
        update(webhook_deliveries)
        .where(
            webhook_deliveries.c.status == PENDING,
            webhook_deliveries.c.next_at <= now,
            exists(select(webhook_hosts.c.host).where(cooling)),
        )
        .values(
            next_at=select(webhook_hosts.c.cooldown_until).where(cooling).scalar_subquery(),
            updated_at=now,
        )
    )


_ANY_COOLING = (
    select(webhook_hosts.c.host).where(webhook_hosts.c.cooldown_until > bindparam("now")).limit(1)
)


def _claim(conn: Connection, ids: Sequence[int], now: int, until: int) -> list[Delivery]:
    if not ids:
        return []
    rows = conn.execute(
        update(webhook_deliveries)
        .where(
            webhook_deliveries.c.id.in_(ids),
            webhook_deliveries.c.status == PENDING,
            webhook_deliveries.c.next_at <= now,
        )
        .values(
            next_at=until,
            held_until=until,
            tries=webhook_deliveries.c.tries + 1,
            updated_at=now,
        )
        .returning(*webhook_deliveries.c)
    ).mappings()
    return sorted((delivery_of(row) for row in rows), key=lambda d: ids.index(d.id))


# Receiver hosts' health


def host_answered(conn: Connection, host: str) -> None:
    """A host answered (any HTTP status): its failures and cooldown are forgotten."""
    conn.execute(delete(webhook_hosts).where(webhook_hosts.c.host == host))


def host_failed(conn: Connection, host: str, at: int) -> int:
    """A try got no answer from `host` (timeout, refused or dropped connection): its failures
    in a row, this one counted (the row is locked until the transaction ends)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(webhook_hosts)
        .values(host=host, failures=1, cooldown_until=None, updated_at=at)
        .on_conflict_do_update(
            index_elements=[webhook_hosts.c.host],
            set_={"failures": webhook_hosts.c.failures + 1, "updated_at": at},
        )
        .returning(webhook_hosts.c.failures)
    )
    return int(conn.execute(statement).scalar_one())


def cool_host(conn: Connection, host: str, until: int) -> None:
    """No try goes to `host` before `until`; its due deliveries wait (claim_due)."""
    conn.execute(
        update(webhook_hosts).where(webhook_hosts.c.host == host).values(cooldown_until=until)
    )


def forget_hosts_before(conn: Connection, before: int) -> int:
    """Forget hosts that failed last before `before` and are not cooling down then."""
    return conn.execute(
        delete(webhook_hosts).where(
            webhook_hosts.c.updated_at < before,
            or_(webhook_hosts.c.cooldown_until.is_(None), webhook_hosts.c.cooldown_until < before),
        )
    ).rowcount


def end_cooldown(conn: Connection, host: str, now: int) -> None:
    """A redelivery asks for a try now: a cooldown of its host ends (the host still gets one
    try at a time until one is answered)."""
    conn.execute(
        update(webhook_hosts)
        .where(webhook_hosts.c.host == host, webhook_hosts.c.cooldown_until > now)
        .values(cooldown_until=None)
    )
