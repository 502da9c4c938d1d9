"""Admission: a job holds a slot from the moment it exists; 429 when none is free."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import update
from support import SMALL, GatedEngine, open_harness, wait_started

from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts

pytestmark = [pytest.mark.anyio, pytest.mark.both_databases]

CAP = 10  # LOCAL:procedural's maxJobs


@pytest.fixture
async def gated(settings: Settings):
    engine = GatedEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        yield harness, engine
        engine.gate.set()


async def test_429_when_every_slot_is_taken_with_retry_after(gated) -> None:
    harness, _ = gated
    for _ in range(CAP):
        assert (await harness.post(SMALL)).status_code == 200
    reply = await harness.post(SMALL)
    assert reply.status_code == 429
    assert reply.json() == {"error": "All accounts at capacity"}
    assert reply.headers["Retry-After"] == "5"
    named = await harness.post({**SMALL, "account": "LOCAL:procedural"})
    assert named.status_code == 429
    assert named.json() == {"error": "Account LOCAL:procedural at capacity"}
    assert named.headers["Retry-After"] == "5"
    assert await harness.slots() == {"LOCAL:procedural": CAP}


async def test_max_jobs_lowers_the_cap_of_a_shared_account_for_that_admission(gated) -> None:
    harness, _ = gated
    assert (await harness.post({**SMALL, "maxJobs": 2})).status_code == 200
    assert (await harness.post({**SMALL, "maxJobs": 2})).status_code == 200
    assert (await harness.post({**SMALL, "maxJobs": 2})).status_code == 429
    assert (await harness.post({**SMALL, "maxJobs": 3})).status_code == 200
    assert (await harness.post(SMALL)).status_code == 200  # the account's own cap again


async def test_max_jobs_cannot_raise_a_shared_accounts_cap(gated) -> None:
    harness, _ = gated
    for _ in range(CAP):
        assert (await harness.post(SMALL)).status_code == 200
    reply = await harness.post({**SMALL, "maxJobs": 50})
    assert reply.status_code == 429


async def test_running_jobs_stay_within_the_cap_and_all_slots_return(gated) -> None:
    harness, engine = gated
    replies = await asyncio.gather(*(harness.post(SMALL) for _ in range(40)))
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [200] * CAP + [429] * (40 - CAP)
    await wait_started(engine, CAP)
    assert await harness.slots() == {"LOCAL:procedural": CAP}
    engine.gate.set()
    for reply in replies:
        if reply.status_code == 200:
            record = await harness.wait(reply.json()["jobid"])
            assert record["status"] == "completed"
    assert await harness.slots() == {"LOCAL:procedural": 0}
    assert engine.started == CAP


async def test_a_running_job_shows_started_and_progress(gated) -> None:
    harness, engine = gated
    jobid = (await harness.post(SMALL)).json()["jobid"]
    await wait_started(engine, 1)
    record = (await harness.get(jobid)).json()
    assert record["status"] == "created"
    assert record["progress"] == 0
    assert record["started"] >= record["created"]
    engine.gate.set()
    done = await harness.wait(jobid)
    assert "progress" not in done
    assert "started" not in done


async def test_two_processes_on_one_database_share_the_cap(settings: Settings) -> None:
    """Two sets of parts, each with its own connections to one database (as a second API
    process would have): slots live in the database, not in memory, so the cap holds across
    them. On PostgreSQL the transactions run on pools of threads, so the slot UPDATEs really
    race; SQLite runs write transactions one at a time."""
    engine = GatedEngine()
    async with (
        open_harness(settings, engines={"procedural": engine.factory}) as first,
        open_harness(settings, engines={"procedural": engine.factory}, resume=False) as second,
    ):
        replies = await asyncio.gather(*(harness.post(SMALL) for harness in (first, second) * 15))
        assert [r.status_code for r in replies].count(200) == CAP
        assert await first.slots() == {"LOCAL:procedural": CAP}
        engine.gate.set()
        for reply in replies:
            if reply.status_code == 200:  # either server reads the shared database
                assert (await first.wait(reply.json()["jobid"]))["status"] == "completed"
        assert await second.slots() == {"LOCAL:procedural": 0}


async def raw_update(harness, statement) -> None:
    """Change the database as another process would, without this one being told."""
    await harness.server.db.write(lambda conn: conn.execute(statement))


async def test_a_lowered_cap_applies_at_once_despite_the_account_cache(gated) -> None:
    harness, _ = gated
    assert (await harness.post(SMALL)).status_code == 200  # the account list is cached now
    await raw_update(harness, update(accounts).values(max_jobs=2))
    assert (await harness.post(SMALL)).status_code == 200
    reply = await harness.post(SMALL)
    assert (reply.status_code, reply.json()) == (429, {"error": "All accounts at capacity"})
    assert await harness.slots() == {"LOCAL:procedural": 2}


async def test_an_account_put_in_error_takes_no_job_despite_the_account_cache(gated) -> None:
    harness, _ = gated
    assert (await harness.post(SMALL)).status_code == 200
    await raw_update(harness, update(accounts).values(error="key revoked"))
    assert (await harness.post(SMALL)).status_code == 429
    assert await harness.slots() == {"LOCAL:procedural": 1}


async def test_the_account_list_is_read_again_once_the_cache_expires(gated) -> None:
    harness, _ = gated
    now = [1000.0]
    harness.server.admission.clock = lambda: now[0]
    await harness.execute(update(accounts).values(models=["seedream-4.0"]))
    assert (await harness.post(SMALL)).json() == {"error": "No account serves model nano-banana"}
    await raw_update(harness, update(accounts).values(models=None))
    assert (await harness.post(SMALL)).status_code == 400  # still the cached list
    now[0] += harness.server.admission.cache_seconds + 0.1
    assert (await harness.post(SMALL)).status_code == 200


async def test_which_accounts_serve_a_model_is_worked_out_once_per_cached_list(gated) -> None:
    harness, _ = gated
    admission = harness.server.admission
    asked: list[str] = []
    serves = admission.serves

    def counted(account, model) -> bool:
        asked.append(f"{account.name} {model.name}")
        return serves(account, model)

    admission.serves = counted  # type: ignore[method-assign]
    for _ in range(3):
        assert (await harness.post(SMALL)).status_code == 200
    assert asked == ["LOCAL:procedural nano-banana"]
    assert (await harness.post({**SMALL, "account": "LOCAL:procedural"})).status_code == 200
    assert len(asked) == 2  # a named account is a choice of its own
    admission.forget()
    assert (await harness.post(SMALL)).status_code == 200
    assert len(asked) == 3
