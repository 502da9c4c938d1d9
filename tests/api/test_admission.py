"""The admission invariant: under 200 concurrent submissions against 3 accounts no account ever
runs more jobs than its cap, and once everything has ended every account is back to zero."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image
from support import SMALL, Harness, eventually, open_harness

from dreamserve.engines.base import CancelSignal, EngineContext, EngineSettings, GenerationRequest
from dreamserve.engines.registry import BUILTIN
from dreamserve.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.both_databases]

CAPS = {"LOCAL:a": 2, "LOCAL:b": 3, "LOCAL:c": 5}


class TrackingEngine:
    """One instance per account (the registry's rule): counts the jobs it runs at once."""

    gate: ClassVar[asyncio.Event]
    peaks: ClassVar[dict[str, int]] = {}
    runs: ClassVar[Counter[str]] = Counter()

    class Settings(EngineSettings):
        tag: str

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self.tag = str(settings["tag"])
        self.running = 0

    def serves(self, model: Any) -> bool:
        return True

    async def generate(
        self, request: GenerationRequest, progress: Any, cancel: CancelSignal
    ) -> list[Image.Image]:
        self.running += 1
        TrackingEngine.runs[self.tag] += 1
        TrackingEngine.peaks[self.tag] = max(TrackingEngine.peaks.get(self.tag, 0), self.running)
        try:
            await TrackingEngine.gate.wait()
            await asyncio.sleep(random.uniform(0, 0.01))
            return [Image.new("RGB", (request.width, request.height), "teal")] * request.count
        finally:
            self.running -= 1

    async def close(self) -> None:
        return None


@pytest.fixture
async def pool(settings: Settings):
    TrackingEngine.gate = asyncio.Event()
    TrackingEngine.peaks = {}
    TrackingEngine.runs = Counter()
    engines = {**BUILTIN, "tracking": TrackingEngine}
    async with open_harness(settings, engines=engines) as harness:
        for name, cap in CAPS.items():
            body = {"account": name, "engine": "tracking", "maxJobs": cap}
            await harness.put_account({**body, "settings": {"tag": name}})
        await harness.sideline_placeholder()  # only the three take these jobs
        yield harness
        TrackingEngine.gate.set()


async def own_slots(harness: Harness) -> dict[str, int]:
    return {name: n for name, n in (await harness.slots()).items() if name in CAPS}


async def test_200_concurrent_submissions_fill_exactly_the_caps(pool: Harness) -> None:
    replies = await asyncio.gather(*(pool.post(SMALL) for _ in range(200)))
    statuses = Counter(reply.status_code for reply in replies)
    assert statuses == {200: 10, 429: 190}
    assert {reply.json()["error"] for reply in replies if reply.status_code == 429} == {
        "All accounts at capacity"
    }
    assert await own_slots(pool) == CAPS
    await eventually(lambda: sum(TrackingEngine.runs.values()) == 10)
    assert TrackingEngine.peaks == CAPS
    TrackingEngine.gate.set()
    for reply in replies:
        if reply.status_code == 200:
            assert (await pool.wait(reply.json()["jobid"]))["status"] == "completed"
    assert await own_slots(pool) == dict.fromkeys(CAPS, 0)


async def test_no_cap_is_exceeded_while_jobs_end_and_new_ones_arrive(pool: Harness) -> None:
    TrackingEngine.gate.set()  # jobs end while submissions race for the slots they free
    replies = await asyncio.gather(*(pool.post(SMALL) for _ in range(200)))
    admitted = [reply.json()["jobid"] for reply in replies if reply.status_code == 200]
    assert {reply.status_code for reply in replies} <= {200, 429}
    assert len(admitted) >= 10
    for jobid in admitted:
        assert (await pool.wait(jobid))["status"] == "completed"
    assert sum(TrackingEngine.runs.values()) == len(admitted)
    for name, peak in TrackingEngine.peaks.items():
        assert peak <= CAPS[name], name
    assert await own_slots(pool) == dict.fromkeys(CAPS, 0)


async def test_jobs_spread_over_the_accounts_at_random(pool: Harness) -> None:
    TrackingEngine.gate.set()
    for _ in range(30):
        jobid = (await pool.post(SMALL)).json()["jobid"]
        await pool.wait(jobid)
    assert set(TrackingEngine.runs) == set(CAPS)  # each account got some of 30 sequential jobs


async def test_a_lower_priority_takes_jobs_only_when_every_higher_one_is_full(
    pool: Harness,
) -> None:
    for name, priority in {"LOCAL:a": 5, "LOCAL:b": 5, "LOCAL:c": -1}.items():
        body = {"account": name, "engine": "tracking", "maxJobs": CAPS[name]}
        saved = await pool.put_account({**body, "priority": priority, "settings": {"tag": name}})
        assert saved["priority"] == priority
    # One at a time, the gate closed: every job holds its slot.
    placed = []
    for _ in range(10):
        reply = await pool.post(SMALL)
        assert reply.status_code == 200, reply.text
        placed.append(reply.json()["jobid"].split("-u1-")[1].split("-bot:")[0])
    # The top tier (a: 2 slots, b: 3) fills first, in a random order within it; then c.
    assert Counter(placed[:5]) == {"LOCAL:a": 2, "LOCAL:b": 3}
    assert placed[5:] == ["LOCAL:c"] * 5
    assert (await pool.post(SMALL)).status_code == 429


async def test_within_a_priority_the_choice_stays_random(pool: Harness) -> None:
    TrackingEngine.gate.set()
    for name in ("LOCAL:a", "LOCAL:b"):
        body = {"account": name, "engine": "tracking", "maxJobs": CAPS[name], "priority": 1}
        await pool.put_account({**body, "settings": {"tag": name}})
    for _ in range(30):
        jobid = (await pool.post(SMALL)).json()["jobid"]
        await pool.wait(jobid)
    # Free slots all along: only the top tier takes jobs, both of its accounts some of them.
    assert set(TrackingEngine.runs) == {"LOCAL:a", "LOCAL:b"}


async def test_two_api_processes_never_admit_past_the_caps(
    postgres_url: str, tmp_path: Path
) -> None:
    """Two API processes on one PostgreSQL (each with its own account cache) take slots from
    the same rows: 200 submissions at once, half through each, fill exactly the caps."""
    TrackingEngine.gate = asyncio.Event()
    TrackingEngine.peaks = {}
    TrackingEngine.runs = Counter()
    settings = Settings(
        data_dir=tmp_path / "data", database_url=postgres_url, public_url="http://testserver"
    )
    engines = {**BUILTIN, "tracking": TrackingEngine}
    async with (
        open_harness(settings, engines=engines) as one,
        open_harness(settings, engines=engines, resume=False) as two,
    ):
        for name, cap in CAPS.items():
            body = {"account": name, "engine": "tracking", "maxJobs": cap, "priority": cap}
            await one.put_account({**body, "settings": {"tag": name}})
        await one.sideline_placeholder()
        replies = await asyncio.gather(
            *(harness.post(SMALL) for _ in range(100) for harness in (one, two))
        )
        assert Counter(reply.status_code for reply in replies) == {200: 10, 429: 190}
        assert await own_slots(one) == CAPS
        TrackingEngine.gate.set()
        for reply in replies:
            if reply.status_code == 200:
                jobid = reply.json()["jobid"]
                assert (await one.wait(jobid))["status"] == "completed"
        assert await own_slots(one) == dict.fromkeys(CAPS, 0)
        for name, peak in TrackingEngine.peaks.items():
            assert peak <= CAPS[name], name
