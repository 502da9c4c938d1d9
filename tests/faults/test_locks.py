"""Locks held elsewhere and database sessions ended under a running server: a lock another
process holds past the busy bound (SQLite's write lock, PostgreSQL's rows of every job), and
every PostgreSQL session of the server terminated mid-job. The server answers meanwhile, and
every job ends once with the invariants of invariants.py."""

from __future__ import annotations

import pytest
from invariants import (
    database_is_sound,
    ended,
    never_twice_at_once,
    probe,
    slots,
    stray_files,
    webhooks_delivered,
)
from receiver import Receiver
from rig import Rig

pytestmark = [pytest.mark.faults, pytest.mark.blackbox]

BUSY = {"error": "Database busy, retry later"}


@pytest.mark.both_databases
def test_a_lock_held_past_the_busy_bound_loses_no_job_and_runs_none_twice(
    rig: Rig, receiver: Receiver
) -> None:
    """A job running and one finishing when another transaction takes the lock their writes
    need, and holds it until a renewal was refused (past the 1 s bound): reads are answered,
    a submission is refused with 503 on SQLite (PostgreSQL's new row is no held one), and once
    the lock is free every job ends, once, with its images and its webhook."""
    rig.start()
    jobids: dict[str, str] = {}
    with rig.client() as client:
        for tag in ("running", "finishing"):
            jobids[tag] = rig.submit(client, tag, f"{receiver.url}/{tag}")
            rig.wait_journalled(tag, "start")
        with rig.lock_held():
            rig.open("finishing", "run", "store")
            rig.wait_journalled("finishing", "stored")
            probe(client, list(jobids.values()))
            submitted = client.post("/v1/dreamina/images", json=rig.body("admitted"))
            if rig.database_url is None:
                assert (submitted.status_code, submitted.json()) == (503, BUSY)
                assert submitted.headers["Retry-After"] == "5"
            else:
                assert submitted.status_code == 200, submitted.text
                rig.open("admitted", "run", "store")
            rig.wait_for(lambda: "lease renewal failed" in rig.output, "a renewal refused")
            probe(client, list(jobids.values()))
        rig.open("running", "run", "store")
        records = ended(client, list(jobids.values()))
        assert {record["status"] for record in records.values()} == {"completed"}
        assert set(slots(client).values()) == {0}
        webhooks_delivered(client, receiver, jobids)
    rig.stop()
    expected = {"running": 1, "finishing": 1} | (
        {} if rig.database_url is None else {"admitted": 1}
    )
    assert never_twice_at_once(rig) == expected
    assert stray_files(rig) == []
    database_is_sound(rig)


def test_postgresql_sessions_ended_mid_job_lose_no_job_and_run_none_twice(
    pg_rig: Rig, receiver: Receiver
) -> None:
    """Every session of the server ends while a job runs (its runner lock's included): the
    server answers at once on new sessions, takes its runner lock again, admits and runs new
    jobs, and the running job ends once."""
    rig = pg_rig
    rig.start()
    jobids: dict[str, str] = {}
    with rig.client() as client:
        jobids["running"] = rig.submit(client, "running", f"{receiver.url}/running")
        rig.wait_journalled("running", "start")
        assert rig.end_backends() >= 2  # the pool's and the runner lock's at least
        probe(client, list(jobids.values()))
        rig.wait_for(
            lambda: "runner lock lost with its database connection" in rig.output,
            "the runner lock taken again",
        )
        rig.open("after", "run", "store")
        jobids["after"] = rig.submit(client, "after", f"{receiver.url}/after")
        rig.open("running", "run", "store")
        records = ended(client, list(jobids.values()))
        assert {record["status"] for record in records.values()} == {"completed"}
        assert set(slots(client).values()) == {0}
        webhooks_delivered(client, receiver, jobids)
    rig.stop()
    assert never_twice_at_once(rig) == {"running": 1, "after": 1}
    assert stray_files(rig) == []
    database_is_sound(rig)
