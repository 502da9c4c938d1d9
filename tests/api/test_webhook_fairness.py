"""Webhooks shared fairly: the per-user and per-host caps on tries in flight, and the cooldown of
a receiver host that gets no answer. Real HTTP receivers on 127.0.0.1 (tests/receiver.py); what
is asserted is who got what, and in which order, never how long it took."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from receiver import Receiver, receiving
from sqlalchemy import insert
from support import SMALL, FakeClock, Harness, eventually, open_harness, refused_port

from dreamserve.jobs import millis
from dreamserve.settings import Settings
from dreamserve.storage import webhook_claims, webhook_queries
from dreamserve.storage.tables import webhook_deliveries, webhook_hosts
from dreamserve.storage.webhook_claims import Fairness
from dreamserve.storage.webhook_queries import Try
from dreamserve.webhooks.rules import HOST_COOLDOWN, HOST_FAILURES, JITTER, RETRY_DELAYS

pytestmark = pytest.mark.anyio

NO_ANSWER = "No answer within 1 s"


def fair(settings: Settings, **changes: object) -> Settings:
    """Webhooks to 127.0.0.1 allowed (the receivers), with the given caps and timeout."""
    return settings.model_copy(update={"webhook_allow_private": True, **changes})


async def submit(harness: Harness, url: str, token: str | None = None) -> str:
    reply = await harness.post({**SMALL, "replyUrl": url}, token)
    assert reply.status_code == 200, reply.text
    jobid = str(reply.json()["jobid"])

    async def ended() -> bool:
        return (await harness.get(jobid, token)).json()["status"] != "created"

    await until_true(ended)
    return jobid


async def deliveries(
    harness: Harness, jobid: str, token: str | None = None
) -> list[dict[str, Any]]:
    reply = await harness.call("GET", f"/images/{jobid}/webhooks", token=token)
    assert reply.status_code == 200, reply.text
    return list(reply.json()["deliveries"])


async def only(harness: Harness, jobid: str, token: str | None = None) -> dict[str, Any]:
    [delivery] = await deliveries(harness, jobid, token)
    return delivery


async def until_true(check: Any, seconds: float = 20) -> None:
    """Wait until the async `check()` holds (a generous bound: the assertions are on states)."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {seconds} s")
        await asyncio.sleep(0.02)


@contextmanager
def hanging(count: int) -> Iterator[list[Receiver]]:
    """`count` receivers that accept requests and answer none until the test ends."""
    with ExitStack() as stack:
        receivers = [stack.enter_context(receiving()) for _ in range(count)]
        for receiver in receivers:
            receiver.gate.clear()
        yield receivers


@pytest.mark.both_databases
async def test_a_user_whose_receivers_never_answer_holds_only_its_share(
    settings: Settings,
) -> None:
    """User A's six webhooks go to two receivers that never answer (each try would hold its
    place for the whole 30 s timeout); user B's goes to a healthy receiver. With 4 places and
    2 per user, A holds 2 and B's is delivered while A's are still hanging."""
    hooks = fair(
        settings,
        webhook_timeout_seconds=30.0,
        webhook_concurrency=4,
        webhook_concurrency_per_user=2,
        webhook_concurrency_per_host=4,
    )
    async with open_harness(hooks) as harness:
        with hanging(2) as silent, receiving() as healthy:
            a_jobs = [await submit(harness, silent[i % 2].url) for i in range(6)]
            await eventually(lambda: sum(r.active for r in silent) == 2)
            assert await harness.server.deliverer.deliver_due() == 0  # A is at its cap
            b_token = await harness.new_user()
            b_job = await submit(harness, healthy.url, b_token)

            async def b_delivered() -> bool:
                return (await only(harness, b_job, b_token))["status"] == "delivered"

            await until_true(b_delivered)
            assert healthy.count() == 1
            # ...while A's first tries were still held, unanswered, and A's others waited.
            assert sum(r.active for r in silent) == 2
            assert sum(r.peak for r in silent) == 2
            a_tries = [len((await only(harness, jobid))["tries"]) for jobid in a_jobs]
            assert a_tries == [0] * 6
            for receiver in silent:
                receiver.gate.set()

            async def a_delivered() -> bool:
                found = [await only(harness, jobid) for jobid in a_jobs]
                return all(d["status"] == "delivered" for d in found)

            await until_true(a_delivered)
            assert sum(r.count() for r in silent) == 6


@pytest.mark.both_databases
async def test_tries_to_one_host_never_exceed_its_cap_whoever_sends_them(
    settings: Settings,
) -> None:
    hooks = fair(
        settings,
        webhook_timeout_seconds=30.0,
        webhook_concurrency=16,
        webhook_concurrency_per_user=16,
        webhook_concurrency_per_host=2,
    )
    async with open_harness(hooks) as harness:
        other = await harness.new_user()
        with receiving() as receiver:
            receiver.gate.clear()  # every try is held until the gate opens
            jobs = [await submit(harness, receiver.url) for _ in range(4)]
            jobs += [await submit(harness, receiver.url, other) for _ in range(4)]
            await eventually(lambda: receiver.active == 2)
            assert await harness.server.deliverer.deliver_due() == 0  # all due, host at its cap
            assert receiver.active == 2
            receiver.gate.set()
            await eventually(lambda: receiver.count() == 8 and receiver.active == 0)
            assert receiver.peak == 2


@pytest.mark.both_databases
async def test_a_host_that_never_answers_is_backed_off_without_spending_tries(
    settings: Settings,
) -> None:
    """Tries to a receiver that accepts and never answers time out (1 s). After HOST_FAILURES
    of them in a row the host cools down: its deliveries wait (their tries unspent, `nextTry`
    the cooldown's end); then one try probes it; a probe without answer doubles the cooldown;
    one answered ends it, and the waiting deliveries go, each with its first try."""
    clock = FakeClock()
    hooks = fair(settings, webhook_timeout_seconds=1.0, webhook_concurrency_per_host=1)
    async with open_harness(hooks, clock=clock) as harness:
        deliverer = harness.server.deliverer
        with receiving() as receiver:
            receiver.gate.clear()
            jobs = [await submit(harness, receiver.url) for _ in range(5)]

            async def tries() -> list[int]:
                return [len((await only(harness, jobid))["tries"]) for jobid in jobs]

            async def failed_thrice() -> bool:
                return sum(await tries()) == HOST_FAILURES

            await until_true(failed_thrice)
            await deliverer.drain()
            clock.advance(RETRY_DELAYS[0] * (1 + JITTER) + 1)  # every delivery is due again
            assert await deliverer.deliver_due() == 0  # but the host cools down
            assert receiver.count() == HOST_FAILURES
            assert await tries() == [1, 1, 1, 0, 0]  # the last two were never tried
            found = [await only(harness, jobid) for jobid in jobs]
            assert {d["status"] for d in found} == {"pending"}
            assert [t["error"] for d in found for t in d["tries"]] == [NO_ANSWER] * 3
            ends = {d["nextTry"] for d in found}
            assert len(ends) == 1  # all wait for the cooldown's end
            last_try = datetime.fromisoformat(found[2]["tries"][0]["at"])
            cooled = datetime.fromisoformat(ends.pop()) - last_try
            assert cooled >= timedelta(seconds=HOST_COOLDOWN)

            clock.now = datetime.fromisoformat(found[0]["nextTry"])  # the cooldown ends
            deliverer.wake()

            async def probed() -> bool:
                return sum(await tries()) == HOST_FAILURES + 1

            await until_true(probed)
            await deliverer.drain()
            assert await deliverer.deliver_due() == 0  # cooling down again
            assert await tries() == [2, 1, 1, 0, 0]  # one probe: the earliest due
            assert receiver.count() == HOST_FAILURES + 1
            after_probe = [await only(harness, jobid) for jobid in jobs]
            probe_at = datetime.fromisoformat(after_probe[0]["tries"][1]["at"])
            waiting = {d["nextTry"] for d in after_probe[1:]}
            assert len(waiting) == 1
            longer = datetime.fromisoformat(waiting.pop()) - probe_at
            assert longer >= timedelta(seconds=2 * HOST_COOLDOWN)  # doubled

            receiver.gate.set()  # the receiver answers again
            clock.now = max(datetime.fromisoformat(d["nextTry"]) for d in after_probe)
            deliverer.wake()

            async def all_delivered() -> bool:
                found = [await only(harness, jobid) for jobid in jobs]
                return all(d["status"] == "delivered" for d in found)

            await until_true(all_delivered)
            assert await tries() == [3, 2, 2, 1, 1]
            assert receiver.count() == 9


async def test_a_host_refusing_connections_is_backed_off_too(settings: Settings) -> None:
    clock = FakeClock()
    # Refused at once: the timeout is never needed, and a 1 s one was overrun once by a loaded
    # machine (the try then ends as no answer, not as the refusal this test is about).
    hooks = fair(settings, webhook_timeout_seconds=30.0, webhook_concurrency_per_host=1)
    with refused_port() as port:
        async with open_harness(hooks, clock=clock) as harness:
            url = f"http://127.0.0.1:{port}/hook"  # nothing listens there
            jobs = [await submit(harness, url) for _ in range(4)]

            async def tries() -> list[int]:
                return [len((await only(harness, jobid))["tries"]) for jobid in jobs]

            async def failed_thrice() -> bool:
                return sum(await tries()) == HOST_FAILURES

            await until_true(failed_thrice)
            await harness.server.deliverer.drain()
            assert await harness.server.deliverer.deliver_due() == 0
            assert await tries() == [1, 1, 1, 0]
            errors = [(await only(harness, jobid))["tries"][0]["error"] for jobid in jobs[:3]]
            assert all(str(error).startswith("ConnectError") for error in errors), errors


async def test_a_redelivery_ends_the_cooldown_of_its_host(settings: Settings) -> None:
    clock = FakeClock()
    hooks = fair(settings, webhook_timeout_seconds=1.0, webhook_concurrency_per_host=1)
    async with open_harness(hooks, clock=clock) as harness:
        with receiving() as receiver:
            receiver.gate.clear()
            jobs = [await submit(harness, receiver.url) for _ in range(4)]

            async def tried() -> int:
                return sum([len((await only(harness, jobid))["tries"]) for jobid in jobs])

            async def failed_thrice() -> bool:
                return await tried() == HOST_FAILURES

            await until_true(failed_thrice)
            await harness.server.deliverer.drain()
            receiver.gate.set()  # answers again, but the host cools down: nothing goes
            assert await harness.server.deliverer.deliver_due() == 0
            reply = await harness.call("POST", f"/images/{jobs[3]}/webhooks")
            assert reply.status_code == 200

            async def redelivered() -> bool:
                return (await only(harness, jobs[3]))["status"] == "delivered"

            await until_true(redelivered)
            assert (await only(harness, jobs[3]))["tries"][0]["statusCode"] == 200


# The claim itself, on rows set up directly: who is taken, in which order.


@pytest.fixture
async def claims(settings: Settings) -> Any:
    async with open_harness(settings) as harness:
        yield harness


async def outbox(harness: Harness, rows: list[tuple[int, str]], now: int) -> None:
    """Deliveries due from `now` on in this order, for (user, host) each. Far in the
    deliverer's future: it leaves them alone."""
    reply = await harness.post(SMALL)
    job_id = await harness.server.db.read(lambda conn: _job_id(conn, reply.json()["jobid"]))
    statements = [
        insert(webhook_deliveries).values(
            job_id=job_id,
            user_id=user,
            message_id=f"msg_{index}",
            url=f"http://{host}/",
            host=host,
            status="pending",
            tries=0,
            next_at=now + index,
            created_at=now,
            updated_at=now,
        )
        for index, (user, host) in enumerate(rows)
    ]
    await harness.execute(*statements)


def _job_id(conn: Any, jobid: str) -> int:
    from dreamserve.storage import job_queries

    job = job_queries.job_by_jobid(conn, jobid, 1)
    assert job is not None
    return job.id


async def claim(
    harness: Harness, now: int, limit: int, fairness: Fairness
) -> tuple[list[tuple[int, str]], bool]:
    claimed, left = await harness.server.db.write(
        lambda conn: webhook_claims.claim_due(conn, now, now + 60_000, limit, 10, fairness)
    )
    return [(d.user_id, d.host) for d in claimed], left


LATER = millis(datetime.now() + timedelta(days=3650))


@pytest.mark.both_databases
async def test_a_claim_skips_users_and_hosts_at_their_caps_in_due_order(claims: Harness) -> None:
    a, b = [(await claims.service.tokens.create())[0] for _ in range(2)]
    rows = [(a, "a1:80")] * 5 + [(a, "a2:80")] * 5 + [(b, "a1:80"), (b, "b:80")]
    await outbox(claims, rows, LATER)
    now = LATER + len(rows)
    fairness = Fairness(per_user=3, per_host=2, probe_after=HOST_FAILURES)
    taken, left = await claim(claims, now, 10, fairness)
    assert taken == [(a, "a1:80"), (a, "a1:80"), (a, "a2:80"), (b, "b:80")]
    assert left  # A's others are due, at their cap
    # The tries in flight count at the next claim, on any node: nothing more for A, nor a1.
    taken, left = await claim(claims, now, 10, fairness)
    assert taken == []
    assert left


@pytest.mark.both_databases
async def test_a_claim_reaches_past_a_long_backlog_of_a_capped_user(claims: Harness) -> None:
    a, b = [(await claims.service.tokens.create())[0] for _ in range(2)]
    rows = [(a, f"a{i % 9}:80") for i in range(400)] + [(b, "b:80")]
    await outbox(claims, rows, LATER)
    taken, left = await claim(claims, LATER + len(rows), 4, Fairness(2, 4, HOST_FAILURES))
    assert taken == [(a, "a0:80"), (a, "a1:80"), (b, "b:80")]
    assert left


@pytest.mark.both_databases
async def test_a_cooling_host_is_skipped_and_a_failing_one_gets_one_try(claims: Harness) -> None:
    a = (await claims.service.tokens.create())[0]
    rows = [(a, "cool:80")] * 3 + [(a, "probe:80")] * 3 + [(a, "ok:80")] * 3
    await outbox(claims, rows, LATER)
    now = LATER + len(rows)
    await claims.execute(
        insert(webhook_hosts).values(
            host="cool:80", failures=HOST_FAILURES, cooldown_until=now + 5000, updated_at=now
        ),
        insert(webhook_hosts).values(
            host="probe:80", failures=HOST_FAILURES + 2, cooldown_until=now, updated_at=now
        ),
    )
    taken, _ = await claim(claims, now, 10, Fairness(10, 2, HOST_FAILURES))
    assert taken == [(a, "probe:80"), (a, "ok:80"), (a, "ok:80")]
    waiting = await claims.server.db.read(
        lambda conn: conn.execute(
            webhook_deliveries.select().where(webhook_deliveries.c.host == "cool:80")
        ).all()
    )
    assert [(row.tries, row.next_at) for row in waiting] == [(0, now + 5000)] * 3


@pytest.mark.both_databases
async def test_a_try_recorded_after_a_redelivery_gives_its_place_back(claims: Harness) -> None:
    """The try's record leaves a redelivered delivery due (it is sent again), and its hold
    ends: a hold left behind would count against the user's cap until it ran out."""
    a = (await claims.service.tokens.create())[0]
    await outbox(claims, [(a, "h:80")], LATER)
    now = LATER + 1
    fairness = Fairness(per_user=1, per_host=1, probe_after=HOST_FAILURES)
    [delivery], _ = await claims.server.db.write(
        lambda conn: webhook_claims.claim_due(conn, now, now + 60_000, 1, 10, fairness)
    )
    await claims.execute(webhook_deliveries.update().values(next_at=now))  # redelivered
    attempt = Try(now, 200, None, 5)
    await claims.server.db.write(
        lambda conn: webhook_queries.record_try(
            conn, delivery, attempt, status="delivered", next_at=None
        )
    )
    taken, _ = await claim(claims, now, 1, fairness)
    assert taken == [(a, "h:80")]  # sent again, the user's one place free
