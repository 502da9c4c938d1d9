"""The SQL of accounts and their slots: the pool admission chooses from.

A slot is taken by one conditional UPDATE that checks the live cap and health, so concurrent
admissions never over-admit; it is given back in the transaction that ends the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, func, insert, select, update

from dreamserve.jobs import CANCELLED_BY_USER, Status
from dreamserve.storage.prepared import Prepared
from dreamserve.storage.tables import SHARED, accounts, jobs

CREATED = Status.CREATED.value
# An account whose jobs fail for its own reasons this many times in a row is cooled down: left
# out of admission's choice (while another account has room) for 30 s, doubling with each
# further failure up to 10 minutes; its next success ends it.
FAILURES_BEFORE_COOLDOWN = 3
FIRST_COOLDOWN_MS = 30_000
LONGEST_COOLDOWN_MS = 600_000


def cooldown_ms(failures: int) -> int | None:
    """How long an account with `failures` in a row cools down (None: not yet)."""
    if failures < FAILURES_BEFORE_COOLDOWN:
        return None
    doublings = min(failures - FAILURES_BEFORE_COOLDOWN, 16)
    return min(LONGEST_COOLDOWN_MS, FIRST_COOLDOWN_MS << doublings)


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    owner: int
    email: str
    region: str
    engine: str
    settings: Mapping[str, Any] = field(repr=False)
    sealed: str | None = field(repr=False)  # the secret settings, sealed (sealing.py)
    models: tuple[str, ...] | None
    max_jobs: int
    running: int
    error: str | None
    created_at: int
    updated_at: int
    priority: int = 0
    failures: int = 0  # of the account's own (AccountTrouble), in a row
    cooldown_until: int | None = None  # epoch ms
    last_error: str | None = None
    last_error_at: int | None = None

    def cooling(self, now: int) -> bool:
        """Whether the account is cooling down at `now` (epoch ms)."""
        return self.cooldown_until is not None and self.cooldown_until > now

    @property
    def is_shared(self) -> bool:
        return self.owner == SHARED

    @property
    def version(self) -> tuple[int, int]:
        """Which account and which of its saves: engines are rebuilt when it changes."""
        return self.created_at, self.updated_at


_USABLE_ACCOUNTS = (
    select(accounts)
    .where(accounts.c.owner.in_([SHARED, bindparam("user")]))
    .order_by(accounts.c.id)
)
_ACCOUNT_BY_ID = select(accounts).where(accounts.c.id == bindparam("account"))
# The cap is checked against the row as it is now (not as a caller last saw it), and an account
# in error takes nothing: admission may work from a slightly stale list of accounts.
_TAKE_SLOT_WITHIN_MAX = Prepared(
    update(accounts)
    .where(
        accounts.c.id == bindparam("account"),
        accounts.c.error.is_(None),
        accounts.c.running < accounts.c.max_jobs,
        accounts.c.running < bindparam("cap"),
    )
    .values(running=accounts.c.running + 1)
)
_TAKE_SLOT_UNDER_CAP = Prepared(
    update(accounts)
    .where(
        accounts.c.id == bindparam("account"),
        accounts.c.error.is_(None),
        accounts.c.running < bindparam("cap"),
    )
    .values(running=accounts.c.running + 1)
)
_HEALTHY = (
    update(accounts)
    .where(
        accounts.c.id == bindparam("account"),
        (accounts.c.failures > 0) | accounts.c.cooldown_until.is_not(None),
    )
    .values(failures=0, cooldown_until=None)
)
_RELEASE_SLOT = (
    update(accounts)
    .where(accounts.c.id == bindparam("account"), accounts.c.running > 0)
    .values(running=accounts.c.running - 1)
)


def insert_account(
    conn: Connection,
    *,
    name: str,
    owner: int,
    email: str,
    region: str,
    engine: str,
    max_jobs: int,
    now: int,
    settings: Mapping[str, Any] | None = None,
    sealed: str | None = None,
    models: Sequence[str] | None = None,
    priority: int = 0,
) -> int:
    result = conn.execute(
        insert(accounts)
        .values(
            name=name,
            owner=owner,
            email=email,
            region=region,
            engine=engine,
            settings=dict(settings or {}),
            secrets=sealed,
            models=None if models is None else list(models),
            max_jobs=max_jobs,
            priority=priority,
            running=0,
            created_at=now,
            updated_at=now,
        )
        .returning(accounts.c.id)
    )
    return int(result.scalar_one())


def usable_accounts(conn: Connection, user_id: int) -> list[Account]:
    """The user's own accounts and the shared ones."""
    return [_account(row) for row in conn.execute(_USABLE_ACCOUNTS, {"user": user_id}).mappings()]


def shared_accounts(conn: Connection) -> list[Account]:
    query = select(accounts).where(accounts.c.owner == SHARED).order_by(accounts.c.id)
    return [_account(row) for row in conn.execute(query).mappings()]


def every_account(conn: Connection) -> list[Account]:
    """Every account, shared and users' own, shared ones first."""
    query = select(accounts).order_by(accounts.c.owner != SHARED, accounts.c.id)
    return [_account(row) for row in conn.execute(query).mappings()]


def account_by_id(conn: Connection, account_id: int) -> Account | None:
    row = conn.execute(_ACCOUNT_BY_ID, {"account": account_id}).mappings().first()
    return None if row is None else _account(row)


def account_named(conn: Connection, owner: int, name: str) -> Account | None:
    query = select(accounts).where(accounts.c.owner == owner, accounts.c.name == name)
    row = conn.execute(query).mappings().first()
    return None if row is None else _account(row)


def owners_of_name(conn: Connection, name: str) -> list[int]:
    """Who has an account called `name` (a user id, or SHARED)."""
    query = select(accounts.c.owner).where(accounts.c.name == name)
    return list(conn.execute(query).scalars())


def update_account(
    conn: Connection,
    account_id: int,
    *,
    email: str,
    region: str,
    engine: str,
    max_jobs: int,
    now: int,
    settings: Mapping[str, Any],
    sealed: str | None,
    models: Sequence[str] | None,
    priority: int = 0,
) -> None:
    """Replace an account's configuration and clear its error and cooldown; its taken slots
    stay taken."""
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(
            email=email,
            region=region,
            engine=engine,
            settings=dict(settings),
            secrets=sealed,
            models=None if models is None else list(models),
            max_jobs=max_jobs,
            priority=priority,
            error=None,
            failures=0,  # saved again (fixed, one hopes): given a fresh start
            cooldown_until=None,
            # Strictly later than the last save, even within a millisecond or after the
            # clock stepped back: engines are rebuilt for a newer version only.
            updated_at=case((accounts.c.updated_at < now, now), else_=accounts.c.updated_at + 1),
        )
    )


def lock_account(conn: Connection, account_id: int) -> None:
    """Hold the account's row until the transaction ends (an update that changes nothing:
    SQLite locks the whole database for a write anyway)."""
    conn.execute(
        update(accounts).where(accounts.c.id == account_id).values(running=accounts.c.running)
    )


def delete_account(conn: Connection, account_id: int) -> None:
    """Delete an account; its jobs and images keep its name but lose the link to it."""
    conn.execute(delete(accounts).where(accounts.c.id == account_id))


def set_account_error(conn: Connection, account: Account, error: str) -> None:
    """Put an account in error, unless it was saved since (the error was about settings that
    are gone): admission skips it until it is saved again."""
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account.id, accounts.c.updated_at == account.updated_at)
        .values(error=error)
    )


def account_succeeded(conn: Connection, account_id: int) -> None:
    """A job of the account completed: its failures in a row and any cooldown end (a statement
    that matches no row while the account is healthy)."""
    conn.execute(_HEALTHY, {"account": account_id})


def account_failed(
    conn: Connection, account_id: int, error: str, now: int, cool_for: int | None
) -> int | None:
    """A job of the account failed for a reason of the account's: one more failure in a row,
    and the cooldown that follows (`cooldown_ms`, or `cool_for` ms when the upstream asked for
    it, whichever ends later); the end of the cooldown, or None when there is none."""
    lock_account(conn, account_id)  # failures are read, then written: one job at a time
    row = conn.execute(
        select(accounts.c.failures, accounts.c.cooldown_until).where(accounts.c.id == account_id)
    ).first()
    if row is None:
        return None
    failures = row.failures + 1
    ends = [until for until in (row.cooldown_until,) if until is not None and until > now]
    backoff = cooldown_ms(failures)
    ends += [now + ms for ms in (backoff, cool_for) if ms is not None]
    until = max(ends, default=None)
    conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id)
        .values(failures=failures, cooldown_until=until, last_error=error, last_error_at=now)
    )
    return until


def recent_outcomes(
    conn: Connection, since: int, account_ids: Sequence[int]
) -> dict[int, dict[str, int]]:
    """For each of the accounts, its jobs that ended since `since` (epoch ms): {"completed":
    n, "failed": n} (cancelled jobs are neither)."""
    rows = conn.execute(
        select(jobs.c.account_id, jobs.c.status, func.count())
        .where(
            jobs.c.finished_at >= since,
            jobs.c.account_id.in_(list(account_ids)),
            jobs.c.status.in_(["completed", "failed"]),
            jobs.c.error.is_distinct_from(CANCELLED_BY_USER),
        )
        .group_by(jobs.c.account_id, jobs.c.status)
    )
    counts: dict[int, dict[str, int]] = {}
    for account_id, status, count in rows:
        counts.setdefault(account_id, {"completed": 0, "failed": 0})[status] = count
    return counts


def release_slot(conn: Connection, account_id: int) -> None:
    """Give back one slot (never below zero): the end of a job, whatever ended it."""
    conn.execute(_RELEASE_SLOT, {"account": account_id})


def take_slot(conn: Connection, account: Account, requested: int | None = None) -> bool:
    """Take one slot of a healthy account if one is free: one atomic statement, safe under
    races. A request's `maxJobs` (`requested`) replaces the account's cap, except that on a
    shared account it can only lower it."""
    if requested is not None and not account.is_shared:
        statement, cap = _TAKE_SLOT_UNDER_CAP, requested
    else:
        statement, cap = _TAKE_SLOT_WITHIN_MAX, requested or 2**31 - 1
    return statement.rowcount(conn, {"account": account.id, "cap": cap}) == 1


def recount_slots(conn: Connection) -> None:
    """Set every account's taken slots to the number of its unfinished jobs."""
    unfinished = (
        select(func.count())
        .select_from(jobs)
        .where(
            jobs.c.account_id == accounts.c.id,
            jobs.c.status == CREATED,
            jobs.c.queue_deadline.is_(None),  # a waiting job holds no slot
        )
        .scalar_subquery()
    )
    conn.execute(update(accounts).values(running=unfinished))


def slots_taken(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(accounts.c.name, accounts.c.running))
    return {name: running for name, running in rows}


def _account(row: Mapping[Any, Any]) -> Account:
    return Account(
        id=row["id"],
        name=row["name"],
        owner=row["owner"],
        email=row["email"],
        region=row["region"],
        engine=row["engine"],
        settings=row["settings"] or {},
        sealed=row["secrets"],
        models=None if row["models"] is None else tuple(row["models"]),
        max_jobs=row["max_jobs"],
        running=row["running"],
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        priority=row["priority"],
        failures=row["failures"],
        cooldown_until=row["cooldown_until"],
        last_error=row["last_error"],
        last_error_at=row["last_error_at"],
    )
