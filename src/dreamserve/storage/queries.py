"""Every SQL statement the server runs, as functions over a connection the caller holds.

Callers decide the transaction (`Database.write` / `read`), so several statements commit together:
a slot taken with the job inserted, a job finished with its slot released. Statements on the hot
paths are built once, here, with bound parameters: building a statement costs more than running
it on SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, case, delete, func, insert, select, update

from dreamserve.ids import AssetRef
from dreamserve.jobs import Job, Spec, Status, StoredImage
from dreamserve.storage.prepared import Prepared
from dreamserve.storage.tables import SHARED, accounts, assets, jobs, tokens, users

CREATED = Status.CREATED.value


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    owner: int
    email: str
    region: str
    engine: str
    settings: Mapping[str, Any] = field(repr=False)
    sealed: str | None = field(repr=False)  # the secret settings, sealed (storage/sealing.py)
    models: tuple[str, ...] | None
    max_jobs: int
    running: int
    error: str | None
    created_at: int
    updated_at: int

    @property
    def is_shared(self) -> bool:
        return self.owner == SHARED

    @property
    def version(self) -> tuple[int, int]:
        """Which account and which of its saves: engines are rebuilt when it changes."""
        return self.created_at, self.updated_at


# Users and tokens

_USER_OF_TOKEN = select(tokens.c.user_id).where(tokens.c.token_hash == bindparam("hash"))


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


# Accounts and slots

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
) -> None:
    """Replace an account's configuration and clear its error; its taken slots stay taken."""
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
            error=None,
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
        .where(jobs.c.account_id == accounts.c.id, jobs.c.status == CREATED)
        .scalar_subquery()
    )
    conn.execute(update(accounts).values(running=unfinished))


def slots_taken(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(accounts.c.name, accounts.c.running))
    return {name: running for name, running in rows}


# Jobs

_NEW_JOB_COLUMNS = [
    "jobid",
    "type",
    "status",
    "user_id",
    "account_id",
    "account",
    "model",
    "request",
    "spec",
    "forecast_cost",
    "attempts",
    "created_at",
    "lease_until",
]
_INSERT_JOB = Prepared(insert(jobs).returning(jobs.c.id), columns=_NEW_JOB_COLUMNS)
_JOB_BY_JOBID = Prepared(
    select(jobs).where(jobs.c.jobid == bindparam("jobid"), jobs.c.user_id == bindparam("user"))
)
_CLAIM_JOB = (
    update(jobs)
    .where(jobs.c.id == bindparam("job"), jobs.c.status == CREATED, jobs.c.started_at.is_(None))
    .values(
        started_at=bindparam("now"),
        updated_at=bindparam("now"),
        lease_until=bindparam("lease"),
        progress=0,
        attempts=jobs.c.attempts + 1,
    )
    .returning(*jobs.c)
)
# A runner's writes are fenced by its attempt: once the reaper gave the job to another runner
# (or ended it), the first one's renewals and results change nothing.
_RENEW_LEASE = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("job"),
        jobs.c.status == CREATED,
        jobs.c.attempts == bindparam("attempt"),
    )
    .values(lease_until=bindparam("lease"))
)
_RENEW_LEASE_WITH_PROGRESS = _RENEW_LEASE.values(
    progress=bindparam("new_progress"), updated_at=bindparam("now")
)
_FINISH_VALUES: dict[str, Any] = {
    "status": bindparam("new_status"),
    "images": bindparam("new_images"),
    "error": bindparam("new_error"),
    "error_details": bindparam("new_error_details"),
    "progress": None,
    "lease_until": None,
    "updated_at": bindparam("now"),
    "finished_at": bindparam("now"),
}
_FINISH_JOB = (
    update(jobs)
    .where(jobs.c.id == bindparam("job"), jobs.c.status == CREATED)
    .values(**_FINISH_VALUES)
    .returning(jobs.c.account_id)
)
_FINISH_JOB_OF_ATTEMPT = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("job"),
        jobs.c.status == CREATED,
        jobs.c.attempts == bindparam("attempt"),
    )
    .values(**_FINISH_VALUES)
    .returning(jobs.c.account_id)
)
_INSERT_ASSET = insert(assets)


def insert_job(conn: Connection, job: Job, *, account_id: int, lease_until: int) -> int:
    """Insert a new job (its `id` is ignored); the id the database gave it. The job is leased
    until its runner claims it: a job whose dispatch was lost is found by the reaper too."""
    values = {
        "jobid": job.jobid,
        "type": job.type,
        "status": job.status.value,
        "user_id": job.user_id,
        "account_id": account_id,
        "account": job.account,
        "model": job.model,
        "request": dict(job.request),
        "spec": job.spec.to_json(),
        "forecast_cost": job.forecast_cost,
        "attempts": 0,
        "created_at": job.created_at,
        "lease_until": lease_until,
    }
    cursor = _INSERT_JOB.execute(conn, values)
    job_id = int(cursor.fetchone()[0])
    cursor.close()
    return job_id


def job_by_jobid(conn: Connection, jobid: str, user_id: int) -> Job | None:
    row = _JOB_BY_JOBID.first(conn, {"jobid": jobid, "user": user_id})
    return None if row is None else _job(row)


def claim_job(
    conn: Connection, job_id: int, now: int, lease_until: int
) -> tuple[Job, int | None] | None:
    """Mark an unfinished, unstarted job started (one more attempt) and leased until
    `lease_until`: its row and its account id, or None when it is finished or already running
    (a second delivery does nothing)."""
    row = (
        conn.execute(_CLAIM_JOB, {"job": job_id, "now": now, "lease": lease_until})
        .mappings()
        .first()
    )
    return None if row is None else (_job(row), row["account_id"])


def renew_lease(
    conn: Connection,
    job_id: int,
    attempt: int,
    lease_until: int,
    *,
    progress: int | None = None,
    now: int = 0,
) -> bool:
    """Extend the lease of a running job (and record its progress when given); False when the
    job is no longer this attempt's to run: ended (cancelled, its account deleted) or reaped."""
    params: dict[str, Any] = {"job": job_id, "attempt": attempt, "lease": lease_until}
    if progress is None:
        return conn.execute(_RENEW_LEASE, params).rowcount == 1
    params.update(new_progress=progress, now=now)
    return conn.execute(_RENEW_LEASE_WITH_PROGRESS, params).rowcount == 1


def finish_job(
    conn: Connection,
    job: Job,
    *,
    status: Status,
    now: int,
    attempt: int | None = None,
    expired_before: int | None = None,
    images: Sequence[StoredImage] = (),
    description: str | None = None,
    error: str | None = None,
    error_details: str | None = None,
) -> bool:
    """End an unfinished job: its final state, its images as assets, its slot given back.

    Only the first call for a job does anything (the update is conditional on the job being
    unfinished), so a slot is released exactly once whatever path ends the job. A runner
    passes its `attempt`: a job taken back from it is not its to end. The reaper also passes
    `expired_before`: a lease renewed meanwhile keeps the job running.
    """
    params = {
        "job": job.id,
        "new_status": status.value,
        "new_images": [image.to_json() for image in images] if images else None,
        "new_error": error,
        "new_error_details": error_details,
        "now": now,
    }
    if attempt is None:
        finished = conn.execute(_FINISH_JOB, params).first()
    elif expired_before is None:
        finished = conn.execute(_FINISH_JOB_OF_ATTEMPT, {**params, "attempt": attempt}).first()
    else:
        statement = _FINISH_JOB_OF_ATTEMPT.where(jobs.c.lease_until < expired_before)
        finished = conn.execute(statement, {**params, "attempt": attempt}).first()
    if finished is None:
        return False
    account_id = finished[0]
    if account_id is not None:
        conn.execute(_RELEASE_SLOT, {"account": account_id})
    if images:
        conn.execute(
            _INSERT_ASSET,
            [
                {
                    "item_id": image.item_id,
                    "user_id": job.user_id,
                    "account_id": account_id,
                    "account": job.account,
                    "job_id": job.id,
                    "position": position,
                    "kind": "generated",
                    "uri": image.uri,
                    "width": image.width,
                    "height": image.height,
                    "format": image.format,
                    "size": image.size,
                    "description": description,
                    "created_at": now,
                }
                for position, image in enumerate(images)
            ],
        )
    return True


def cancel_account_jobs(
    conn: Connection, account_id: int, error: str, details: str, now: int
) -> list[int]:
    """End every unfinished job of an account as failed (its slots go with the account); their
    ids, for the runners to be told."""
    result = conn.execute(
        update(jobs)
        .where(jobs.c.account_id == account_id, jobs.c.status == CREATED)
        .values(
            status=Status.FAILED.value,
            error=error,
            error_details=details,
            progress=None,
            lease_until=None,
            updated_at=now,
            finished_at=now,
        )
        .returning(jobs.c.id)
    )
    return list(result.scalars())


def unfinished_jobs_of(conn: Connection, user_id: int) -> list[Job]:
    """The user's jobs that hold a slot (queued or running), oldest first."""
    query = (
        select(jobs).where(jobs.c.user_id == user_id, jobs.c.status == CREATED).order_by(jobs.c.id)
    )
    return [_job(row) for row in conn.execute(query).mappings()]


def expired_leases(conn: Connection, now: int) -> list[tuple[int, int]]:
    """(id, attempt) of the running jobs whose runner stopped renewing its lease."""
    query = select(jobs.c.id, jobs.c.attempts).where(
        jobs.c.status == CREATED, jobs.c.lease_until < now
    )
    return [(job_id, attempt) for job_id, attempt in conn.execute(query)]


def requeue_job(conn: Connection, job_id: int, attempt: int, now: int, lease_until: int) -> bool:
    """Take a job whose lease ran out (at `now`) back from the runner of `attempt`, so that
    another claim runs it again; leased anew until then. False when it was renewed or ended
    meanwhile."""
    result = conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id,
            jobs.c.status == CREATED,
            jobs.c.attempts == attempt,
            jobs.c.lease_until < now,
        )
        .values(started_at=None, lease_until=lease_until, progress=None)
    )
    return result.rowcount == 1


def delete_finished_jobs(conn: Connection, before: int, limit: int) -> tuple[int, list[str]]:
    """Delete up to `limit` jobs that finished before `before` (their assets go with them):
    how many, and the blob keys of their images, for the caller to delete once this commits."""
    rows = conn.execute(
        select(jobs.c.id, jobs.c.images)
        .where(jobs.c.finished_at < before)
        .order_by(jobs.c.finished_at)
        .limit(limit)
    ).all()
    if rows:
        conn.execute(delete(jobs).where(jobs.c.id.in_([job_id for job_id, _ in rows])))
    return len(rows), [image["uri"] for _, images in rows for image in images or ()]


def job_by_id(conn: Connection, job_id: int) -> Job | None:
    row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
    return None if row is None else _job(row)


def fail_exhausted_jobs(conn: Connection, max_attempts: int, error: str, now: int) -> list[str]:
    """Fail the unfinished jobs that were started `max_attempts` times already; their jobids."""
    result = conn.execute(
        update(jobs)
        .where(jobs.c.status == CREATED, jobs.c.attempts >= max_attempts)
        .values(status=Status.FAILED.value, error=error, updated_at=now, finished_at=now)
        .returning(jobs.c.jobid)
    )
    return list(result.scalars())


def release_unfinished_jobs(conn: Connection, lease_until: int) -> list[int]:
    """Mark every unfinished job not started (leased until a runner claims it), so that a
    runner can claim it again; their ids, oldest first. Only for the process that holds the
    runner lock."""
    conn.execute(
        update(jobs)
        .where(jobs.c.status == CREATED)
        .values(started_at=None, lease_until=lease_until, progress=None)
    )
    query = select(jobs.c.id).where(jobs.c.status == CREATED).order_by(jobs.c.id)
    return list(conn.execute(query).scalars())


# Assets


def existing_assets(conn: Connection, user_id: int, refs: Iterable[AssetRef]) -> set[AssetRef]:
    """Those of `refs` that name an image of this user, with exactly those properties."""
    wanted = set(refs)
    if not wanted:
        return set()
    query = select(
        assets.c.account, assets.c.width, assets.c.height, assets.c.size, assets.c.uri
    ).where(assets.c.user_id == user_id, assets.c.uri.in_({ref.uri for ref in wanted}))
    found = {AssetRef(*row) for row in conn.execute(query)}
    return wanted & found


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
    )


def _job(row: Mapping[Any, Any]) -> Job:
    return Job(
        id=row["id"],
        jobid=row["jobid"],
        type=row["type"],
        status=Status(row["status"]),
        model=row["model"],
        account=row["account"],
        user_id=row["user_id"],
        request=row["request"],
        spec=Spec.from_json(row["spec"]),
        forecast_cost=row["forecast_cost"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        progress=row["progress"],
        error=row["error"],
        error_details=row["error_details"],
        images=tuple(StoredImage.from_json(image) for image in row["images"] or ()),
        attempts=row["attempts"],
    )
