"""The SQL of jobs, as functions over a connection the caller holds.

Callers decide the transaction (`Database.write` / `read`), so several statements commit together:
a slot taken with the job inserted, a job finished with its slot released. Statements on the hot
paths are built once, here, with bound parameters: building a statement costs more than running
it on SQLite. Users and tokens are in user_queries.py, accounts and slots in
account_queries.py, assets in asset_queries.py, the webhook outbox in webhook_queries.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from dreamserve.jobs import (
    TRANSITIONS,
    EndedJob,
    Job,
    Phase,
    Spec,
    Status,
    StoredImage,
    Transition,
)
from dreamserve.storage import account_queries, webhook_queries
from dreamserve.storage.account_queries import release_slot
from dreamserve.storage.prepared import Prepared
from dreamserve.storage.tables import accounts, assets, jobs

CREATED = Status.CREATED.value


def in_phases(phases: Iterable[Phase | None]) -> ColumnElement[bool]:
    """The SQL condition of a job in one of `phases`."""
    wanted = {phase for phase in phases if phase is not None}
    unfinished = {Phase.WAITING, Phase.QUEUED, Phase.RUNNING}
    conditions: list[ColumnElement[bool]] = []
    if unfinished <= wanted:
        conditions.append(jobs.c.status == CREATED)
    else:
        waiting = jobs.c.queue_deadline.is_not(None)
        of_phase = {
            Phase.WAITING: waiting,
            Phase.QUEUED: and_(~waiting, jobs.c.started_at.is_(None)),
            Phase.RUNNING: jobs.c.started_at.is_not(None),
        }
        parts = [of_phase[phase] for phase in sorted(unfinished & wanted)]
        if parts:
            either = parts[0] if len(parts) == 1 else or_(*parts)
            conditions.append(and_(jobs.c.status == CREATED, either))
    ended = [phase.value for phase in wanted if phase.is_terminal]
    if ended:
        conditions.append(jobs.c.status.in_(sorted(ended)))
    return conditions[0] if len(conditions) == 1 else or_(*conditions)


# The condition of each transition's starting phases, from the one table in jobs.py: a
# statement made with it changes nothing when the job is anywhere else.
FROM = {
    transition: in_phases(rule.sources)
    for transition, rule in TRANSITIONS.items()
    if rule.sources != {None}
}


_QUEUED = in_phases([Phase.QUEUED])
_WAITING = in_phases([Phase.WAITING])

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
    "queue_deadline",
]
_INSERT_JOB = Prepared.inserting(insert(jobs), jobs.c.id, _NEW_JOB_COLUMNS)
_JOB_BY_JOBID = Prepared(
    select(jobs).where(jobs.c.jobid == bindparam("jobid"), jobs.c.user_id == bindparam("user"))
)
_CLAIM_JOB = (
    update(jobs)
    .where(jobs.c.id == bindparam("job"), FROM[Transition.CLAIM])
    .values(
        started_at=bindparam("now"),
        updated_at=bindparam("now"),
        lease_until=bindparam("lease"),
        progress=0,
        attempts=jobs.c.attempts + 1,
    )
    .returning(*jobs.c)
)
# A runner's writes are fenced by its attempt and need the job running: once the reaper took
# the job back (queued again, not yet claimed) or it ended, the first runner's renewals and
# results change nothing.
_RENEW_LEASE = (
    update(jobs)
    .where(
        jobs.c.id == bindparam("job"),
        FROM[Transition.PROGRESS],
        jobs.c.attempts == bindparam("attempt"),
    )
    .values(lease_until=bindparam("lease"))
)
_RENEW_LEASE_WITH_PROGRESS = _RENEW_LEASE.values(
    progress=bindparam("new_progress"), updated_at=bindparam("now")
)


def _ended(status: Any, error: Any, details: Any, now: Any) -> dict[str, Any]:
    """The values every path that ends a job writes (literals or bound parameters)."""
    return {
        "status": status,
        "error": error,
        "error_details": details,
        "progress": None,
        "lease_until": None,
        "updated_at": now,
        "finished_at": now,
    }


_FINISH_VALUES = {
    **_ended(
        bindparam("new_status"),
        bindparam("new_error"),
        bindparam("new_error_details"),
        bindparam("now"),
    ),
    "images": bindparam("new_images"),
}
_FINISH_JOB = (  # a cancel: whoever runs it, or none
    update(jobs)
    .where(jobs.c.id == bindparam("job"), FROM[Transition.CANCEL])
    .values(**_FINISH_VALUES)
    .returning(jobs.c.account_id, jobs.c.queue_deadline)
)
_FINISH_JOB_OF_ATTEMPT = (  # a runner's end (finish or fail) of the attempt it runs
    update(jobs)
    .where(
        jobs.c.id == bindparam("job"),
        FROM[Transition.FINISH],
        jobs.c.attempts == bindparam("attempt"),
    )
    .values(**_FINISH_VALUES)
    .returning(jobs.c.account_id, jobs.c.queue_deadline)
)
_INSERT_ASSET = insert(assets)


def insert_job(
    conn: Connection,
    *,
    jobid: str,
    kind: str,
    user_id: int,
    account_id: int,
    account: str,
    model: str,
    request: Mapping[str, Any],
    spec: Spec,
    forecast_cost: float,
    created_at: int,
    lease_until: int | None,
    queue_deadline: int | None = None,
) -> int:
    """Insert a new job, status `created`; the id the database gave it. The job is leased
    until its runner claims it: a job whose dispatch was lost is found by the reaper too. A
    job that waits for a slot (`queue_deadline`) has no lease until it takes one."""
    values = {
        "jobid": jobid,
        "type": kind,
        "status": CREATED,
        "user_id": user_id,
        "account_id": account_id,
        "account": account,
        "model": model,
        "request": request,
        "spec": spec.to_json(),
        "forecast_cost": forecast_cost,
        "attempts": 0,
        "created_at": created_at,
        "lease_until": lease_until,
        "queue_deadline": queue_deadline,
    }
    return _INSERT_JOB.insert_id(conn, values)


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
    freed: list[int] | None = None,
) -> bool:
    """End an unfinished job: its final state, its images as assets, its slot given back, and
    its webhook queued when it has a replyUrl. The account whose slot was given back goes to
    `freed` (a job that ended waiting held none), for its queue to take it.

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
    account_id, waited = finished
    if account_id is not None and waited is None:
        release_slot(conn, account_id)
        if freed is not None:
            freed.append(account_id)
    webhook_queries.queue(conn, job.id, job.user_id, job.spec.reply_url, now)
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


def lock_account_jobs(conn: Connection, account_id: int) -> None:
    """Hold an account's unfinished jobs' rows, before its own row: a job that ends locks its
    row, then its account's (to give its slot back), and a transaction that took them in the
    other order would deadlock with it."""
    conn.execute(
        select(jobs.c.id)
        .where(jobs.c.account_id == account_id, FROM[Transition.CANCEL])
        .order_by(jobs.c.id)
        .with_for_update()
    )


def cancel_account_jobs(
    conn: Connection, account_id: int, error: str, details: str, now: int
) -> list[EndedJob]:
    """End every unfinished job of an account as failed (its slots go with the account) and
    queue their webhooks; the jobs, for the runners and waiters to be told."""
    condition = (jobs.c.account_id == account_id, FROM[Transition.CANCEL])
    return _fail_all(conn, condition, error, details, now)


def unfinished_jobs_of(conn: Connection, user_id: int) -> list[Job]:
    """The user's jobs that hold a slot (queued or running), oldest first."""
    query = (
        select(jobs).where(jobs.c.user_id == user_id, jobs.c.status == CREATED).order_by(jobs.c.id)
    )
    return [_job(row) for row in conn.execute(query).mappings()]


def expired_leases(conn: Connection, now: int) -> list[tuple[int, int, str]]:
    """(id, attempt, jobid) of the running jobs whose runner stopped renewing its lease."""
    query = select(jobs.c.id, jobs.c.attempts, jobs.c.jobid).where(
        jobs.c.status == CREATED, jobs.c.lease_until < now
    )
    return [(job_id, attempt, jobid) for job_id, attempt, jobid in conn.execute(query)]


def requeue_job(conn: Connection, job_id: int, attempt: int, now: int, lease_until: int) -> bool:
    """Take a job whose lease ran out (at `now`) back from the runner of `attempt` (or, never
    claimed, from its lost dispatch), so that a claim runs it again; leased anew until then.
    False when it was renewed or ended meanwhile."""
    result = conn.execute(
        update(jobs)
        .where(
            jobs.c.id == job_id,
            FROM[Transition.REQUEUE],
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
        .where(FROM[Transition.EXPIRE], jobs.c.finished_at < before)
        .order_by(jobs.c.finished_at)
        .limit(limit)
    ).all()
    if rows:
        conn.execute(delete(jobs).where(jobs.c.id.in_([job_id for job_id, _ in rows])))
    return len(rows), [image["uri"] for _, images in rows for image in images or ()]


# The user's jobs, newest first (GET /images): keyset pages over (created_at, id), each one an
# index range scan of ix_jobs_user_created, or of ix_jobs_user_status_created with a status.


@dataclass(frozen=True)
class Listing:
    """What a page of the user's jobs is filtered by, and where it starts: after the job at
    `after` (its created_at and id), exclusive; None for the newest."""

    user_id: int
    status: str | None = None
    model: str | None = None
    account: str | None = None
    since: int | None = None
    after: tuple[int, int] | None = None


def job_page(conn: Connection, listing: Listing, limit: int) -> list[tuple[Job, int | None]]:
    """Up to `limit` of the user's jobs matching `listing`, newest first (by created time, then
    id), each with where it stands in its account's queue while it waits for a slot."""
    found = [_job(row) for row in conn.execute(page_query(listing, limit)).mappings()]
    return [
        (job, queue_position(conn, job) if job.phase is Phase.WAITING else None) for job in found
    ]


def page_query(listing: Listing, limit: int) -> Select[Any]:
    """The SELECT of `job_page` (the tests and the benchmark EXPLAIN it)."""
    query = select(jobs).where(jobs.c.user_id == listing.user_id)
    if listing.status is not None:
        query = query.where(jobs.c.status == listing.status)
    if listing.model is not None:
        query = query.where(jobs.c.model == listing.model)
    if listing.account is not None:
        query = query.where(jobs.c.account == listing.account)
    if listing.since is not None:
        query = query.where(jobs.c.created_at >= listing.since)
    if listing.after is not None:
        created, job_id = listing.after
        # Not a row-value comparison: `created_at <= c` bounds the index range on both
        # databases, the rest drops the few jobs of that millisecond already listed.
        query = query.where(
            jobs.c.created_at <= created,
            or_(jobs.c.created_at < created, jobs.c.id < job_id),
        )
    return query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)


def job_by_id(conn: Connection, job_id: int) -> Job | None:
    row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
    return None if row is None else _job(row)


def fail_exhausted_jobs(
    conn: Connection, max_attempts: int, error: str, now: int
) -> list[EndedJob]:
    """Fail the unfinished jobs that were started `max_attempts` times already (queueing their
    webhooks); those jobs."""
    condition = (FROM[Transition.FAIL], jobs.c.attempts >= max_attempts)
    return _fail_all(conn, condition, error, None, now)


def _fail_all(
    conn: Connection, condition: tuple[Any, ...], error: str, details: str | None, now: int
) -> list[EndedJob]:
    """End every job matching `condition` as failed and queue their webhooks, as finish_job
    does for one; those jobs."""
    result = conn.execute(
        update(jobs)
        .where(*condition)
        .values(**_ended(Status.FAILED.value, error, details, now))
        .returning(
            jobs.c.id,
            jobs.c.jobid,
            jobs.c.user_id,
            jobs.c.account,
            jobs.c.model,
            jobs.c.spec,
            jobs.c.request,
        )
    )
    ended = []
    for job_id, jobid, user_id, account, model, spec, request in result.all():
        webhook_queries.queue(conn, job_id, user_id, _spec(spec, request).reply_url, now)
        ended.append(EndedJob(job_id, jobid, user_id, account, model))
    return ended


def release_unfinished_jobs(conn: Connection, lease_until: int) -> list[str]:
    """Put every unfinished job back in the queue, leased until a runner claims it; their
    jobids. Only for the process that holds the runner lock."""
    requeued = conn.execute(
        update(jobs)
        .where(FROM[Transition.REQUEUE])
        .values(started_at=None, lease_until=lease_until, progress=None)
        .returning(jobs.c.jobid)
    ).scalars()
    return sorted(requeued)


def queued_jobs(conn: Connection) -> list[int]:
    """The ids of the jobs no runner has, oldest first."""
    return list(conn.execute(select(jobs.c.id).where(_QUEUED).order_by(jobs.c.id)).scalars())


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
        spec=_spec(row["spec"], row["request"]),
        forecast_cost=row["forecast_cost"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        progress=row["progress"],
        error=row["error"],
        error_details=row["error_details"],
        images=tuple(StoredImage.from_json(image) for image in row["images"] or ()),
        attempts=row["attempts"],
        queue_deadline=row["queue_deadline"],
    )


def _spec(data: Mapping[str, Any], request: Mapping[str, Any]) -> Spec:
    """The job's spec; a job admitted before specs carried the prompt, replyUrl and replyRef
    (dreamserve 0.1.0) has them in its request only."""
    if "prompt" in data:
        return Spec.from_json(data)
    carried = {key: request.get(key) for key in ("prompt", "replyUrl", "replyRef")}
    return Spec.from_json({**data, **carried})


def queued_account(conn: Connection, job_id: int) -> str | None:
    """The account name of a job no runner has (the queue it is dispatched on), or None."""
    query = select(jobs.c.account).where(jobs.c.id == job_id, _QUEUED)
    account: str | None = conn.execute(query).scalar_one_or_none()
    return account


# The optional queue: jobs waiting for a slot of their account


def waiting_counts(conn: Connection, account_ids: Sequence[int]) -> dict[int, int]:
    """How many jobs wait in each of the accounts' queues (0 for none)."""
    rows = conn.execute(
        select(jobs.c.account_id, func.count())
        .where(jobs.c.account_id.in_(list(account_ids)), _WAITING)
        .group_by(jobs.c.account_id)
    )
    counts = dict.fromkeys(account_ids, 0)
    counts.update({account_id: count for account_id, count in rows})
    return counts


def promote_waiting(
    conn: Connection, account_id: int, now: int, lease_until: int
) -> list[tuple[int, str]]:
    """Give the account's free slots to its waiting jobs: the users with jobs waiting in turn
    after the last one served (round robin by user id), each user's oldest job first. Each
    promoted job holds its slot and is leased until a runner claims it, as an admitted one;
    their (id, jobid), for the caller to dispatch once this commits."""
    account_queries.lock_account(conn, account_id)  # one promotion at a time per account
    promoted: list[tuple[int, str]] = []
    while True:
        account = conn.execute(
            select(accounts.c.running, accounts.c.max_jobs, accounts.c.queue_cursor).where(
                accounts.c.id == account_id, accounts.c.error.is_(None)
            )
        ).first()
        if account is None or account.running >= account.max_jobs:
            return promoted
        heads = conn.execute(
            select(jobs.c.user_id, func.min(jobs.c.id))
            .where(jobs.c.account_id == account_id, _WAITING)
            .group_by(jobs.c.user_id)
            .order_by(jobs.c.user_id)
        ).all()
        if not heads:
            return promoted
        cursor = account.queue_cursor
        later = [head for head in heads if cursor is None or head[0] > cursor]
        user_id, job_id = (later or heads)[0]
        conn.execute(
            update(accounts)
            .where(accounts.c.id == account_id)
            .values(running=accounts.c.running + 1, queue_cursor=user_id)
        )
        jobid = conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, _WAITING)
            .values(queue_deadline=None, lease_until=lease_until, updated_at=now)
            .returning(jobs.c.jobid)
        ).scalar_one()
        promoted.append((job_id, jobid))


def account_id_of(conn: Connection, job_id: int) -> int | None:
    found: int | None = conn.execute(
        select(jobs.c.account_id).where(jobs.c.id == job_id)
    ).scalar_one_or_none()
    return found


def end_waiting(conn: Connection, job: Job, error: str, now: int) -> bool:
    """End a job that still waits for a slot as failed (it holds none to give back), its
    webhook queued; False when it took a slot or ended meanwhile."""
    ended = conn.execute(
        update(jobs)
        .where(jobs.c.id == job.id, _WAITING)
        .values(**_ended(Status.FAILED.value, error, None, now))
        .returning(jobs.c.id)
    ).first()
    if ended is None:
        return False
    webhook_queries.queue(conn, job.id, job.user_id, job.spec.reply_url, now)
    return True


def accounts_to_promote(conn: Connection) -> list[int]:
    """The accounts with a free slot and a job waiting for one (a slot freed while a job was
    being admitted to the queue, or a cap raised): for the reaper to promote."""
    waiting = select(jobs.c.id).where(jobs.c.account_id == accounts.c.id, _WAITING).exists()
    query = select(accounts.c.id).where(
        accounts.c.running < accounts.c.max_jobs, accounts.c.error.is_(None), waiting
    )
    return list(conn.execute(query).scalars())


def overdue_waits(conn: Connection, now: int) -> list[tuple[int, str, int]]:
    """The waiting jobs whose `queueSeconds` ran out: (id, jobid, queueSeconds)."""
    query = select(jobs.c.id, jobs.c.jobid, jobs.c.request).where(
        _WAITING, jobs.c.queue_deadline < now
    )
    return [
        (job_id, jobid, int(request.get("queueSeconds") or 0))
        for job_id, jobid, request in conn.execute(query)
    ]


def queue_position(conn: Connection, job: Job) -> int | None:
    """Where a waiting job stands in its account's queue (1: it takes the next slot), the
    users served in turn from the one after the last served; None when it does not wait."""
    account_id = conn.execute(
        select(jobs.c.account_id).where(jobs.c.id == job.id, _WAITING)
    ).scalar_one_or_none()
    if account_id is None:  # not waiting (any more), or its account is gone
        return None
    cursor = conn.execute(
        select(accounts.c.queue_cursor).where(accounts.c.id == account_id)
    ).scalar_one_or_none()
    per_user: dict[int, int] = {
        user_id: count
        for user_id, count in conn.execute(
            select(jobs.c.user_id, func.count())
            .where(jobs.c.account_id == account_id, _WAITING)
            .group_by(jobs.c.user_id)
        )
    }
    ahead_of_mine = conn.execute(
        select(func.count()).where(
            jobs.c.account_id == account_id,
            jobs.c.user_id == job.user_id,
            _WAITING,
            jobs.c.id < job.id,
        )
    ).scalar_one()
    # Round r serves each user's r-th waiting job, users in turn after the cursor: before this
    # job (its user's job number `ahead_of_mine`) come every user's first `ahead_of_mine` jobs
    # and, in its round, the users served before its user.
    users = sorted(per_user)
    start = next((i for i, user in enumerate(users) if cursor is None or user > cursor), 0)
    turn = users[start:] + users[:start]
    before = sum(min(count, ahead_of_mine) for count in per_user.values())
    before += len(
        [user for user in turn[: turn.index(job.user_id)] if per_user[user] > ahead_of_mine]
    )
    return int(before) + 1
