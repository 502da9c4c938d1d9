"""The optional queue under SIGKILL: a server killed with its account full and jobs waiting in
its queue restarts with the running jobs run again and the waiting ones still waiting, in
order; each takes a slot as one frees, every job ends once, every slot is given back once; on
SQLite and PostgreSQL."""

from __future__ import annotations

import signal

import pytest
from invariants import database_is_sound, ended, never_twice_at_once, slots
from rig import ACCOUNT, Rig

pytestmark = [pytest.mark.faults, pytest.mark.blackbox, pytest.mark.both_databases]

CAP = 10  # the rig's account's maxJobs


def test_waiting_jobs_survive_a_sigkill_in_order(rig: Rig) -> None:
    rig.start()
    with rig.client() as client:
        running = [rig.submit(client, f"running{n}") for n in range(CAP)]
        for n in range(CAP):
            rig.wait_journalled(f"running{n}", "start")
        waiting = []
        for n in range(3):
            reply = client.post(
                "/v1/dreamina/images", json={**rig.body(f"waiting{n}"), "queueSeconds": 600}
            )
            assert reply.status_code == 200, reply.text
            waiting.append(reply.json()["jobid"])
        positions = [
            client.get(f"/v1/dreamina/images/{j}").json()["queuePosition"] for j in waiting
        ]
        assert positions == [1, 2, 3]
    rig.stop(signal.SIGKILL)
    rig.start()
    with rig.client() as client:
        for n in range(CAP):  # run again, each in the slot it held
            rig.wait_journalled(f"running{n}", "start", count=2)
        assert slots(client) == {ACCOUNT: CAP}
        positions = [
            client.get(f"/v1/dreamina/images/{j}").json()["queuePosition"] for j in waiting
        ]
        assert positions == [1, 2, 3]
        for n in range(3):  # one slot frees at a time: the waiting take them in order
            rig.open(f"running{n}", "run", "store")
            rig.wait_journalled(f"waiting{n}", "start")
            later = [f"waiting{m}" for m in range(n + 1, 3)]
            assert all(rig.journalled(tag, "start") == 0 for tag in later)
        for n in range(3, CAP):
            rig.open(f"running{n}", "run", "store")
        for n in range(3):
            rig.open(f"waiting{n}", "run", "store")
        records = ended(client, running + waiting)
        assert {record["status"] for record in records.values()} == {"completed"}
        assert slots(client) == {ACCOUNT: 0}
    rig.stop()
    counts = never_twice_at_once(rig)
    assert counts == {f"running{n}": 2 for n in range(CAP)} | {f"waiting{n}": 1 for n in range(3)}
    database_is_sound(rig)
