"""GET /images: the user's own jobs, newest first (by created time, then id), keyset pages
(`limit`, `cursor`), filtered by status, model, account and time (`since`); each record as GET
/images/<jobid> returns it. The query is a range scan of an index, checked with EXPLAIN."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, text
from support import SMALL, FailingEngine, FakeClock, GatedEngine, Harness, open_harness

from dreamserve.engines.registry import BUILTIN
from dreamserve.errors import JobFailed
from dreamserve.ids import iso_millis
from dreamserve.jobs import millis
from dreamserve.reaper import Reaper, ReaperConfig
from dreamserve.settings import Settings
from dreamserve.storage import job_queries

pytestmark = pytest.mark.anyio

BROKEN = "LOCAL:broken"
GOOD = {**SMALL, "account": "LOCAL:procedural"}  # not LOCAL:broken
OTHER_MODEL = {**GOOD, "model": "seedream-3.0", "resolution": "1k"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def jobs(settings: Settings, clock: FakeClock) -> AsyncIterator[Harness]:
    """A harness on a clock the test moves, with a shared account LOCAL:broken whose engine
    fails every job."""
    failing = FailingEngine(JobFailed("The engine gave up", "out of ideas"))
    engines = {**BUILTIN, "failing": failing.factory}
    async with open_harness(settings, clock=clock, engines=engines) as harness:
        await harness.service.accounts.put(
            None, {"account": BROKEN, "engine": "failing", "maxJobs": 10}
        )
        yield harness


async def listing(harness: Harness, token: str | None = None, **params: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or harness.token}"}
    return await harness.client.get("/v1/dreamina/images", params=params, headers=headers)


async def page(harness: Harness, token: str | None = None, **params: Any) -> dict[str, Any]:
    reply = await listing(harness, token, **params)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


async def jobids(harness: Harness, token: str | None = None, **params: Any) -> list[str]:
    return [job["jobid"] for job in (await page(harness, token, **params))["jobs"]]


async def submit(harness: Harness, body: dict[str, Any], token: str | None = None) -> str:
    reply = await harness.post(body, token)
    assert reply.status_code == 200, reply.text
    jobid = str(reply.json()["jobid"])
    await finished(harness, jobid, token)
    return jobid


async def finished(harness: Harness, jobid: str, token: str | None = None) -> dict[str, Any]:
    for _ in range(1200):
        record = (await harness.get(jobid, token)).json()
        if record["status"] != "created":
            return dict(record)
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {jobid} did not end")


@pytest.mark.both_databases
async def test_45_jobs_page_by_20_newest_first_without_gaps_or_repeats(
    jobs: Harness, clock: FakeClock
) -> None:
    made: list[str] = []
    for batch in range(5):  # 9 at a time: within the account's 10 slots
        posted = []
        for n in range(9):
            reply = await jobs.post({**GOOD, "prompt": f"job {batch * 9 + n}"})
            posted.append(reply.json()["jobid"])
            if len(made) + len(posted) in range(3, 46, 3):
                clock.advance(0.001)  # three jobs in each millisecond
        for jobid in posted:
            await finished(jobs, jobid)
        made += posted
    newest_first = made[::-1]
    first = await page(jobs, limit=20)
    second = await page(jobs, limit=20, cursor=first["next"])
    third = await page(jobs, limit=20, cursor=second["next"])
    pages = [first, second, third]
    assert [len(p["jobs"]) for p in pages] == [20, 20, 5]
    assert third["next"] is None
    assert [job["jobid"] for p in pages for job in p["jobs"]] == newest_first
    # Jobs 18-20 (from the newest) share a millisecond: the page boundary splits them.
    created = [job["created"] for p in pages for job in p["jobs"]]
    assert created[18] == created[19] == created[20]
    assert created == sorted(created, reverse=True)
    # The default limit is 20; exactly 45 jobs end a page of 45 with no next.
    assert len((await page(jobs))["jobs"]) == 20
    assert (await page(jobs, limit=45))["next"] is None
    assert len((await page(jobs, limit=44))["jobs"]) == 44


@pytest.mark.both_databases
async def test_each_record_is_what_get_returns_and_upscales_are_listed(jobs: Harness) -> None:
    source = await submit(jobs, GOOD)
    reply = await jobs.call("POST", "/images/upscale", {"jobid": source, "upscaleResolution": "2k"})
    assert reply.status_code == 200, reply.text
    upscaled = reply.json()["jobid"]
    await finished(jobs, upscaled)
    window = -1
    while window != jobs.server.blobs.link_expiry():  # links of one expiry window
        window = jobs.server.blobs.link_expiry()
        records = [(await jobs.get(jobid)).json() for jobid in (upscaled, source)]
        listed = (await page(jobs))["jobs"]
    assert listed == records
    assert [job["type"] for job in listed] == ["upscale", "image"]
    assert listed[1]["response"]["images"][0]["imageUrl"].startswith("http://testserver/")


@pytest.mark.both_databases
async def test_each_filter_and_filters_with_a_cursor(jobs: Harness, clock: FakeClock) -> None:
    start = clock()
    done = await submit(jobs, GOOD)
    clock.advance(1)
    failed = await submit(jobs, {**GOOD, "account": BROKEN})
    clock.advance(1)
    since = clock()
    other = await submit(jobs, OTHER_MODEL)
    clock.advance(1)
    broken_other = await submit(jobs, {**OTHER_MODEL, "account": BROKEN})
    assert await jobids(jobs) == [broken_other, other, failed, done]
    assert await jobids(jobs, status="completed") == [other, done]
    assert await jobids(jobs, status="failed") == [broken_other, failed]
    assert await jobids(jobs, status="created") == []
    assert await jobids(jobs, model="seedream-3.0") == [broken_other, other]
    assert await jobids(jobs, model="seedream-4.0") == []
    assert await jobids(jobs, account=BROKEN) == [broken_other, failed]
    assert await jobids(jobs, account="LOCAL:nowhere") == []
    assert await jobids(jobs, since=iso_millis(millis(since))) == [broken_other, other]
    assert await jobids(jobs, since=since.isoformat()) == [broken_other, other]  # +00:00
    assert await jobids(jobs, since=iso_millis(millis(since) + 1)) == [broken_other]
    assert await jobids(jobs, since=iso_millis(millis(start))) == [
        broken_other,
        other,
        failed,
        done,
    ]
    both = {"status": "failed", "model": "nano-banana", "account": BROKEN}
    assert await jobids(jobs, **both) == [failed]
    # A filtered listing, a page at a time: the cursor goes with the same filters.
    first = await page(jobs, status="failed", limit=1)
    assert [job["jobid"] for job in first["jobs"]] == [broken_other]
    second = await page(jobs, status="failed", limit=1, cursor=first["next"])
    assert ([job["jobid"] for job in second["jobs"]], second["next"]) == ([failed], None)
    # Other filters with that cursor: that listing from the same position.
    assert await jobids(jobs, status="completed", cursor=first["next"]) == [other, done]


@pytest.mark.both_databases
async def test_another_users_jobs_never_show_even_with_their_cursor(jobs: Harness) -> None:
    mine = [await submit(jobs, GOOD) for _ in range(2)]
    theirs_token = await jobs.new_user()
    theirs = [await submit(jobs, GOOD, theirs_token) for _ in range(3)]
    assert await jobids(jobs) == mine[::-1]
    assert await jobids(jobs, theirs_token) == theirs[::-1]
    their_page = await page(jobs, theirs_token, limit=1)
    # Their cursor holds a position only: this user gets this user's jobs from there on.
    assert await jobids(jobs, cursor=their_page["next"]) == mine[::-1]
    assert await jobids(jobs, theirs_token, cursor=their_page["next"]) == theirs[1::-1]
    fresh = await jobs.new_user()
    assert await page(jobs, fresh) == {"jobs": [], "next": None}


async def test_a_job_deleted_by_retention_is_not_listed(jobs: Harness, clock: FakeClock) -> None:
    old = await submit(jobs, GOOD)
    clock.advance(2 * 86_400)
    kept = await submit(jobs, GOOD)
    assert await jobids(jobs) == [kept, old]
    clock.advance(29 * 86_400)  # `old` finished 31 days ago
    server = jobs.server
    await Reaper(server.store, server.blobs, server.dispatcher, clock, ReaperConfig(1.0)).sweep()
    assert await jobids(jobs) == [kept]


@pytest.mark.both_databases
async def test_a_job_waiting_for_a_slot_is_listed_with_its_queue_position(
    settings: Settings,
) -> None:
    gated = GatedEngine()
    engines = {**BUILTIN, "procedural": gated.factory}
    async with open_harness(settings, engines=engines) as harness:
        try:
            one = {"account": "LOCAL:one", "engine": "procedural", "maxJobs": 1}
            await harness.service.accounts.put(None, one)
            body = {**SMALL, "account": "LOCAL:one"}
            running = (await harness.post(body)).json()["jobid"]
            waiting = (await harness.post({**body, "queueSeconds": 600})).json()["jobid"]
            listed = (await page(harness))["jobs"]
            assert [job["jobid"] for job in listed] == [waiting, running]
            assert (listed[0]["status"], listed[0]["queuePosition"]) == ("created", 1)
            assert "queuePosition" not in listed[1]
            assert listed[0] == (await harness.get(waiting)).json()
            assert await jobids(harness, status="created") == [waiting, running]
        finally:
            gated.gate.set()


async def test_without_a_token_it_is_401(jobs: Harness) -> None:
    reply = await jobs.client.get("/v1/dreamina/images")
    assert (reply.status_code, reply.json()) == (401, {"error": "Unauthorized"})
    reply = await listing(jobs, "user:1-wrongwrongwrongwrongwrong")
    assert (reply.status_code, reply.json()) == (401, {"error": "Unauthorized"})


MODELS = (
    "seedream-5.0-lite, seedream-4.7, seedream-4.6, seedream-4.5, seedream-4.1, seedream-4.0, "
    "nano-banana, seedream-3.0, gpt-image-2"
)
SINCE = "an ISO 8601 time with its zone, e.g. 2026-03-02T14:05:30.123Z"
CURSOR = "a cursor from a previous reply"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "0"}, "Parameter limit (0) valid values: integer 1-100"),
        ({"limit": "101"}, "Parameter limit (101) valid values: integer 1-100"),
        ({"limit": "ten"}, "Parameter limit (ten) valid values: integer 1-100"),
        ({"limit": "2.5"}, "Parameter limit (2.5) valid values: integer 1-100"),
        (
            {"status": "running"},
            "Parameter status (running) valid values: created, completed, failed",
        ),
        ({"model": "dall-e"}, f"Parameter model (dall-e) valid values: {MODELS}"),
        ({"since": "yesterday"}, f"Parameter since (yesterday) valid values: {SINCE}"),
        (  # no zone: which time it is depends on where the client is
            {"since": "2026-03-02T14:05:30"},
            f"Parameter since (2026-03-02T14:05:30) valid values: {SINCE}",
        ),
        ({"since": "1772460330123"}, f"Parameter since (1772460330123) valid values: {SINCE}"),
        ({"cursor": "nope"}, f"Parameter cursor (nope) valid values: {CURSOR}"),
        ({"cursor": "MTc5Ng"}, f"Parameter cursor (MTc5Ng) valid values: {CURSOR}"),  # "1796"
        # "1.99999999999": an id no job can have (PostgreSQL's integer is 32 bits)
        (
            {"cursor": "MS45OTk5OTk5OTk5OQ"},
            f"Parameter cursor (MS45OTk5OTk5OTk5OQ) valid values: {CURSOR}",
        ),
        ({"cursor": "MS4y="}, f"Parameter cursor (MS4y=) valid values: {CURSOR}"),  # padded
        ({"cursor": "LTEuMg"}, f"Parameter cursor (LTEuMg) valid values: {CURSOR}"),  # "-1.2"
        (
            {"account": "x" * 256},
            f"Parameter account ({'x' * 99}…) valid values: text of at most 255 characters",
        ),
    ],
)
async def test_bad_parameters_are_400(
    harness: Harness, params: dict[str, str], message: str
) -> None:
    reply = await listing(harness, **params)
    assert (reply.status_code, reply.json()) == (400, {"error": message})


async def test_a_cursor_of_a_reply_is_accepted_and_a_made_up_one_is_not(harness: Harness) -> None:
    for _ in range(2):
        await submit(harness, SMALL)
    cursor = (await page(harness, limit=1))["next"]
    assert len((await page(harness, cursor=cursor))["jobs"]) == 1
    reply = await listing(harness, cursor=cursor + "A")
    assert reply.status_code == 400


async def test_empty_parameters_are_the_same_as_none(harness: Harness) -> None:
    made = [await submit(harness, SMALL) for _ in range(2)]
    empty = dict.fromkeys(["status", "model", "account", "since", "limit", "cursor"], "")
    assert await page(harness, **empty) == await page(harness)
    assert await jobids(harness, **empty) == made[::-1]


# The plan: an index range scan in the listing's order, no full scan, no sort.

LISTINGS = [
    job_queries.Listing(1),
    job_queries.Listing(1, status="completed"),
    job_queries.Listing(1, after=(1_800_000_000_000, 5)),
    job_queries.Listing(1, status="failed", since=1_700_000_000_000, after=(1_800_000_000_000, 5)),
    job_queries.Listing(1, model="nano-banana", account="LOCAL:procedural"),
]


@pytest.mark.both_databases
@pytest.mark.parametrize("listing_", LISTINGS)
async def test_the_listing_is_an_index_range_scan_without_a_sort(
    harness: Harness, listing_: job_queries.Listing
) -> None:
    query = job_queries.page_query(listing_, 21)
    index = "ix_jobs_user_status_created" if listing_.status else "ix_jobs_user_created"

    def plan(conn: Connection) -> tuple[str, str]:
        compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
        if conn.dialect.name == "sqlite":
            rows = conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")).all()
            return "sqlite", "\n".join(str(row[-1]) for row in rows)
        # An empty table costs nothing to read whole: the planner is told a full read and a
        # sort cost too much, so that only an index in the right order avoids them.
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            conn.execute(text(f"SET LOCAL {setting} = off"))
        rows = conn.execute(text(f"EXPLAIN {compiled}")).all()
        return "postgresql", "\n".join(str(row[0]) for row in rows)

    dialect, explained = await harness.server.db.read(plan)
    if dialect == "sqlite":
        assert f"SEARCH jobs USING INDEX {index} (user_id=?" in explained, explained
        assert "TEMP B-TREE" not in explained, explained  # no sort step
        assert "SCAN" not in explained, explained
    else:
        assert f"Index Scan Backward using {index} on jobs" in explained, explained
        assert "Sort" not in explained, explained
        assert "Seq Scan" not in explained, explained
