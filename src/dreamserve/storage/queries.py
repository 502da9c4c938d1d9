"""Every SQL statement the server runs, as functions over a connection the caller holds.

Callers decide the transaction (`Database.write()` / `read()`), so several statements can commit
together: a slot taken with the job inserted, a job finished with its slot released.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from dreamserve.ids import AssetRef
from dreamserve.jobs import Job, Spec, Status, StoredImage
from dreamserve.storage.tables import SHARED, accounts, assets, jobs, tokens, users


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    owner: int
    engine: str
    settings: Mapping[str, Any]
    models: tuple[str, ...] | None
    max_jobs: int
    running: int
    error: str | None
    updated_at: int

    @property
    def is_shared(self) -> bool:
        return self.owner == SHARED

    def cap(self, requested: int | None) -> int:
        """The slot cap of one admission: a request's `maxJobs` replaces the account's, except
        that on a shared account it can only lower it."""
        if requested is None:
            return self.max_jobs
        return min(requested, self.max_jobs) if self.is_shared else requested


# Users and tokens


async def count_users(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.count()).select_from(users))).scalar_one())


async def user_exists(conn: AsyncConnection, user_id: int) -> bool:
    found = await conn.execute(select(users.c.id).where(users.c.id == user_id))
    return found.first() is not None


async def insert_user(conn: AsyncConnection, now: int, user_id: int | None = None) -> int:
    values: dict[str, Any] = {"created_at": now}
    if user_id is not None:
        values["id"] = user_id
    result = await conn.execute(insert(users).values(values).returning(users.c.id))
    return int(result.scalar_one())


async def insert_token(conn: AsyncConnection, user_id: int, token_hash: str, now: int) -> None:
    await conn.execute(
        insert(tokens).values(user_id=user_id, token_hash=token_hash, created_at=now)
    )


async def user_of_token(conn: AsyncConnection, token_hash: str) -> int | None:
    query = select(tokens.c.user_id).where(tokens.c.token_hash == token_hash)
    return (await conn.execute(query)).scalar_one_or_none()


# Accounts and slots


async def insert_account(
    conn: AsyncConnection,
    *,
    name: str,
    owner: int,
    email: str,
    region: str,
    engine: str,
    max_jobs: int,
    now: int,
    settings: Mapping[str, Any] | None = None,
    models: Sequence[str] | None = None,
) -> int:
    result = await conn.execute(
        insert(accounts)
        .values(
            name=name,
            owner=owner,
            email=email,
            region=region,
            engine=engine,
            settings=dict(settings or {}),
            models=None if models is None else list(models),
            max_jobs=max_jobs,
            running=0,
            created_at=now,
            updated_at=now,
        )
        .returning(accounts.c.id)
    )
    return int(result.scalar_one())


async def usable_accounts(
    conn: AsyncConnection, user_id: int, name: str | None = None
) -> list[Account]:
    """The user's own accounts and the shared ones, or only those called `name`."""
    query = select(accounts).where(accounts.c.owner.in_((SHARED, user_id)))
    if name is not None:
        query = query.where(accounts.c.name == name)
    return [_account(row) for row in (await conn.execute(query)).mappings()]


async def take_slot(conn: AsyncConnection, account_id: int, cap: int) -> bool:
    """Take one slot if fewer than `cap` are taken: one atomic statement, safe under races."""
    result = await conn.execute(
        update(accounts)
        .where(accounts.c.id == account_id, accounts.c.running < cap)
        .values(running=accounts.c.running + 1)
    )
    return result.rowcount == 1


async def recount_slots(conn: AsyncConnection) -> None:
    """Set every account's taken slots to the number of its unfinished jobs."""
    unfinished = (
        select(func.count())
        .select_from(jobs)
        .where(jobs.c.account_id == accounts.c.id, jobs.c.status == Status.CREATED.value)
        .scalar_subquery()
    )
    await conn.execute(update(accounts).values(running=unfinished))


async def slots_taken(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(select(accounts.c.name, accounts.c.running))
    return {name: running for name, running in rows}


# Jobs


async def insert_job(conn: AsyncConnection, job: Job, *, account_id: int) -> int:
    """Insert a new job (its `id` is ignored); the id the database gave it."""
    result = await conn.execute(
        insert(jobs)
        .values(
            jobid=job.jobid,
            type=job.type,
            status=job.status.value,
            user_id=job.user_id,
            account_id=account_id,
            account=job.account,
            model=job.model,
            request=dict(job.request),
            spec=job.spec.to_json(),
            forecast_cost=job.forecast_cost,
            attempts=0,
            created_at=job.created_at,
        )
        .returning(jobs.c.id)
    )
    return int(result.scalar_one())


async def job_by_jobid(conn: AsyncConnection, jobid: str, user_id: int) -> Job | None:
    query = select(jobs).where(jobs.c.jobid == jobid, jobs.c.user_id == user_id)
    row = (await conn.execute(query)).mappings().first()
    return None if row is None else _job(row)


async def claim_job(conn: AsyncConnection, job_id: int, now: int) -> tuple[Job, int] | None:
    """Mark an unfinished job started (one more attempt); its row and its account id, or None
    when it is already finished."""
    result = await conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status == Status.CREATED.value)
        .values(started_at=now, updated_at=now, progress=0, attempts=jobs.c.attempts + 1)
        .returning(*jobs.c)
    )
    row = result.mappings().first()
    return None if row is None else (_job(row), row["account_id"])


async def account_by_id(conn: AsyncConnection, account_id: int) -> Account | None:
    row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).mappings()
    first = row.first()
    return None if first is None else _account(first)


async def set_progress(conn: AsyncConnection, job_id: int, progress: int, now: int) -> None:
    await conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.status == Status.CREATED.value)
        .values(progress=progress, updated_at=now)
    )


async def finish_job(
    conn: AsyncConnection,
    job: Job,
    account_id: int | None,
    *,
    status: Status,
    now: int,
    images: Sequence[StoredImage] = (),
    description: str | None = None,
    error: str | None = None,
    error_details: str | None = None,
) -> bool:
    """End an unfinished job: its final state, its images as assets, its slot given back.

    Only the first call for a job does anything (the update is conditional on the job being
    unfinished), so a slot is released exactly once whatever path ends the job.
    """
    result = await conn.execute(
        update(jobs)
        .where(jobs.c.id == job.id, jobs.c.status == Status.CREATED.value)
        .values(
            status=status.value,
            images=[image.to_json() for image in images] if images else None,
            error=error,
            error_details=error_details,
            progress=None,
            updated_at=now,
            finished_at=now,
        )
    )
    if result.rowcount != 1:
        return False
    if account_id is not None:
        await conn.execute(
            update(accounts)
            .where(accounts.c.id == account_id, accounts.c.running > 0)
            .values(running=accounts.c.running - 1)
        )
    if images:
        await conn.execute(
            insert(assets),
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


async def fail_exhausted_jobs(
    conn: AsyncConnection, max_attempts: int, error: str, now: int
) -> list[str]:
    """Fail the unfinished jobs that were started `max_attempts` times already; their jobids."""
    result = await conn.execute(
        update(jobs)
        .where(jobs.c.status == Status.CREATED.value, jobs.c.attempts >= max_attempts)
        .values(status=Status.FAILED.value, error=error, updated_at=now, finished_at=now)
        .returning(jobs.c.jobid)
    )
    return list(result.scalars())


async def unfinished_job_ids(conn: AsyncConnection) -> list[int]:
    query = select(jobs.c.id).where(jobs.c.status == Status.CREATED.value).order_by(jobs.c.id)
    return list((await conn.execute(query)).scalars())


# Assets


async def existing_assets(
    conn: AsyncConnection, user_id: int, refs: Iterable[AssetRef]
) -> set[AssetRef]:
    """Those of `refs` that name an image of this user, with exactly those properties."""
    wanted = set(refs)
    if not wanted:
        return set()
    query = select(
        assets.c.account, assets.c.width, assets.c.height, assets.c.size, assets.c.uri
    ).where(
        assets.c.user_id == user_id,
        assets.c.uri.in_({ref.uri for ref in wanted}),
    )
    found = {AssetRef(*row) for row in await conn.execute(query)}
    return wanted & found


def _account(row: RowMapping) -> Account:
    return Account(
        id=row["id"],
        name=row["name"],
        owner=row["owner"],
        engine=row["engine"],
        settings=row["settings"] or {},
        models=None if row["models"] is None else tuple(row["models"]),
        max_jobs=row["max_jobs"],
        running=row["running"],
        error=row["error"],
        updated_at=row["updated_at"],
    )


def _job(row: RowMapping) -> Job:
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
    )
