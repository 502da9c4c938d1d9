"""Account health: failures that are the account's own (AccountTrouble), a few in a row, cool
it down; admission then leaves it out while another account has room, a job that names it
still goes to it, and its next success ends the cooldown. A job's own failure never counts."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import pytest
from PIL import Image
from support import SMALL, FakeClock, Harness, open_harness

from dreamserve.engines.base import CancelSignal, EngineContext, EngineSettings, GenerationRequest
from dreamserve.engines.registry import BUILTIN
from dreamserve.errors import AccountTrouble, JobFailed
from dreamserve.ids import iso_millis
from dreamserve.jobs import millis
from dreamserve.settings import Settings
from dreamserve.storage import account_queries

pytestmark = [pytest.mark.anyio, pytest.mark.both_databases]


class FlakyEngine:
    """Fails its next `failing[tag]` jobs with `failure`, then works."""

    failing: ClassVar[Counter[str]] = Counter()
    failure: ClassVar[Exception] = AccountTrouble("Upstream unavailable", "ark answered 503")

    class Settings(EngineSettings):
        tag: str

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self.tag = str(settings["tag"])

    def serves(self, model: Any) -> bool:
        return True

    async def generate(
        self, request: GenerationRequest, progress: Any, cancel: CancelSignal
    ) -> list[Image.Image]:
        if FlakyEngine.failing[self.tag] > 0:
            FlakyEngine.failing[self.tag] -= 1
            raise FlakyEngine.failure
        return [Image.new("RGB", (request.width, request.height), "teal")] * request.count

    async def close(self) -> None:
        return None


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def pool(settings: Settings, clock: FakeClock) -> AsyncIterator[Harness]:
    FlakyEngine.failing = Counter()
    FlakyEngine.failure = AccountTrouble("Upstream unavailable", "ark answered 503")
    engines = {**BUILTIN, "flaky": FlakyEngine}
    async with open_harness(settings, clock=clock, engines=engines) as harness:
        for name in ("LOCAL:a", "LOCAL:b"):
            body = {"account": name, "engine": "flaky", "maxJobs": 10}
            await harness.put_account({**body, "settings": {"tag": name}})
        await harness.sideline_placeholder()  # only the test's accounts take these jobs
        yield harness


async def run(harness: Harness, account: str | None = None) -> dict[str, Any]:
    body = dict(SMALL) if account is None else {**SMALL, "account": account}
    reply = await harness.post(body)
    assert reply.status_code == 200, reply.text
    return await harness.wait(reply.json()["jobid"])


def on(record: dict[str, Any]) -> str:
    return str(record["jobid"]).split("-u1-")[1].split("-bot:")[0]


async def summary(harness: Harness, name: str) -> dict[str, Any]:
    return dict((await harness.call("GET", f"/accounts/{name}")).json())


async def test_three_failures_in_a_row_cool_the_account_down(
    pool: Harness, clock: FakeClock
) -> None:
    FlakyEngine.failing["LOCAL:a"] = 3
    for _ in range(2):
        assert (await run(pool, "LOCAL:a"))["error"] == "Upstream unavailable"
    assert "cooldownUntil" not in await summary(pool, "LOCAL:a")  # two: not yet
    await run(pool, "LOCAL:a")
    shown = await summary(pool, "LOCAL:a")
    assert shown["cooldownUntil"] == iso_after(clock, 30)
    assert shown["lastError"] == "Upstream unavailable"
    assert shown["lastHour"] == {"completed": 0, "failed": 3}
    # While it cools, jobs that name no account go to the other one, every time.
    placed = [on(await run(pool)) for _ in range(20)]
    assert placed == ["LOCAL:b"] * 20
    # A job that names it is still its (the caller chose it); its success ends the cooldown.
    assert (await run(pool, "LOCAL:a"))["status"] == "completed"
    shown = await summary(pool, "LOCAL:a")
    assert "cooldownUntil" not in shown
    assert shown["lastHour"] == {"completed": 1, "failed": 3}
    assert shown["lastError"] == "Upstream unavailable"  # the history stays
    placed = [on(await run(pool)) for _ in range(40)]
    assert set(placed) == {"LOCAL:a", "LOCAL:b"}  # back in the random choice


async def test_the_cooldown_doubles_with_each_further_failure_and_ends_in_time(
    pool: Harness, clock: FakeClock
) -> None:
    FlakyEngine.failing["LOCAL:a"] = 5
    for _ in range(3):
        await run(pool, "LOCAL:a")
    assert (await summary(pool, "LOCAL:a"))["cooldownUntil"] == iso_after(clock, 30)
    await run(pool, "LOCAL:a")
    assert (await summary(pool, "LOCAL:a"))["cooldownUntil"] == iso_after(clock, 60)
    await run(pool, "LOCAL:a")
    assert (await summary(pool, "LOCAL:a"))["cooldownUntil"] == iso_after(clock, 120)
    clock.advance(121)  # over: the account is back in the choice before any success
    assert "cooldownUntil" not in await summary(pool, "LOCAL:a")
    pool.server.admission.forget()
    placed = [on(await run(pool)) for _ in range(40)]
    assert set(placed) == {"LOCAL:a", "LOCAL:b"}


async def test_an_upstream_429_cools_the_account_for_its_retry_after(
    pool: Harness, clock: FakeClock
) -> None:
    FlakyEngine.failure = AccountTrouble("Upstream unavailable", "ark answered 429", cool_for=90)
    FlakyEngine.failing["LOCAL:a"] = 1
    await run(pool, "LOCAL:a")  # one is enough: the upstream said how long
    assert (await summary(pool, "LOCAL:a"))["cooldownUntil"] == iso_after(clock, 90)


async def test_a_jobs_own_failure_never_counts(pool: Harness) -> None:
    FlakyEngine.failure = JobFailed("Upstream refused the request", "content policy")
    FlakyEngine.failing["LOCAL:a"] = 6
    for _ in range(6):
        assert (await run(pool, "LOCAL:a"))["error"] == "Upstream refused the request"
    shown = await summary(pool, "LOCAL:a")
    assert "cooldownUntil" not in shown
    assert "lastError" not in shown
    assert shown["lastHour"] == {"completed": 0, "failed": 6}


async def test_when_every_account_cools_jobs_still_go_to_one(pool: Harness) -> None:
    FlakyEngine.failing.update({"LOCAL:a": 3, "LOCAL:b": 3})
    for name in ("LOCAL:a", "LOCAL:b"):
        for _ in range(3):
            await run(pool, name)
    # No account with room is healthy: a cooling one is better than a 429 (its job may work).
    assert on(await run(pool)) in {"LOCAL:a", "LOCAL:b"}


async def test_saving_the_account_again_ends_its_cooldown(pool: Harness) -> None:
    FlakyEngine.failing["LOCAL:a"] = 3
    for _ in range(3):
        await run(pool, "LOCAL:a")
    body = {"account": "LOCAL:a", "engine": "flaky", "maxJobs": 10, "settings": {"tag": "LOCAL:a"}}
    saved = await pool.put_account(body)
    assert "cooldownUntil" not in saved
    rows = await pool.server.db.read(account_queries.every_account)
    assert [row.failures for row in rows if row.name == "LOCAL:a"] == [0]


def iso_after(clock: FakeClock, seconds: int) -> str:
    return iso_millis(millis(clock()) + seconds * 1000)


async def test_a_cooldown_holds_across_api_processes(
    postgres_url: str, tmp_path, clock: FakeClock
) -> None:
    """Two API processes on one PostgreSQL (each with its own account cache): a cooldown that
    one process's runner starts keeps the other's admission off the account once its cache
    (0.2 s here, 2 s by default) has expired."""
    FlakyEngine.failing = Counter()
    FlakyEngine.failure = AccountTrouble("Upstream unavailable", "ark answered 503")
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=postgres_url,
        public_url="http://testserver",
        account_cache_seconds=0.2,
    )
    engines = {**BUILTIN, "flaky": FlakyEngine}
    async with (
        open_harness(settings, clock=clock, engines=engines) as one,
        open_harness(settings, clock=clock, engines=engines, resume=False) as two,
    ):
        for name in ("LOCAL:a", "LOCAL:b"):
            body = {"account": name, "engine": "flaky", "maxJobs": 10}
            await one.put_account({**body, "settings": {"tag": name}})
        await one.sideline_placeholder()
        placed = [on(await run(two)) for _ in range(30)]  # two has seen both accounts
        assert set(placed) == {"LOCAL:a", "LOCAL:b"}
        FlakyEngine.failing["LOCAL:a"] = 3
        for _ in range(3):
            await run(one, "LOCAL:a")
        await asyncio.sleep(0.3)  # two's cached list expires
        placed = [on(await run(two)) for _ in range(20)]
        assert placed == ["LOCAL:b"] * 20
