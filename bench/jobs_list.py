"""GET /images at a million jobs: a page of a user's jobs, with the listing's indexes and
without them (the baseline), in one run (issue 18, item 6).

A fresh database (SQLite in a temp dir, or a fresh PostgreSQL database) migrated by the
server, one real job rendered through the service for a template row, then 1,000,000 copies of
it inserted in bulk (SQLite: executemany in chunks; PostgreSQL: INSERT ... SELECT over
generate_series): 1,000 users, one of them (user 2) with 100,000 jobs, the 900,000 others
spread over the other 999; created times one millisecond apart with every user's jobs
interleaved, 91 % completed (each with the template's one image), 9 % failed; one job in a
thousand of model seedream-3.0 (the rest nano-banana), all of them the heavy user's (1 % of its
jobs).

Each case calls the service as the route does (`service.records.page(user, query)`, in
process: the query, the records built, their image links signed; no HTTP), `--repeat` times,
and prints the median. First without the two listing indexes (dropped before the bulk insert),
then with them (created after it, then ANALYZE), so both figures come from the same data:

  first page            the heavy user's newest 20
  deep page (90 % in)   the heavy user's 20 after its 90,000th newest (a cursor from there)
  status=failed         the heavy user's newest 20 failed jobs (the status index)
  model=seedream-3.0    the heavy user's newest 20 of a model of 1 % of its jobs (no index
                        of its own: the user's index is walked and the rows filtered)
  light user            a user with about 900 jobs, first page

    .venv/bin/python bench/jobs_list.py [--postgres URL] [--jobs 1000000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Connection, select, text

from dreamserve.app import Server, create_app
from dreamserve.service.records import cursor_of
from dreamserve.settings import Settings
from dreamserve.storage import job_queries
from dreamserve.storage.tables import jobs

USERS = 1_000
HEAVY = 2
HEAVY_EVERY = 10  # every tenth job is the heavy user's: 100,000 of a million
CHUNK = 50_000
INDEXES = {
    "ix_jobs_user_created": "user_id, created_at, id",
    "ix_jobs_user_status_created": "user_id, status, created_at, id",
}
COLUMNS = [
    "jobid",
    "user_id",
    "account_id",
    "account",
    "type",
    "status",
    "model",
    "request",
    "spec",
    "forecast_cost",
    "images",
    "attempts",
    "error",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
]


def owner(n: int) -> int:
    """The user of job n: every tenth job the heavy user's, the rest round robin over the
    other 999."""
    if n % HEAVY_EVERY == 0:
        return HEAVY
    user = 1 + n % (USERS - 1)
    return user + 1 if user >= HEAVY else user


async def make_template(server: Server) -> dict[str, Any]:
    """One job rendered for real: its row, for the copies."""
    service = server.service
    await service.tokens.bootstrap()
    fields = {"prompt": "a bench picture", "model": "nano-banana", "ratio": "1:1", "count": 1}
    submitted = await service.submissions.image(1, fields, None)
    done = await service.records.get(1, submitted["jobid"], 60)
    assert done["status"] == "completed", done

    def row(conn: Connection) -> dict[str, Any]:
        found = conn.execute(select(jobs).where(jobs.c.jobid == done["jobid"])).mappings()
        return dict(found.one())

    return await server.db.read(row)


async def fill(server: Server, template: dict[str, Any], total: int, postgres: bool) -> None:
    """The users and `total` jobs, inserted in bulk."""

    def users(conn: Connection) -> None:
        conn.execute(
            text("INSERT INTO users (id, created_at) VALUES (:id, 0)"),
            [{"id": user} for user in range(2, USERS + 1)],
        )

    await server.db.write(users)
    base = int(template["created_at"]) - total
    for start in range(0, total, CHUNK):
        end = min(start + CHUNK, total)
        if postgres:
            await server.db.write(
                lambda conn, start=start, end=end: _fill_postgres(conn, template, start, end, base)
            )
            continue
        rows = [_row(template, n, base) for n in range(start, end)]
        await server.db.write(lambda conn, rows=rows: _executemany(conn, rows))


def _row(template: dict[str, Any], n: int, base: int) -> tuple[Any, ...]:
    failed = n % 100 < 9
    model = "seedream-3.0" if n % 1000 == 10 else "nano-banana"
    at = base + n
    return (
        f"bench-{n}",
        owner(n),
        template["account_id"],
        template["account"],
        "image",
        "failed" if failed else "completed",
        model,
        json.dumps(template["request"]),
        json.dumps(template["spec"]),
        template["forecast_cost"],
        None if failed else json.dumps(template["images"]),
        1,
        "The engine gave up" if failed else None,
        at,
        at + 500,
        at + 1,
        at + 500,
    )


def _executemany(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    marks = ", ".join("?" for _ in COLUMNS)
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    cursor.executemany(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({marks})", rows)


def _fill_postgres(
    conn: Connection, template: dict[str, Any], start: int, end: int, base: int
) -> None:
    conn.execute(
        text(
            """
            INSERT INTO jobs (jobid, user_id, account_id, account, type, status, model, request,
                spec, forecast_cost, images, attempts, error, created_at, updated_at, started_at,
                finished_at)
            SELECT 'bench-' || n,
                CASE WHEN n % :every = 0 THEN :heavy
                     WHEN 1 + n % (:users - 1) >= :heavy THEN 2 + n % (:users - 1)
                     ELSE 1 + n % (:users - 1) END,
                t.account_id, t.account, 'image',
                CASE WHEN n % 100 < 9 THEN 'failed' ELSE 'completed' END,
                CASE WHEN n % 1000 = 10 THEN 'seedream-3.0' ELSE 'nano-banana' END,
                t.request, t.spec, t.forecast_cost,
                CASE WHEN n % 100 < 9 THEN NULL ELSE t.images END,
                1, CASE WHEN n % 100 < 9 THEN 'The engine gave up' END,
                :base + n, :base + n + 500, :base + n + 1, :base + n + 500
            FROM generate_series(:start, :end - 1) AS n, jobs AS t WHERE t.id = :template
            """
        ),
        {
            "every": HEAVY_EVERY,
            "heavy": HEAVY,
            "users": USERS,
            "base": base,
            "start": start,
            "end": end,
            "template": template["id"],
        },
    )


async def indexes(server: Server, create: bool) -> None:
    def change(conn: Connection) -> None:
        for name, columns in INDEXES.items():
            if create:
                conn.execute(text(f"CREATE INDEX {name} ON jobs ({columns})"))
            else:
                conn.execute(text(f"DROP INDEX {name}"))
        conn.execute(text("ANALYZE"))

    await server.db.write(change)


async def median_ms(call: Callable[[], Awaitable[Any]], repeat: int) -> float:
    await call()  # warm: the pages of the database file or the buffer cache
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def deep_cursor(server: Server, depth: int) -> str:
    def find(conn: Connection) -> str:
        listing = job_queries.Listing(HEAVY)
        query = job_queries.page_query(listing, 1).offset(depth - 1)  # setup only
        row = conn.execute(query).mappings().one()
        return cursor_of(job_queries._job(row))

    return await server.db.read(find)


async def cases(server: Server, repeat: int, deep: str) -> dict[str, float]:
    page = server.service.records.page
    asked: dict[str, tuple[int, dict[str, str]]] = {
        "first page": (HEAVY, {}),
        "deep page (90 % in)": (HEAVY, {"cursor": deep}),
        "status=failed": (HEAVY, {"status": "failed"}),
        "model=seedream-3.0": (HEAVY, {"model": "seedream-3.0"}),
        "light user": (7, {}),
    }
    figures = {}
    for name, (user, query) in asked.items():
        reply = await page(user, query)
        assert reply["jobs"], name
        figures[name] = await median_ms(lambda u=user, q=query: page(u, q), repeat)
    return figures


async def run(arguments: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        database = None
        admin = None
        if arguments.postgres:
            admin = psycopg.connect(arguments.postgres, autocommit=True)
            name = f"dreamserve_bench_{uuid.uuid4().hex[:8]}"
            admin.execute(f'CREATE DATABASE "{name}"')
            database = arguments.postgres.rsplit("/", 1)[0] + f"/{name}"
        try:
            # A longer statement timeout: building an index over a million rows may take more
            # than the default 30 s on a slow disk.
            settings = Settings(
                data_dir=Path(folder), database_url=database, database_statement_seconds=600
            )
            app = create_app(settings)
            async with app.router.lifespan_context(app):
                server: Server = app.state.server
                kind = "PostgreSQL" if database else "SQLite"
                template = await make_template(server)
                await indexes(server, create=False)
                started = time.perf_counter()
                await fill(server, template, arguments.jobs, database is not None)
                filled = time.perf_counter() - started
                print(f"{kind}: {arguments.jobs:,} jobs inserted in {filled:.1f} s")
                deep = await deep_cursor(server, arguments.jobs // HEAVY_EVERY * 9 // 10)
                without = await cases(server, max(arguments.repeat // 4, 3), deep)
                started = time.perf_counter()
                await indexes(server, create=True)
                print(f"indexes built in {time.perf_counter() - started:.1f} s")
                with_index = await cases(server, arguments.repeat, deep)
            print(f"\n{kind}, median ms per page of 20")
            print(f"{'case':<24}{'indexed':>10}{'no index':>12}{'ratio':>8}")
            for case, indexed in with_index.items():
                slow = without[case]
                print(f"{case:<24}{indexed:>10.2f}{slow:>12.1f}{slow / indexed:>8.0f}x")
        finally:
            if admin is not None:
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a PostgreSQL server URL (else SQLite)")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
