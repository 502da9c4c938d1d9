"""The optional queue (`queueSeconds`): a job that finds no free slot waits in its account's
queue instead of a 429; slots that free go to the waiting users in turn (round robin), each
user's jobs first come, first served; a job still waiting after its queueSeconds fails; a
waiting job holds no slot, can be cancelled, and survives a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image
from support import SMALL, FakeClock, Harness, eventually, open_harness, tap_event_streams

from dreamserve.engines.base import CancelSignal, EngineContext, EngineSettings, GenerationRequest
from dreamserve.engines.registry import BUILTIN
from dreamserve.reaper import Reaper, ReaperConfig
from dreamserve.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.both_databases]

ACCOUNT = "LOCAL:q"
SHARED_ACCOUNT = {"account": ACCOUNT, "engine": "turns", "maxJobs": 2}


class TurnEngine:
    """Records the prompt of each job it starts; each job ends when the test lets one go."""

    started: ClassVar[list[str]] = []
    go: ClassVar[asyncio.Queue[None]]

    class Settings(EngineSettings):
        pass

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        pass

    def serves(self, model: Any) -> bool:
        return True

    async def generate(
        self, request: GenerationRequest, progress: Any, cancel: CancelSignal
    ) -> list[Image.Image]:
        TurnEngine.started.append(str(request.prompt))
        await TurnEngine.go.get()
        return [Image.new("RGB", (request.width, request.height), "teal")] * request.count

    async def close(self) -> None:
        return None


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def queue(settings: Settings, clock: FakeClock) -> AsyncIterator[Harness]:
    TurnEngine.started = []
    TurnEngine.go = asyncio.Queue()
    engines = {**BUILTIN, "turns": TurnEngine}
    async with open_harness(settings, clock=clock, engines=engines) as harness:
        await harness.service.accounts.put(None, SHARED_ACCOUNT)  # every user's
        await harness.sideline_placeholder()
        yield harness
        for _ in range(50):
            TurnEngine.go.put_nowait(None)


def body(prompt: str, queue_seconds: int | None = 600) -> dict[str, Any]:
    fields = {**SMALL, "prompt": prompt}
    return fields if queue_seconds is None else {**fields, "queueSeconds": queue_seconds}


async def submit(harness: Harness, prompt: str, token: str | None = None) -> str:
    reply = await harness.post(body(prompt), token)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["jobid"])


async def position(harness: Harness, jobid: str, token: str | None = None) -> int | None:
    record = (await harness.get(jobid, token)).json()
    return record.get("queuePosition")


async def finished(harness: Harness, jobid: str, token: str | None) -> dict[str, Any]:
    for _ in range(600):
        record = dict((await harness.get(jobid, token)).json())
        if record["status"] != "created":
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {jobid} did not end")


async def fill(harness: Harness) -> list[str]:
    """Both slots taken by running jobs (the engine holds them)."""
    jobids = [await submit(harness, f"running {n}") for n in (1, 2)]
    await eventually(lambda: len(TurnEngine.started) == 2)
    return jobids


async def test_queue_seconds_is_checked(queue: Harness) -> None:
    for value in (-1, 3601, 1.5, "soon"):
        reply = await queue.post({**SMALL, "queueSeconds": value})
        assert reply.status_code == 400
        assert reply.json() == {
            "error": f"Parameter queueSeconds ({value}) valid values: integer 0-3600"
        }


async def test_without_queue_seconds_a_full_account_is_a_429_and_with_it_the_job_waits(
    queue: Harness,
) -> None:
    await fill(queue)
    refused = await queue.post(body("no queue", queue_seconds=None))
    assert refused.status_code == 429
    assert refused.json() == {"error": "All accounts at capacity"}
    zero = await queue.post(body("no queue", queue_seconds=0))
    assert zero.status_code == 429
    waiting = await queue.post(body("queued"))
    assert waiting.status_code == 200
    record = waiting.json()
    assert record["status"] == "created"
    assert record["request"]["queueSeconds"] == 600
    assert await position(queue, record["jobid"]) == 1
    assert await queue.slots() == {ACCOUNT: 2, "LOCAL:procedural": 0}  # it holds no slot


async def test_users_are_served_in_turn_each_first_come_first_served(queue: Harness) -> None:
    await fill(queue)
    two, three = await queue.new_user(), await queue.new_user()
    order = [("a1", None), ("a2", None), ("b1", two), ("a3", None), ("b2", two), ("c1", three)]
    jobids = {prompt: await submit(queue, prompt, token) for prompt, token in order}
    tokens = dict(order)
    # Users in turn (1, 2, 3, then again), each user's jobs in the order they came.
    expected = ["a1", "b1", "c1", "a2", "b2", "a3"]
    positions = {p: await position(queue, jobids[p], tokens[p]) for p in jobids}
    assert positions == {prompt: n for n, prompt in enumerate(expected, 1)}
    for n in range(len(expected)):
        TurnEngine.go.put_nowait(None)  # one running job ends: its slot goes to the next
        await eventually(lambda n=n: len(TurnEngine.started) == 3 + n)
    assert TurnEngine.started[2:] == expected
    assert await position(queue, jobids["a3"]) is None  # running now, not waiting
    for _ in range(8):
        TurnEngine.go.put_nowait(None)
    for prompt, jobid in jobids.items():
        ended = await finished(queue, jobid, tokens[prompt])
        assert ended["status"] == "completed", ended
    assert await queue.slots() == {ACCOUNT: 0, "LOCAL:procedural": 0}


async def test_a_job_still_waiting_after_its_queue_seconds_fails(
    queue: Harness, clock: FakeClock
) -> None:
    await fill(queue)
    reply = await queue.post(body("patient", queue_seconds=30))
    jobid = reply.json()["jobid"]
    server = queue.server
    reaper = Reaper(server.store, server.blobs, server.dispatcher, clock, ReaperConfig(1.0))
    clock.advance(29)
    await reaper.sweep()
    assert (await queue.get(jobid)).json()["status"] == "created"
    clock.advance(2)
    await reaper.sweep()
    record = (await queue.get(jobid)).json()
    assert (record["status"], record["error"]) == (
        "failed",
        "Timed out waiting for capacity after 30 s",
    )
    assert "queuePosition" not in record
    assert await queue.slots() == {ACCOUNT: 2, "LOCAL:procedural": 0}  # none given back


async def test_a_waiting_job_can_be_cancelled_and_the_next_takes_its_turn(queue: Harness) -> None:
    await fill(queue)
    first = await submit(queue, "first")
    second = await submit(queue, "second")
    assert await position(queue, second) == 2
    cancelled = await queue.call("DELETE", f"/scheduler/{first}")
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["status"], cancelled.json()["error"]) == (
        "failed",
        "Cancelled by user",
    )
    assert await position(queue, second) == 1
    assert await queue.slots() == {ACCOUNT: 2, "LOCAL:procedural": 0}
    TurnEngine.go.put_nowait(None)
    await eventually(lambda: TurnEngine.started[2:] == ["second"])


async def test_the_queue_is_bounded_per_account(settings: Settings) -> None:
    TurnEngine.started = []
    TurnEngine.go = asyncio.Queue()
    limited = settings.model_copy(update={"queue_limit": 2})
    async with open_harness(limited, engines={**BUILTIN, "turns": TurnEngine}) as harness:
        await harness.service.accounts.put(None, SHARED_ACCOUNT)  # every user's
        await harness.sideline_placeholder()
        await fill(harness)
        await submit(harness, "w1")
        await submit(harness, "w2")
        refused = await harness.post(body("w3"))
        assert refused.status_code == 429
        assert refused.json() == {"error": "All accounts at capacity"}
        for _ in range(10):
            TurnEngine.go.put_nowait(None)


async def test_a_burst_never_admits_past_the_cap_and_every_job_runs_once(queue: Harness) -> None:
    replies = await asyncio.gather(*(queue.post(body(f"burst {n}")) for n in range(40)))
    assert {reply.status_code for reply in replies} == {200}
    await eventually(lambda: len(TurnEngine.started) == 2)
    assert await queue.slots() == {ACCOUNT: 2, "LOCAL:procedural": 0}
    jobids = [reply.json()["jobid"] for reply in replies]
    waiting = [await position(queue, jobid) for jobid in jobids]
    assert sorted(p for p in waiting if p is not None) == list(range(1, 39))
    for _ in range(40):
        TurnEngine.go.put_nowait(None)
    for jobid in jobids:
        assert (await finished(queue, jobid, None))["status"] == "completed"
    assert sorted(TurnEngine.started) == sorted(f"burst {n}" for n in range(40))
    assert await queue.slots() == {ACCOUNT: 0, "LOCAL:procedural": 0}


async def test_waiting_jobs_survive_a_restart_in_order(settings: Settings) -> None:
    TurnEngine.started = []
    TurnEngine.go = asyncio.Queue()
    engines = {**BUILTIN, "turns": TurnEngine}
    async with open_harness(settings, engines=engines) as harness:
        await harness.service.accounts.put(None, SHARED_ACCOUNT)
        await harness.sideline_placeholder()
        await fill(harness)
        jobids = [await submit(harness, f"after {n}") for n in (1, 2, 3)]
    # Stopped with two jobs running (they run again) and three waiting (they wait on).
    TurnEngine.started = []
    async with open_harness(settings, engines=engines) as harness:
        await eventually(lambda: len(TurnEngine.started) == 2)
        assert sorted(TurnEngine.started) == ["running 1", "running 2"]
        assert [await position(harness, jobid) for jobid in jobids] == [1, 2, 3]
        assert await harness.slots() == {ACCOUNT: 2, "LOCAL:procedural": 0}
        # The two running end: their slots go to the first two waiting, in order; the third
        # waits first in line. (Which of two promoted jobs starts first is the dispatch's: on
        # PostgreSQL, after 3 once started before after 2 when all five were let go at once.)
        for _ in range(2):
            TurnEngine.go.put_nowait(None)  # to running 1 and 2, the first two waiting for one
        await eventually(lambda: len(TurnEngine.started) == 4)
        assert sorted(TurnEngine.started[2:]) == ["after 1", "after 2"]
        assert await position(harness, jobids[2]) == 1
        for _ in range(3):
            TurnEngine.go.put_nowait(None)
        for jobid in jobids:
            assert (await finished(harness, jobid, None))["status"] == "completed"
        assert TurnEngine.started[4:] == ["after 3"]
        assert await harness.slots() == {ACCOUNT: 0, "LOCAL:procedural": 0}


async def test_a_cap_raised_lets_waiting_jobs_start_at_once(queue: Harness) -> None:
    await fill(queue)
    jobids = [await submit(queue, f"waits {n}") for n in (1, 2)]
    saved = await queue.service.accounts.put(None, {**SHARED_ACCOUNT, "maxJobs": 3})
    assert saved["running"] == 2  # the summary as saved, before the promotion
    await eventually(lambda: TurnEngine.started[2:] == ["waits 1"])
    assert [await position(queue, jobid) for jobid in jobids] == [None, 1]
    assert await queue.slots() == {ACCOUNT: 3, "LOCAL:procedural": 0}


async def test_two_api_processes_share_the_queue_without_losing_or_doubling_a_job(
    postgres_url: str, tmp_path: Path
) -> None:
    """Two API processes on one PostgreSQL, each running the jobs whose slots it freed or
    admitted: 30 queued submissions through both; every job runs once, the cap holds."""
    TurnEngine.started = []
    TurnEngine.go = asyncio.Queue()
    settings = Settings(
        data_dir=tmp_path / "data", database_url=postgres_url, public_url="http://testserver"
    )
    engines = {**BUILTIN, "turns": TurnEngine}
    async with (
        open_harness(settings, engines=engines) as one,
        open_harness(settings, engines=engines, resume=False) as two,
    ):
        await one.service.accounts.put(None, SHARED_ACCOUNT)
        await one.sideline_placeholder()
        replies = await asyncio.gather(
            *(
                harness.post(body(f"p{n}-{i}"))
                for i in range(15)
                for n, harness in ((1, one), (2, two))
            )
        )
        assert {reply.status_code for reply in replies} == {200}
        await eventually(lambda: len(TurnEngine.started) == 2)
        assert await one.slots() == {ACCOUNT: 2, "LOCAL:procedural": 0}
        for _ in range(30):
            TurnEngine.go.put_nowait(None)
        for reply in replies:
            record = await finished(one, reply.json()["jobid"], None)
            assert record["status"] == "completed", record
        assert sorted(TurnEngine.started) == sorted(f"p{n}-{i}" for i in range(15) for n in (1, 2))
        assert await one.slots() == {ACCOUNT: 0, "LOCAL:procedural": 0}


async def test_200_jobs_of_3_users_run_once_each_in_turn_and_in_order(queue: Harness) -> None:
    await fill(queue)
    tokens = {"a": None, "b": await queue.new_user(), "c": await queue.new_user()}
    counts = {"a": 100, "b": 60, "c": 40}  # 200 in all, submitted interleaved
    jobids: dict[str, str] = {}
    for n in range(100):
        for user, count in counts.items():
            if n < count:
                prompt = f"{user}{n}"
                jobids[prompt] = await submit(queue, prompt, tokens[user])
    # The positions: users in turn (a, b, c) while each has jobs, each user's in order.
    expected = []
    for n in range(100):
        expected += [f"{user}{n}" for user, count in counts.items() if n < count]
    for probe in ("a0", "b0", "c0", "a1", "c39", "b59", "a40", "a41", "a99"):
        assert await position(queue, jobids[probe], tokens[probe[0]]) == expected.index(probe) + 1
    for n in range(len(expected)):
        TurnEngine.go.put_nowait(None)
        await eventually(lambda n=n: len(TurnEngine.started) == 3 + n)
    assert TurnEngine.started[2:] == expected
    for _ in range(2):
        TurnEngine.go.put_nowait(None)
    for prompt, jobid in jobids.items():
        assert (await finished(queue, jobid, tokens[prompt[0]]))["status"] == "completed"
    assert await queue.slots() == {ACCOUNT: 0, "LOCAL:procedural": 0}


async def test_wait_and_the_event_stream_follow_a_waiting_job_to_its_end(queue: Harness) -> None:
    await fill(queue)
    jobid = await submit(queue, "followed")
    auth = {"Authorization": f"Bearer {queue.token}"}
    sent = tap_event_streams(queue)

    async def release_later() -> None:
        await eventually(lambda: len(sent) > 0, seconds=30)  # the stream's first record
        for _ in range(3):
            TurnEngine.go.put_nowait(None)  # the two running jobs, then this one

    # Both opened while the job waits, both answered when it ends.
    waited, streamed, _ = await asyncio.gather(
        queue.client.get(f"/v1/dreamina/images/{jobid}?wait=30", headers=auth),
        queue.client.get(f"/v1/dreamina/images/{jobid}/events", headers=auth),
        release_later(),
    )
    assert waited.json()["status"] == "completed"
    blocks = [block for block in streamed.text.strip().split("\n\n") if "event: " in block]
    assert blocks[0].startswith("event: progress")
    assert '"queuePosition":1' in blocks[0].replace(" ", "")  # waiting when the stream opened
    assert blocks[-1].startswith("event: done")
    assert '"status":"completed"' in blocks[-1].replace(" ", "")


async def test_a_job_joins_the_shortest_queue_at_random_among_ties(queue: Harness) -> None:
    other = {**SHARED_ACCOUNT, "account": "LOCAL:r"}
    await queue.service.accounts.put(None, other)
    for n in range(4):  # both accounts full: 2 slots each
        await submit(queue, f"running {n}")
    await eventually(lambda: len(TurnEngine.started) == 4)
    placed = []
    for n in range(6):
        jobid = await submit(queue, f"waits {n}")
        placed.append("LOCAL:r" if "-LOCAL:r-" in jobid else ACCOUNT)
    # Each job goes to the shorter queue, so the two never differ by more than one.
    for n in range(1, 7):
        assert abs(placed[:n].count(ACCOUNT) - placed[:n].count("LOCAL:r")) <= 1, placed
    for _ in range(10):
        TurnEngine.go.put_nowait(None)
