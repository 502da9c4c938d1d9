"""Webhooks end to end: the outbox, retries on an injected clock, signatures, the address guard
at submit and at delivery, the deliveries API and redelivery. The receiver is real HTTP on
127.0.0.1 (tests/receiver.py)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from receiver import Answer, receiving
from sqlalchemy import func, select
from standardwebhooks import Webhook
from support import (
    SMALL,
    FakeClock,
    GatedEngine,
    Harness,
    eventually,
    fake_dns,
    free_port,
    open_harness,
    public_dns,
    refused_port,
    wait_started,
)

from dreamserve.engines.registry import BUILTIN
from dreamserve.settings import Settings
from dreamserve.storage.tables import webhook_deliveries
from dreamserve.webhooks.rules import JITTER, RETRY_DELAYS, TRIES

pytestmark = pytest.mark.anyio


@pytest.fixture
def private(settings: Settings) -> Settings:
    """The settings with webhooks to 127.0.0.1 allowed (the receiver), and a timeout that a
    receiver that answers never meets, however loaded the machine (a 1 s one did: 'pending'
    where a 410 should have stopped the delivery). `hasty` has a short one."""
    return settings.model_copy(
        update={"webhook_allow_private": True, "webhook_timeout_seconds": 30.0}
    )


@pytest.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def hooks(private: Settings, clock: FakeClock) -> AsyncIterator[Harness]:
    async with open_harness(private, clock=clock) as harness:
        yield harness


@pytest.fixture
async def hasty(private: Settings, clock: FakeClock) -> AsyncIterator[Harness]:
    """A 1 s webhook timeout: for the receivers that answer too slowly on purpose."""
    short = private.model_copy(update={"webhook_timeout_seconds": 1.0})
    async with open_harness(short, clock=clock) as harness:
        yield harness


async def submit(harness: Harness, url: str, **extra: object) -> str:
    reply = await harness.post({**SMALL, "replyUrl": url, "replyRef": "ref-1", **extra})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["jobid"])


async def deliveries(harness: Harness, jobid: str) -> list[dict[str, object]]:
    reply = await harness.call("GET", f"/images/{jobid}/webhooks")
    assert reply.status_code == 200, reply.text
    assert reply.json()["jobid"] == jobid
    return list(reply.json()["deliveries"])


async def settled(harness: Harness, jobid: str, tries: int) -> dict[str, object]:
    """The job's only delivery, once it has `tries` tries recorded."""
    found: list[dict[str, object]] = []

    async def check() -> bool:
        found[:] = await deliveries(harness, jobid)
        return len(found) == 1 and len(found[0]["tries"]) == tries  # type: ignore[arg-type]

    for _ in range(500):
        if await check():
            return found[0]
        await harness.server.deliverer.drain()
        await asyncio.sleep(0.01)
    raise AssertionError(f"deliveries of {jobid}: {found}")


@pytest.mark.both_databases
async def test_a_completed_job_is_posted_once_with_its_record(hooks: Harness) -> None:
    with receiving() as receiver:
        jobid = await submit(hooks, f"{receiver.url}/hook")
        record = await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        assert receiver.count() == 1
        sent = receiver.received[0]
        assert sent.path == "/hook"
        assert sent.headers["content-type"] == "application/json"
        assert sent.json == record  # the record as GET returns it
        assert sent.json["request"]["replyRef"] == "ref-1"
        assert delivery["status"] == "delivered"
        assert delivery["webhookId"] == sent.headers["webhook-id"]
        assert delivery["url"] == f"{receiver.url}/hook"
        assert delivery["nextTry"] is None
        [attempt] = delivery["tries"]  # type: ignore[misc]
        assert attempt["statusCode"] == 200
        assert attempt["error"] is None


async def test_deliveries_verify_with_the_users_secret(hooks: Harness) -> None:
    secret = (await hooks.call("GET", "/webhooks/secret")).json()
    assert set(secret) == {"secret"}
    assert secret["secret"].startswith("whsec_")
    again = (await hooks.call("GET", "/webhooks/secret")).json()
    assert again == secret
    with receiving() as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        await settled(hooks, jobid, 1)
        sent = receiver.received[0]
        payload = Webhook(secret["secret"]).verify(sent.body, sent.headers)
        assert payload["jobid"] == jobid
        assert payload["status"] == "completed"
        other = (await hooks.call("GET", "/webhooks/secret", token=await hooks.new_user())).json()
        assert other["secret"] != secret["secret"]
        with pytest.raises(Exception, match="No matching signature"):
            Webhook(other["secret"]).verify(sent.body, sent.headers)


async def test_a_rotated_secret_signs_beside_the_new_one_for_a_day(
    hooks: Harness, clock: FakeClock
) -> None:
    old = (await hooks.call("GET", "/webhooks/secret")).json()["secret"]
    rotated = await hooks.call("POST", "/webhooks/secret")
    assert rotated.status_code == 200
    new = rotated.json()["secret"]
    assert new != old
    assert new.startswith("whsec_")
    assert rotated.json()["previousSecretExpires"].endswith("Z")
    with receiving() as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        await settled(hooks, jobid, 1)
        sent = receiver.received[0]
        assert len(sent.headers["webhook-signature"].split(" ")) == 2
        for key in (old, new):
            assert Webhook(key).verify(sent.body, sent.headers)["jobid"] == jobid

        clock.advance(86_400 + 1)  # the previous secret no longer signs
        assert (await hooks.call("GET", "/webhooks/secret")).json() == {"secret": new}
        redelivered = await hooks.call("POST", f"/images/{jobid}/webhooks")
        assert redelivered.status_code == 200
        await eventually(lambda: receiver.count() == 2)
        signatures = receiver.received[1].headers["webhook-signature"].split(" ")
        assert len(signatures) == 1


@pytest.mark.both_databases
async def test_failures_are_retried_on_the_schedule_until_a_2xx(
    hooks: Harness, clock: FakeClock
) -> None:
    with receiving() as receiver:
        receiver.plan = [Answer(500, b"boom"), Answer(503), Answer(404, b"not deployed yet")]
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        assert delivery["status"] == "pending"
        for tries, delay in enumerate(RETRY_DELAYS[:3], start=1):
            delivery = await settled(hooks, jobid, tries)
            first_try = datetime.fromisoformat(str(delivery["tries"][-1]["at"]))  # type: ignore[index]
            next_try = datetime.fromisoformat(str(delivery["nextTry"]))
            waited = (next_try - first_try).total_seconds()
            assert delay * (1 - JITTER) - 0.01 <= waited <= delay * (1 + JITTER) + 0.01
            clock.advance(delay * (1 - JITTER) - 1)  # not due yet: nothing is sent
            hooks.server.deliverer.wake()
            await hooks.server.deliverer.deliver_due()
            assert receiver.count() == tries
            clock.advance(delay * 2 * JITTER + 2)
            hooks.server.deliverer.wake()
        delivery = await settled(hooks, jobid, 4)
        assert delivery["status"] == "delivered"
        errors = [attempt["error"] for attempt in delivery["tries"]]  # type: ignore[attr-defined]
        assert errors == ["HTTP 500: boom", "HTTP 503: ok", "HTTP 404: not deployed yet", None]
        codes = [attempt["statusCode"] for attempt in delivery["tries"]]  # type: ignore[attr-defined]
        assert codes == [500, 503, 404, 200]
        ids = {each.headers["webhook-id"] for each in receiver.received}
        assert len(ids) == 1  # the same webhook-id on every try
        assert receiver.count() == 4


async def test_a_receiver_that_never_answers_2xx_is_given_up_after_the_whole_schedule(
    hooks: Harness, clock: FakeClock
) -> None:
    with receiving(Answer(500)) as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        started = clock()
        for tries in range(1, TRIES + 1):
            delivery = await settled(hooks, jobid, tries)
            if tries < TRIES:
                assert delivery["status"] == "pending"
                clock.now = datetime.fromisoformat(str(delivery["nextTry"]))
                hooks.server.deliverer.wake()
        assert delivery["status"] == "failed"
        assert delivery["nextTry"] is None
        assert receiver.count() == TRIES
        assert (clock() - started).total_seconds() >= 24 * 3600


async def test_410_stops_delivery(hooks: Harness, clock: FakeClock) -> None:
    with receiving(Answer(410, b"gone")) as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        assert delivery["status"] == "stopped"
        assert delivery["nextTry"] is None
        clock.advance(3600)
        hooks.server.deliverer.wake()
        await hooks.server.deliverer.deliver_due()
        assert receiver.count() == 1


async def test_a_redirect_is_not_followed_but_retried(hooks: Harness) -> None:
    with receiving() as target, receiving() as receiver:
        receiver.plan = [Answer(302, b"", location=f"{target.url}/elsewhere")]
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        assert delivery["status"] == "pending"
        assert delivery["tries"][0]["statusCode"] == 302  # type: ignore[index]
        assert target.count() == 0


async def test_a_hanging_receiver_times_out_and_is_retried(hasty: Harness) -> None:
    with receiving() as receiver:
        receiver.plan = [Answer(200, delay=3.0)]  # longer than the 1 s timeout of `hasty`
        jobid = await submit(hasty, receiver.url)
        await hasty.wait(jobid)
        delivery = await settled(hasty, jobid, 1)
        assert delivery["status"] == "pending"
        [attempt] = delivery["tries"]  # type: ignore[misc]
        assert attempt["statusCode"] is None
        assert attempt["error"] == "No answer within 1 s"
        assert 900 <= attempt["durationMs"] < 3000


async def test_a_slow_answer_within_the_timeout_is_delivered(hooks: Harness) -> None:
    with receiving(Answer(200, delay=0.3)) as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        assert delivery["status"] == "delivered"
        assert delivery["tries"][0]["durationMs"] >= 300  # type: ignore[index]


async def test_only_the_start_of_a_large_answer_is_read(hooks: Harness) -> None:
    with receiving(Answer(500, b"x" * 5_000_000)) as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        error = delivery["tries"][0]["error"]  # type: ignore[index]
        assert error == "HTTP 500: " + "x" * 1024
        assert receiver.count() == 1


async def test_an_unreachable_receiver_is_a_recorded_network_error(hooks: Harness) -> None:
    # Refused for as long as the test lasts: a closed receiver's port was taken once by another
    # test's listener, which never answered ('No answer within 1 s', not ConnectError).
    with refused_port() as port:
        jobid = await submit(hooks, f"http://127.0.0.1:{port}/hook")
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
    assert delivery["status"] == "pending"
    assert str(delivery["tries"][0]["error"]).startswith("ConnectError")  # type: ignore[index]


async def test_failed_and_cancelled_jobs_are_delivered_too(private: Settings) -> None:
    gated = GatedEngine()
    engines = {**BUILTIN, "procedural": gated.factory}
    async with open_harness(private, engines=engines) as harness:
        with receiving() as receiver:
            jobid = await submit(harness, receiver.url)
            await wait_started(gated, 1)
            cancelled = await harness.call("DELETE", f"/scheduler/{jobid}")
            assert cancelled.status_code == 200
            await settled(harness, jobid, 1)
            sent = receiver.received[0].json
            assert sent["status"] == "failed"
            assert sent["error"] == "Cancelled by user"
            gated.gate.set()


@pytest.mark.both_databases
async def test_jobs_ended_by_deleting_their_account_are_delivered(private: Settings) -> None:
    gated = GatedEngine()
    engines = {**BUILTIN, "procedural": gated.factory}
    async with open_harness(private, engines=engines) as harness:
        await harness.put_account({"account": "US:mine", "engine": "procedural", "maxJobs": 2})
        with receiving() as receiver:
            jobid = await submit(harness, receiver.url, account="US:mine")
            await wait_started(gated, 1)
            assert (await harness.call("DELETE", "/accounts/US:mine")).status_code == 200
            await settled(harness, jobid, 1)
            sent = receiver.received[0].json
            assert sent["errorDetails"] == "Account US:mine was deleted"
            gated.gate.set()


async def test_a_job_without_reply_url_queues_nothing(hooks: Harness) -> None:
    reply = await hooks.post(SMALL)
    jobid = reply.json()["jobid"]
    await hooks.wait(jobid)
    assert await deliveries(hooks, jobid) == []
    count = await hooks.server.db.read(
        lambda conn: conn.execute(select(func.count()).select_from(webhook_deliveries)).scalar()
    )
    assert count == 0


@pytest.mark.both_databases
async def test_with_nothing_due_the_deliverer_only_reads(hooks: Harness) -> None:
    """Every job's end wakes the deliverer; most jobs have no webhook, and a look that finds
    nothing due must cost a read, not a write transaction."""
    writes = 0
    db = hooks.server.db
    inner = db.write

    async def write(fn: Any) -> Any:
        nonlocal writes
        writes += 1
        return await inner(fn)

    db.write = write  # type: ignore[method-assign]
    try:
        assert await hooks.server.deliverer.deliver_due() == 0
        assert writes == 0
        with receiving() as receiver:
            jobid = await submit(hooks, receiver.url)
            await hooks.wait(jobid)
            await settled(hooks, jobid, 1)
        writes = 0
        assert await hooks.server.deliverer.deliver_due() == 0  # delivered already
        assert writes == 0
    finally:
        db.write = inner  # type: ignore[method-assign]


async def test_redelivery_resends_the_same_event_now(hooks: Harness) -> None:
    with receiving() as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        await settled(hooks, jobid, 1)
        reply = await hooks.call("POST", f"/images/{jobid}/webhooks")
        assert reply.status_code == 200
        assert len(reply.json()["deliveries"]) == 2
        await eventually(lambda: receiver.count() == 2)
        first, second = receiver.received
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        assert second.json["jobid"] == jobid
        await hooks.server.deliverer.drain()
        found = await deliveries(hooks, jobid)
        assert [each["status"] for each in found] == ["delivered", "delivered"]


async def test_redelivery_errors(hooks: Harness) -> None:
    plain = (await hooks.post(SMALL)).json()["jobid"]
    await hooks.wait(plain)
    reply = await hooks.call("POST", f"/images/{plain}/webhooks")
    assert reply.status_code == 400
    assert reply.json() == {"error": f"Job {plain} has no replyUrl"}
    for method in ("GET", "POST"):
        missing = await hooks.call(method, "/images/no-such-job/webhooks")
        assert missing.status_code == 404
        assert missing.json() == {"error": "Job no-such-job not found"}
    with receiving() as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        other = await hooks.new_user()
        foreign = await hooks.call("GET", f"/images/{jobid}/webhooks", token=other)
        assert foreign.status_code == 404


async def test_redelivery_of_an_unfinished_job_is_refused(private: Settings) -> None:
    gated = GatedEngine()
    engines = {**BUILTIN, "procedural": gated.factory}
    async with open_harness(private, engines=engines) as harness:
        jobid = await submit(harness, "http://127.0.0.1:9/hook")
        reply = await harness.call("POST", f"/images/{jobid}/webhooks")
        assert reply.status_code == 400
        assert reply.json() == {
            "error": f"Job {jobid} has not ended: its record is sent when it does"
        }
        gated.gate.set()
        await harness.wait(jobid)


PRIVATE_URLS = [
    ("http://127.0.0.1:8000/hook", "127.0.0.1 is a loopback address"),
    ("http://10.1.2.3/hook", "10.1.2.3 is a private address"),
    ("http://192.168.0.1/hook", "192.168.0.1 is a private address"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is a cloud metadata address"),
    ("http://[::1]:8000/hook", "::1 is a loopback address"),
    ("http://[fe80::1]/hook", "fe80::1 is a link-local address"),
    ("http://localhost:8000/hook", "localhost resolves to 127.0.0.1, a loopback address"),
]


@pytest.mark.parametrize(("url", "why"), PRIVATE_URLS)
async def test_private_reply_urls_are_refused_at_submit(
    harness: Harness, url: str, why: str
) -> None:
    before = await harness.slots()
    reply = await harness.post({**SMALL, "replyUrl": url})
    assert reply.status_code == 400
    assert reply.json() == {
        "error": f"Parameter replyUrl ({url}) valid values: an http or https URL of a public "
        f"host ({why})"
    }
    assert await harness.slots() == before


async def test_a_public_address_is_accepted_at_submit(settings: Settings) -> None:
    gated = GatedEngine()  # the job never ends while the test runs: nothing is sent
    async with open_harness(settings, engines={**BUILTIN, "procedural": gated.factory}) as harness:
        literal = await harness.post({**SMALL, "replyUrl": "http://93.184.216.34/hook"})
        assert literal.status_code == 200
        harness.service.submissions.resolver = public_dns
        named = await harness.post({**SMALL, "replyUrl": "https://hooks.example/dreamina"})
        assert named.status_code == 200
        assert named.json()["request"]["replyUrl"] == "https://hooks.example/dreamina"


async def test_upscale_reply_urls_are_checked_too(harness: Harness) -> None:
    source = (await harness.post(SMALL)).json()["jobid"]
    await harness.wait(source)
    body = {"jobid": source, "upscaleResolution": "2k", "replyUrl": "http://10.0.0.1/x"}
    reply = await harness.call("POST", "/images/upscale", body)
    assert reply.status_code == 400
    assert "10.0.0.1 is a private address" in reply.json()["error"]


@pytest.mark.parametrize(
    ("host", "error"),
    [
        ("127.0.0.1", "Refused: 127.0.0.1 is a loopback address"),
        ("localhost", "Refused: localhost resolves to 127.0.0.1, a loopback address"),
    ],
)
async def test_the_address_is_checked_again_at_delivery(
    private: Settings, host: str, error: str
) -> None:
    """A replyUrl accepted at submit (here: while the operator allowed private addresses) is
    refused when the delivery finds it private, after resolving it: as after a DNS change."""
    with receiving() as receiver:
        receiver.default = Answer(503)
        url = receiver.url.replace("127.0.0.1", host)
        async with open_harness(private) as harness:
            jobid = await submit(harness, url)
            await harness.wait(jobid)
            await settled(harness, jobid, 1)
        guarded = replace_settings(private, webhook_allow_private=False)
        async with open_harness(guarded) as harness:
            await harness.execute(
                webhook_deliveries.update().values(next_at=0)  # due now
            )
            harness.server.deliverer.wake()
            delivery = await settled(harness, jobid, 2)
            assert delivery["status"] == "refused"
            assert delivery["tries"][1]["error"] == error  # type: ignore[index]
            assert delivery["tries"][1]["statusCode"] is None  # type: ignore[index]
        assert receiver.count() == 1


LOOPBACK_REFUSED = "Refused: localhost resolves to 127.0.0.1, a loopback address"


async def test_a_refused_receiver_is_never_connected_to_and_ends_alike_open_or_closed(
    settings: Settings,
) -> None:
    """At delivery the receiver's host is resolved once and every address checked before any
    connection: a name that now points at loopback (it looked public at submit, as after DNS
    rebinding) is refused without a SYN, and the delivery ends the same whether something
    listens on the port or not, so that webhooks cannot scan the server's ports."""
    guarded = replace_settings(settings, webhook_timeout_seconds=1.0)  # private not allowed
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        ends: list[dict[str, Any]] = []
        async with open_harness(guarded) as harness:
            harness.service.submissions.resolver = public_dns  # what the name said at submit
            harness.server.deliverer.resolver = fake_dns({"localhost": ["127.0.0.1"]})
            for port in (listener.getsockname()[1], free_port()):
                jobid = await submit(harness, f"http://localhost:{port}/hook")
                await harness.wait(jobid)
                ends.append(await settled(harness, jobid, 1))
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected
    for end in ends:
        assert end["status"] == "refused"
        assert end["nextTry"] is None
        [attempt] = end["tries"]
        assert (attempt["statusCode"], attempt["error"]) == (None, LOOPBACK_REFUSED)
    assert without_identity(ends[0]) == without_identity(ends[1])


def without_identity(delivery: dict[str, Any]) -> dict[str, Any]:
    """What a delivery says of its fate, less its id, URL and times."""
    tries = [{**attempt, "at": None, "durationMs": None} for attempt in delivery["tries"]]
    return {**delivery, "webhookId": None, "url": None, "created": None, "tries": tries}


async def test_a_receiver_with_one_private_address_among_public_ones_is_refused(
    settings: Settings,
) -> None:
    """One refused address is enough: the connection could go to any of them. (Loopback
    first: a guard that let it through would connect here, never off the machine.)"""
    guarded = replace_settings(settings, webhook_timeout_seconds=1.0)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        async with open_harness(guarded) as harness:
            harness.service.submissions.resolver = public_dns
            harness.server.deliverer.resolver = fake_dns(
                {"localhost": ["127.0.0.1", "93.184.216.34"]}
            )
            jobid = await submit(harness, f"http://localhost:{listener.getsockname()[1]}/")
            await harness.wait(jobid)
            delivery = await settled(harness, jobid, 1)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert delivery["status"] == "refused"
    assert delivery["tries"][0]["error"] == LOOPBACK_REFUSED  # type: ignore[index]


async def test_the_connection_goes_to_the_checked_address_with_the_hosts_name(
    hooks: Harness,
) -> None:
    """Pinned: the TCP connection goes to the very address the check resolved (no second
    lookup), while the request keeps the URL's host name in its Host header."""
    hooks.server.deliverer.resolver = fake_dns({"receiver.test": ["127.0.0.1"]})
    with receiving() as receiver:
        port = receiver.server.server_address[1]
        jobid = await submit(hooks, f"http://receiver.test:{port}/hook")
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        assert delivery["status"] == "delivered"
        assert receiver.count("/hook") == 1
        assert receiver.received[0].headers["host"] == f"receiver.test:{port}"


def replace_settings(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update=changes)


@pytest.mark.both_databases
async def test_pending_deliveries_are_sent_after_a_restart(
    private: Settings, clock: FakeClock
) -> None:
    with receiving() as receiver:
        receiver.plan = [Answer(503)]
        async with open_harness(private, clock=clock) as harness:
            jobid = await submit(harness, receiver.url)
            await harness.wait(jobid)
            await settled(harness, jobid, 1)
        clock.advance(RETRY_DELAYS[0] * (1 + JITTER) + 1)
        async with open_harness(private, clock=clock) as harness:
            delivery = await settled(harness, jobid, 2)
            assert delivery["status"] == "delivered", delivery
        assert receiver.count() == 2


async def test_a_slow_receiver_does_not_hold_up_the_others(private: Settings) -> None:
    with receiving(Answer(200, delay=0.8)) as slow, receiving() as fast:
        async with open_harness(private) as harness:
            slow_jobs = [await submit(harness, slow.url) for _ in range(3)]
            fast_job = await submit(harness, fast.url)
            await settled(harness, fast_job, 1)
            assert fast.count() == 1
            for jobid in slow_jobs:
                await settled(harness, jobid, 1)
            assert slow.count() == 3


@pytest.mark.both_databases
async def test_a_backlog_is_sent_as_places_free_up_not_at_each_poll(private: Settings) -> None:
    """More deliveries due than tries allowed at once: each finished try makes room for the
    next at once (with a 30 s poll, waiting for it would take minutes)."""
    with receiving(Answer(200, delay=0.1)) as receiver:
        async with open_harness(private) as harness:
            deliverer = harness.server.deliverer
            deliverer.config = replace(deliverer.config, concurrency=2, poll_seconds=30)
            deliverer.wake()  # the loop takes the new poll
            jobids = [await submit(harness, receiver.url) for _ in range(8)]
            for jobid in jobids:
                await harness.wait(jobid)
            await eventually(lambda: receiver.count() == 8, 10)


@pytest.mark.both_databases
async def test_a_redelivery_during_a_try_sends_again(private: Settings) -> None:
    """The try in flight answers 200, but the redelivery asked for another: it is sent.

    The first answer is held until the redelivery was asked for (not a 0.5 s delay within the
    1 s timeout, which a loaded machine could overrun: the try timed out, no 200 in flight)."""
    asked = threading.Event()
    with receiving() as receiver:
        receiver.plan = [Answer(200, until=asked)]
        async with open_harness(private) as harness:
            jobid = await submit(harness, receiver.url)
            await harness.wait(jobid)
            await eventually(lambda: receiver.count() == 1)  # the first try is in flight
            reply = await harness.call("POST", f"/images/{jobid}/webhooks")
            asked.set()
            assert reply.status_code == 200
            delivery = await settled(harness, jobid, 2)
            assert delivery["status"] == "delivered"
            assert receiver.count() == 2


async def test_a_trickling_answer_is_bounded_by_the_timeout_and_sent_once(hasty: Harness) -> None:
    """httpx's timeout bounds each read; the try as a whole is bounded too, so a receiver
    sending its answer a byte at a time neither holds a place for ever nor gets a second
    copy when the claim runs out."""
    with receiving() as receiver:
        receiver.plan = [Answer(503, b"x" * 20, trickle=0.25)]  # 5 s of answer, 1 s timeout
        jobid = await submit(hasty, receiver.url)
        await hasty.wait(jobid)
        delivery = await settled(hasty, jobid, 1)
        [attempt] = delivery["tries"]  # type: ignore[misc]
        assert attempt["statusCode"] == 503
        assert str(attempt["error"]).startswith("HTTP 503: x")
        assert str(attempt["error"]).endswith(" (no answer within 1 s in full)")
        assert attempt["durationMs"] < 2500
        assert delivery["status"] == "pending"
        await asyncio.sleep(1.5)
        assert receiver.count() == 1


async def test_a_slow_body_after_a_2xx_is_delivered(hasty: Harness) -> None:
    with receiving(Answer(200, b"thanks!", trickle=0.4)) as receiver:
        jobid = await submit(hasty, receiver.url)
        await hasty.wait(jobid)
        delivery = await settled(hasty, jobid, 1)
        assert delivery["status"] == "delivered"
        assert receiver.count() == 1


@pytest.mark.both_databases
async def test_an_answer_the_database_cannot_keep_is_recorded_cleaned(hooks: Harness) -> None:
    with receiving(Answer(500, b"bad\x00answer\x07")) as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        assert delivery["tries"][0]["error"] == "HTTP 500: bad\ufffdanswer\ufffd"  # type: ignore[index]
        assert delivery["status"] == "pending"
        assert receiver.count() == 1


@pytest.mark.both_databases
async def test_a_try_that_fails_in_the_server_is_recorded_and_retried(
    hooks: Harness, clock: FakeClock
) -> None:
    deliverer = hooks.server.deliverer
    signing_keys = deliverer.secrets.signing_keys

    async def broken(user_id: int) -> list[str]:
        raise RuntimeError("the secrets are away")

    deliverer.secrets.signing_keys = broken  # type: ignore[method-assign]
    with receiving() as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        delivery = await settled(hooks, jobid, 1)
        assert delivery["status"] == "pending"
        assert delivery["tries"][0]["error"] == (  # type: ignore[index]
            "Delivery failed in the server: RuntimeError"
        )
        deliverer.secrets.signing_keys = signing_keys  # type: ignore[method-assign]
        clock.advance(RETRY_DELAYS[0] * (1 + JITTER) + 1)
        deliverer.wake()
        delivery = await settled(hooks, jobid, 2)
        assert delivery["status"] == "delivered"
        assert receiver.count() == 1


@pytest.mark.both_databases
async def test_a_delivery_whose_tries_all_died_unrecorded_is_given_up(hooks: Harness) -> None:
    with receiving() as receiver:
        jobid = await submit(hooks, receiver.url)
        await hooks.wait(jobid)
        await settled(hooks, jobid, 1)
        # As after TRIES crashes mid-try: every try claimed, the last one never recorded.
        await hooks.execute(
            webhook_deliveries.update().values(status="pending", tries=TRIES, next_at=0)
        )
        await hooks.server.deliverer.deliver_due()
        [delivery] = await deliveries(hooks, jobid)
        assert delivery["status"] == "failed"
        assert receiver.count() == 1


async def test_a_replayed_submit_sends_no_second_webhook(hooks: Harness) -> None:
    with receiving() as receiver:
        body = {**SMALL, "replyUrl": receiver.url}
        headers = {**hooks.auth, "Idempotency-Key": "once"}
        first = await hooks.client.post("/v1/dreamina/images", json=body, headers=headers)
        jobid = first.json()["jobid"]
        await hooks.wait(jobid)
        await settled(hooks, jobid, 1)
        again = await hooks.client.post("/v1/dreamina/images", json=body, headers=headers)
        assert again.headers["idempotent-replayed"] == "true"
        await hooks.server.deliverer.deliver_due()
        await hooks.server.deliverer.drain()
        assert len(await deliveries(hooks, jobid)) == 1
        assert receiver.count() == 1
