"""Idempotency-Key on POST /images and POST /images/upscale."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import func, select
from support import SMALL, FakeClock, GatedEngine, Harness, open_harness, public_dns

from dreamserve.engines.registry import BUILTIN
from dreamserve.settings import Settings
from dreamserve.storage.tables import jobs

pytestmark = pytest.mark.anyio


async def post(
    harness: Harness, body: dict[str, object], key: str, token: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or harness.token}", "Idempotency-Key": key}
    return await harness.client.post("/v1/dreamina/images", json=body, headers=headers)


async def job_count(harness: Harness) -> int:
    return int(
        await harness.server.db.read(
            lambda conn: conn.execute(select(func.count()).select_from(jobs)).scalar_one()
        )
    )


async def test_the_same_key_and_body_return_the_first_job(harness: Harness) -> None:
    first = await post(harness, SMALL, "order-1")
    assert first.status_code == 200
    assert "idempotent-replayed" not in first.headers
    await harness.wait(first.json()["jobid"])
    again = await post(harness, SMALL, "order-1")
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["jobid"] == first.json()["jobid"]
    assert again.json()["status"] == "completed"  # the job as it is now
    assert await job_count(harness) == 1
    assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_a_replay_takes_no_slot(harness: Harness) -> None:
    first = await post(harness, {**SMALL, "maxJobs": 1}, "k")
    second = await post(harness, {**SMALL, "maxJobs": 1}, "k")
    assert first.status_code == second.status_code == 200  # not a 429: no second slot
    assert second.json()["jobid"] == first.json()["jobid"]
    await harness.wait(first.json()["jobid"])


async def test_the_same_key_with_another_body_is_a_422(harness: Harness) -> None:
    first = await post(harness, SMALL, "order-2")
    assert first.status_code == 200
    other = await post(harness, {**SMALL, "prompt": "something else"}, "order-2")
    assert other.status_code == 422
    assert other.json() == {
        "error": "Idempotency-Key order-2 was already used with a different request: use a new "
        "key for a new request"
    }
    assert await job_count(harness) == 1
    await harness.wait(first.json()["jobid"])


async def test_field_order_does_not_make_another_request(harness: Harness) -> None:
    first = await post(harness, {"prompt": "a", "model": "nano-banana", "count": 1}, "o")
    again = await post(harness, {"count": 1, "model": "nano-banana", "prompt": "a"}, "o")
    assert again.json()["jobid"] == first.json()["jobid"]
    await harness.wait(first.json()["jobid"])


async def test_keys_belong_to_their_user(harness: Harness) -> None:
    other = await harness.new_user()
    mine = await post(harness, SMALL, "shared-key")
    theirs = await post(harness, SMALL, "shared-key", token=other)
    assert mine.status_code == theirs.status_code == 200
    assert mine.json()["jobid"] != theirs.json()["jobid"]
    await harness.wait(mine.json()["jobid"])


async def test_without_a_key_every_post_is_a_new_job(harness: Harness) -> None:
    first = await harness.post(SMALL)
    second = await harness.post(SMALL)
    assert first.json()["jobid"] != second.json()["jobid"]
    await harness.wait(first.json()["jobid"])
    await harness.wait(second.json()["jobid"])


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
async def test_bad_keys_are_refused(harness: Harness, key: str) -> None:
    headers = {"Authorization": f"Bearer {harness.token}", "Idempotency-Key": key}
    reply = await harness.client.post(
        "/v1/dreamina/images", json=SMALL, headers={k: v.encode() for k, v in headers.items()}
    )
    assert reply.status_code == 400
    assert reply.json() == {
        "error": "Header Idempotency-Key must be 1-255 printable ASCII characters"
    }
    assert await job_count(harness) == 0


@pytest.mark.both_databases
async def test_a_key_names_its_job_for_24_hours(settings: Settings) -> None:
    clock = FakeClock()
    async with open_harness(settings, clock=clock) as harness:
        first = await post(harness, SMALL, "daily")
        await harness.wait(first.json()["jobid"])
        clock.advance(86_400 - 60)
        same = await post(harness, SMALL, "daily")
        assert same.json()["jobid"] == first.json()["jobid"]
        clock.advance(120)
        new = await post(harness, SMALL, "daily")
        assert new.status_code == 200
        assert "idempotent-replayed" not in new.headers
        assert new.json()["jobid"] != first.json()["jobid"]
        await harness.wait(new.json()["jobid"])
        replayed = await post(harness, SMALL, "daily")
        assert replayed.json()["jobid"] == new.json()["jobid"]


@pytest.mark.both_databases
async def test_concurrent_duplicates_make_one_job(harness: Harness) -> None:
    replies = await asyncio.gather(*[post(harness, SMALL, "burst") for _ in range(20)])
    assert {reply.status_code for reply in replies} == {200}
    assert len({reply.json()["jobid"] for reply in replies}) == 1
    assert sum(reply.headers.get("idempotent-replayed") == "true" for reply in replies) == 19
    assert await job_count(harness) == 1
    await harness.wait(replies[0].json()["jobid"])
    assert await harness.slots() == {"LOCAL:procedural": 0}


async def test_a_refused_submission_does_not_use_up_its_key(harness: Harness) -> None:
    bad = await post(harness, {**SMALL, "ratio": "7:5"}, "retry-me")
    assert bad.status_code == 400
    good = await post(harness, SMALL, "retry-me")
    assert good.status_code == 200
    await harness.wait(good.json()["jobid"])


async def test_upscale_is_idempotent_too(harness: Harness) -> None:
    source = (await harness.post(SMALL)).json()["jobid"]
    await harness.wait(source)
    headers = {"Authorization": f"Bearer {harness.token}", "Idempotency-Key": "up-1"}
    body = {"jobid": source, "upscaleResolution": "2k"}
    first = await harness.client.post("/v1/dreamina/images/upscale", json=body, headers=headers)
    again = await harness.client.post("/v1/dreamina/images/upscale", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["jobid"] == first.json()["jobid"]
    assert again.headers["idempotent-replayed"] == "true"
    # The same key on the other endpoint is another request.
    image = await post(harness, SMALL, "up-1")
    assert image.status_code == 422
    await harness.wait(first.json()["jobid"])


@pytest.mark.both_databases
async def test_concurrent_duplicates_for_the_last_free_slot_all_get_the_job(
    harness: Harness,
) -> None:
    """A duplicate must not compete with its original for a slot: with one slot left, every
    copy gets the one job, none a 429 (on PostgreSQL the key is locked first)."""
    body = {**SMALL, "maxJobs": 1}
    replies = await asyncio.gather(*[post(harness, body, "last-slot") for _ in range(20)])
    assert [reply.status_code for reply in replies] == [200] * 20
    assert len({reply.json()["jobid"] for reply in replies}) == 1
    await harness.wait(replies[0].json()["jobid"])


async def test_a_replay_needs_no_dns(settings: Settings) -> None:
    """The replyUrl's host is looked up for a new job only: a retried submit gets its job
    even while the resolver is down."""
    gated = GatedEngine()  # the job never ends here: nothing is sent to the public address
    async with open_harness(settings, engines={**BUILTIN, "procedural": gated.factory}) as harness:
        harness.service.submissions.resolver = public_dns
        body = {**SMALL, "replyUrl": "https://hooks.example/dreamina"}
        first = await post(harness, body, "dns")
        assert first.status_code == 200

        async def down(host: str, port: int) -> list[str]:
            raise OSError("Temporary failure in name resolution")

        harness.service.submissions.resolver = down
        again = await post(harness, body, "dns")
        assert again.status_code == 200
        assert again.json()["jobid"] == first.json()["jobid"]
        fresh = await post(harness, body, "dns-2")
        assert fresh.status_code == 400
        assert "host hooks.example does not resolve" in fresh.json()["error"]
