"""A shutdown never waits for a job to end: `?wait=` requests and event streams on a job that is
still running answer with the record as it is and end when the app starts to shut down."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import AsyncExitStack

import pytest
from receiver import Answer, receiving
from support import SMALL, FakeClock, GatedEngine, eventually, open_harness, wait_started

from dreamserve.engines.registry import BUILTIN
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

# Seconds: the job itself would run until the gate opens (never, here) and the wait is 60 s.
# The bound covers the whole lifespan exit (runners stopped, pools closed), which a loaded
# machine may take more than the 2 s it was to do; 10 s is still far from either.
PROMPTLY = 10.0


async def test_a_wait_on_a_running_job_returns_its_record_when_the_app_shuts_down(
    settings: Settings,
) -> None:
    gated = GatedEngine()
    async with AsyncExitStack() as stack:
        harness = await stack.enter_async_context(
            open_harness(settings, engines={**BUILTIN, "procedural": gated.factory})
        )
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(gated, 1)
        waiting = asyncio.create_task(
            harness.client.get(f"/v1/dreamina/images/{jobid}?wait=60", headers=harness.auth)
        )
        await eventually(lambda: jobid in harness.server.events._watches)
        stopped_at = time.monotonic()
        await stack.aclose()  # the lifespan's exit
        reply = await asyncio.wait_for(waiting, PROMPTLY)
    assert time.monotonic() - stopped_at < PROMPTLY
    assert reply.status_code == 200
    assert (reply.json()["jobid"], reply.json()["status"]) == (jobid, "created")


async def test_an_event_stream_on_a_running_job_ends_when_the_app_shuts_down(
    settings: Settings,
) -> None:
    gated = GatedEngine()
    async with AsyncExitStack() as stack:
        harness = await stack.enter_async_context(
            open_harness(settings, engines={**BUILTIN, "procedural": gated.factory})
        )
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(gated, 1)
        # httpx's ASGI transport returns once the whole body is sent: when the stream ends.
        streaming = asyncio.create_task(
            harness.client.get(f"/v1/dreamina/images/{jobid}/events", headers=harness.auth)
        )
        await eventually(lambda: jobid in harness.server.events._watches)
        stopped_at = time.monotonic()
        await stack.aclose()
        reply = await asyncio.wait_for(streaming, PROMPTLY)
    assert time.monotonic() - stopped_at < PROMPTLY
    assert reply.status_code == 200
    events = [block for block in reply.text.split("\n\n") if block.startswith("event:")]
    assert events, reply.text
    name, data = events[-1].split("\n", 1)
    assert name == "event: progress"
    last = json.loads(data.removeprefix("data: "))
    assert (last["jobid"], last["status"]) == (jobid, "created")


async def test_a_webhook_try_cut_short_by_the_shutdown_is_sent_at_the_next_start(
    settings: Settings,
) -> None:
    """The receiver has the request when the server shuts down: the try is given up, not
    recorded, and its delivery is due again at once rather than when its claim would have
    run out (the clock stands still here: a claim left held would never run out)."""
    settings = settings.model_copy(update={"webhook_allow_private": True})
    clock = FakeClock()
    hold = threading.Event()
    with receiving() as receiver:
        receiver.plan.append(Answer(until=hold))
        try:
            async with open_harness(settings, clock=clock) as harness:
                reply = await harness.post({**SMALL, "replyUrl": receiver.url})
                jobid = reply.json()["jobid"]
                await eventually(lambda: receiver.count() == 1)
        finally:
            hold.set()
        async with open_harness(settings, clock=clock) as harness:
            await eventually(lambda: receiver.count() == 2)
            await harness.server.deliverer.drain()
            [delivery] = (await harness.call("GET", f"/images/{jobid}/webhooks")).json()[
                "deliveries"
            ]
    assert delivery["status"] == "delivered"
    assert [attempt["statusCode"] for attempt in delivery["tries"]] == [200]
    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == delivery["webhookId"]
