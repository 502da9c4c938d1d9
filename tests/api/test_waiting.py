"""Waiting without polling: GET /images/<jobid>?wait= and the job's event stream.

Each test counts the database reads the wait makes: a waiter reads the job when it starts, on
each notified change and at its deadline, never in a loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from support import (
    SMALL,
    GatedEngine,
    Harness,
    eventually,
    open_harness,
    tap_event_streams,
    wait_started,
)

from dreamserve.engines.registry import BUILTIN
from dreamserve.settings import Settings
from dreamserve.storage import webhook_queries
from dreamserve.storage.tables import jobs

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gated() -> GatedEngine:
    return GatedEngine()


@pytest.fixture
async def held(settings: Settings, gated: GatedEngine) -> AsyncIterator[Harness]:
    """A harness whose jobs wait at a gate until the test opens it."""
    engines = {**BUILTIN, "procedural": gated.factory}
    async with open_harness(settings, engines=engines) as harness:
        yield harness
        gated.gate.set()


class ReadCounter:
    """Counts the service's database reads, but for the webhook deliverer's look for due
    deliveries (once a second, whatever the clients do)."""

    def __init__(self, harness: Harness) -> None:
        self.reads = 0
        db = harness.server.db
        inner = db.read

        async def read(fn: Any) -> Any:
            if fn is not webhook_queries.next_due:
                self.reads += 1
            return await inner(fn)

        db.read = read  # type: ignore[method-assign]


@pytest.mark.both_databases
async def test_wait_returns_when_the_job_ends(held: Harness, gated: GatedEngine) -> None:
    jobid = (await held.post(SMALL)).json()["jobid"]
    await wait_started(gated, 1)
    counter = ReadCounter(held)
    waiting = asyncio.create_task(
        held.client.get(f"/v1/dreamina/images/{jobid}?wait=30", headers=held.auth)
    )
    await asyncio.sleep(0.5)
    assert not waiting.done()
    opened = time.monotonic()
    gated.gate.set()
    reply = await waiting
    took = time.monotonic() - opened
    assert reply.status_code == 200
    assert reply.json()["status"] == "completed"
    assert len(reply.json()["response"]["images"]) == 1
    print(f"wait returned {took:.3f} s after the gate opened, {counter.reads} reads")
    assert counter.reads <= 3  # the first read, the read after the end (and progress at most)


async def test_wait_returns_the_unfinished_record_at_its_deadline(
    held: Harness, gated: GatedEngine
) -> None:
    jobid = (await held.post(SMALL)).json()["jobid"]
    await wait_started(gated, 1)
    counter = ReadCounter(held)
    started = time.monotonic()
    reply = await held.client.get(f"/v1/dreamina/images/{jobid}?wait=1", headers=held.auth)
    assert time.monotonic() - started >= 1.0
    assert reply.status_code == 200
    assert reply.json()["status"] == "created"
    assert reply.json()["jobid"] == jobid
    assert counter.reads == 2  # at the start and at the deadline: no reads in between


async def test_wait_on_an_ended_job_returns_at_once(harness: Harness) -> None:
    jobid = (await harness.post(SMALL)).json()["jobid"]
    await harness.wait(jobid)
    started = time.monotonic()
    reply = await harness.client.get(f"/v1/dreamina/images/{jobid}?wait=60", headers=harness.auth)
    assert reply.json()["status"] == "completed"
    assert time.monotonic() - started < 5


async def test_wait_zero_is_a_plain_get(held: Harness) -> None:
    jobid = (await held.post(SMALL)).json()["jobid"]
    reply = await held.client.get(f"/v1/dreamina/images/{jobid}?wait=0", headers=held.auth)
    assert reply.status_code == 200
    assert reply.json()["status"] == "created"


async def test_a_cancel_wakes_the_waiter(held: Harness, gated: GatedEngine) -> None:
    jobid = (await held.post(SMALL)).json()["jobid"]
    await wait_started(gated, 1)
    waiting = asyncio.create_task(
        held.client.get(f"/v1/dreamina/images/{jobid}?wait=30", headers=held.auth)
    )
    await asyncio.sleep(0.2)
    assert (await held.call("DELETE", f"/scheduler/{jobid}")).status_code == 200
    reply = await asyncio.wait_for(waiting, 20)  # woken: its own deadline is 30 s
    assert reply.json()["status"] == "failed"
    assert reply.json()["error"] == "Cancelled by user"


@pytest.mark.parametrize(
    ("wait", "shown"), [("61", "61"), ("-1", "-1"), ("abc", "abc"), ("1.5", "1.5")]
)
async def test_bad_waits_are_refused(harness: Harness, wait: str, shown: str) -> None:
    jobid = (await harness.post(SMALL)).json()["jobid"]
    reply = await harness.client.get(
        f"/v1/dreamina/images/{jobid}?wait={wait}", headers=harness.auth
    )
    assert reply.status_code == 400
    assert reply.json() == {"error": f"Parameter wait ({shown}) valid values: integer 0-60"}
    await harness.wait(jobid)


async def test_wait_on_an_unknown_job_is_a_404(harness: Harness) -> None:
    reply = await harness.client.get("/v1/dreamina/images/nope?wait=5", headers=harness.auth)
    assert reply.status_code == 404
    assert reply.json() == {"error": "Job nope not found"}


def events_of(text: str) -> list[tuple[str, dict[str, Any] | None]]:
    """The events of an event stream: (name, data) and ("comment", None)."""
    found: list[tuple[str, dict[str, Any] | None]] = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        if all(line.startswith(":") for line in lines):
            found.append(("comment", None))
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        found.append((fields["event"], json.loads(fields["data"])))
    return found


async def test_the_event_stream_follows_a_job_to_its_end(held: Harness, gated: GatedEngine) -> None:
    held.service.records.config = replace(held.service.records.config, keepalive_seconds=0.2)
    jobid = (await held.post(SMALL)).json()["jobid"]
    await wait_started(gated, 1)
    counter = ReadCounter(held)
    sent = tap_event_streams(held)

    async def open_later() -> None:
        await eventually(lambda: sent.count(None) >= 2, seconds=30)  # a few keep-alives first
        gated.gate.set()

    opener = asyncio.create_task(open_later())
    reply = await held.client.get(f"/v1/dreamina/images/{jobid}/events", headers=held.auth)
    await opener
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = events_of(reply.text)
    names = [name for name, _ in events]
    assert names[0] == "progress"
    assert names[-1] == "done"
    assert "comment" in names
    assert set(names) <= {"progress", "comment", "done"}
    first, last = events[0][1], events[-1][1]
    assert first is not None
    assert first["status"] == "created"
    assert last is not None
    assert last["status"] == "completed"
    final = (await held.get(jobid)).json()
    assert last == final
    assert counter.reads <= 2 + names.count("progress")  # one read per change, no loop


async def test_the_event_stream_of_an_ended_job_is_its_final_record(harness: Harness) -> None:
    jobid = (await harness.post(SMALL)).json()["jobid"]
    record = await harness.wait(jobid)
    reply = await harness.client.get(f"/v1/dreamina/images/{jobid}/events", headers=harness.auth)
    assert events_of(reply.text) == [("done", record)]


async def test_the_event_stream_of_an_unknown_job_is_a_404(harness: Harness) -> None:
    reply = await harness.client.get("/v1/dreamina/images/nope/events", headers=harness.auth)
    assert reply.status_code == 404
    assert reply.json() == {"error": "Job nope not found"}
    other = await harness.new_user()
    jobid = (await harness.post(SMALL)).json()["jobid"]
    foreign = await harness.client.get(
        f"/v1/dreamina/images/{jobid}/events", headers={"Authorization": f"Bearer {other}"}
    )
    assert foreign.status_code == 404
    await harness.wait(jobid)


async def test_progress_reaches_the_stream(settings: Settings) -> None:
    """A real procedural job large enough to report progress on the way."""
    async with open_harness(settings) as harness:
        body = {**SMALL, "model": "seedream-4.0", "ratio": "16:9", "resolution": "2k"}
        jobid = (await harness.post(body)).json()["jobid"]
        reply = await harness.client.get(
            f"/v1/dreamina/images/{jobid}/events", headers=harness.auth
        )
        events = events_of(reply.text)
        progress = [
            data["progress"]
            for name, data in events
            if name == "progress" and data and "progress" in data
        ]
        assert events[-1][0] == "done"
        assert progress == sorted(progress)
        assert any(value > 0 for value in progress), events


@pytest.mark.both_databases
async def test_polling_an_unfinished_job_reads_it_once_per_change(
    held: Harness, gated: GatedEngine, database_url: str | None
) -> None:
    """On SQLite the server makes every change of its jobs, so it serves an unfinished job's
    record from memory until the job changes; on PostgreSQL other servers may change it."""
    jobid = (await held.post(SMALL)).json()["jobid"]
    await wait_started(gated, 1)
    first = (await held.get(jobid)).json()
    counter = ReadCounter(held)
    for _ in range(20):
        assert (await held.get(jobid)).json() == first
    if database_url is None:
        assert counter.reads <= 1  # none, or one if a slow machine let the second run out
    else:
        assert counter.reads == 20
    cancelled = await held.call("DELETE", f"/scheduler/{jobid}")
    assert cancelled.status_code == 200
    after = (await held.get(jobid)).json()  # the change dropped the kept record at once
    assert after["status"] == "failed"
    assert after == cancelled.json()


@pytest.mark.both_databases
async def test_a_change_by_another_process_is_seen_within_a_second(
    held: Harness, gated: GatedEngine
) -> None:
    jobid = (await held.post(SMALL)).json()["jobid"]
    await wait_started(gated, 1)
    assert (await held.get(jobid)).json()["status"] == "created"
    # As the CLI would: straight to the database, no notification to this process.
    await held.execute(jobs.update().where(jobs.c.jobid == jobid).values(progress=42))
    started = time.monotonic()
    while (await held.get(jobid)).json().get("progress") != 42:
        assert time.monotonic() - started < 3, "the change was never seen"
        await asyncio.sleep(0.05)


@pytest.mark.both_databases
async def test_a_waiter_on_another_server_wakes_through_postgresql(
    settings: Settings, database_url: str | None
) -> None:
    """Two servers on one PostgreSQL database: the job runs on the first, the client waits on
    the second, which learns of the end through LISTEN/NOTIFY (no reads in a loop)."""
    if database_url is None:
        pytest.skip("one SQLite database has one server")
    gated = GatedEngine()
    engines = {**BUILTIN, "procedural": gated.factory}
    async with (
        open_harness(settings, engines=engines) as runner,
        open_harness(settings, engines=engines, resume=False) as other,
    ):
        jobid = (await runner.post(SMALL)).json()["jobid"]
        await wait_started(gated, 1)
        counter = ReadCounter(other)
        waiting = asyncio.create_task(
            other.client.get(f"/v1/dreamina/images/{jobid}?wait=30", headers=runner.auth)
        )
        await asyncio.sleep(0.5)  # the waiter is listening
        assert not waiting.done()
        opened = time.monotonic()
        gated.gate.set()
        reply = await asyncio.wait_for(waiting, 20)
        assert reply.json()["status"] == "completed"
        print(f"woke {time.monotonic() - opened:.3f} s after the gate opened")
        assert time.monotonic() - opened < 10  # far from the 30 s deadline
        assert counter.reads <= 4  # the start, the end, and a progress or two
