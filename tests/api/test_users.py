"""Users and tokens operated by the operator: revoked tokens refused within the token cache's
staleness, and per-user limits (max-running, max-per-minute) as 429s naming the limit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from support import FakeClock, GatedEngine, Harness, open_harness

from dreamserve.engines.registry import BUILTIN
from dreamserve.service.tokens import Tokens
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

BODY = {"prompt": "a lighthouse", "model": "seedream-4.0", "ratio": "1:1", "count": 1}


async def finished(h: Harness, user: int, jobid: str) -> None:
    for _ in range(1000):
        if (await h.service.records.get(user, jobid))["status"] != "created":
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {jobid} did not end")


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_revoked_token_is_refused_once_the_token_cache_expires(settings: Settings) -> None:
    settings = settings.model_copy(update={"token_cache_seconds": 30.0})
    async with open_harness(settings) as h:
        monotonic = Monotonic()
        h.service.tokens.monotonic = monotonic
        user, leaked = await h.service.tokens.create()
        _, other = await h.service.tokens.create(user)
        models = {"Authorization": f"Bearer {leaked}"}
        assert (await h.client.get("/v1/dreamina/models", headers=models)).status_code == 200
        # Revoked by another process (the CLI): this server's cache still knows the token.
        cli = Tokens(h.server.db, h.service.tokens.clock, h.service.tokens.config)
        [listed] = [each for each in await cli.listing(user) if each["prefix"] == leaked[:13]]
        revoked = await cli.revoke(leaked[:13])
        assert revoked["id"] == listed["id"]
        assert revoked["revokedAt"] is not None
        assert (await h.client.get("/v1/dreamina/models", headers=models)).status_code == 200
        monotonic.now += 30.0  # the token cache's staleness, then no longer
        refused = await h.client.get("/v1/dreamina/models", headers=models)
        assert (refused.status_code, refused.json()) == (401, {"error": "Unauthorized"})
        still = await h.client.get(
            "/v1/dreamina/models", headers={"Authorization": f"Bearer {other}"}
        )
        assert still.status_code == 200


async def test_the_revoking_process_refuses_the_token_at_once(settings: Settings) -> None:
    async with open_harness(settings) as h:
        _, token = await h.service.tokens.create()
        headers = {"Authorization": f"Bearer {token}"}
        assert (await h.client.get("/v1/dreamina/models", headers=headers)).status_code == 200
        await h.service.tokens.revoke(token[:13])
        assert (await h.client.get("/v1/dreamina/models", headers=headers)).status_code == 401


async def test_tokens_list_shows_prefixes_and_last_use_never_secrets(settings: Settings) -> None:
    async with open_harness(settings) as h:
        user, token = await h.service.tokens.create()
        headers = {"Authorization": f"Bearer {token}"}
        assert (await h.client.get("/v1/dreamina/models", headers=headers)).status_code == 200
        [shown] = await h.service.tokens.listing(user)
        assert shown["prefix"] == token[: len(f"user:{user}-") + 6]
        assert shown["lastUsedAt"] is not None
        assert shown["revokedAt"] is None
        assert token[len(shown["prefix"]) :] not in repr(await h.service.tokens.listing())


@pytest.mark.both_databases
async def test_max_running_admits_exactly_that_many_of_concurrent_submissions(
    settings: Settings,
) -> None:
    engine = GatedEngine()
    async with open_harness(settings, engines={**BUILTIN, "procedural": engine.factory}) as h:
        user, token = await h.service.tokens.create()
        await h.service.tokens.set_limits(user, {"max_running": 3})
        replies = await asyncio.gather(*(h.post(BODY, token) for _ in range(20)))
        codes = sorted(reply.status_code for reply in replies)
        assert codes == [200] * 3 + [429] * 17
        refused = [reply for reply in replies if reply.status_code == 429]
        assert {reply.json()["error"] for reply in refused} == {
            "User limit reached: 3 running jobs (max-running)"
        }
        assert {reply.headers["Retry-After"] for reply in refused} == {
            str(settings.retry_after_seconds)
        }
        # User 1 has no limit: its submissions still go in.
        assert (await h.post(BODY)).status_code == 200
        engine.gate.set()
        for reply in replies:
            if reply.status_code == 200:
                await finished(h, user, reply.json()["jobid"])
        assert (await h.post(BODY, token)).status_code == 200  # finished jobs free the units


@pytest.mark.both_databases
async def test_max_per_minute_counts_submissions_in_each_minute_of_the_clock(
    settings: Settings,
) -> None:
    clock = FakeClock(datetime(2026, 1, 1, 12, 0, 15, tzinfo=UTC))
    async with open_harness(settings, clock=clock) as h:
        user, token = await h.service.tokens.create()
        await h.service.tokens.set_limits(user, {"max_per_minute": 2})
        first = await asyncio.gather(*(h.post(BODY, token) for _ in range(5)))
        assert sorted(reply.status_code for reply in first) == [200, 200, 429, 429, 429]
        refused = next(reply for reply in first if reply.status_code == 429)
        assert refused.json() == {
            "error": "User limit reached: 2 submissions per minute (max-per-minute)"
        }
        assert refused.headers["Retry-After"] == "45"  # the minute ends at 12:01:00
        clock.advance(45)
        assert (await h.post(BODY, token)).status_code == 200
        await h.service.tokens.set_limits(user, {"max_per_minute": None})
        h.server.admission.limits.forget()  # as the cache would after account_cache_seconds
        assert all(
            reply.status_code == 200
            for reply in await asyncio.gather(*(h.post(BODY, token) for _ in range(3)))
        )


async def test_waiting_jobs_count_as_running(settings: Settings) -> None:
    engine = GatedEngine()
    async with open_harness(settings, engines={**BUILTIN, "procedural": engine.factory}) as h:
        await h.put_account({"account": "LOCAL:one", "engine": "procedural", "maxJobs": 1})
        user, token = await h.service.tokens.create()
        await h.service.tokens.set_limits(user, {"max_running": 2})
        named = {**BODY, "account": "LOCAL:procedural", "maxJobs": 1, "queueSeconds": 60}
        assert (await h.post(named, token)).status_code == 200  # runs
        assert (await h.post(named, token)).status_code == 200  # waits for the slot
        third = await h.post(named, token)
        assert (third.status_code, third.json()) == (
            429,
            {"error": "User limit reached: 2 running jobs (max-running)"},
        )
        engine.gate.set()
