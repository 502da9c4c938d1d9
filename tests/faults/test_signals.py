"""SIGKILL and SIGTERM with a job at every stage of its life: admitted (its claim refused),
running (in its engine), storing its images (encoding), finishing (its final write waiting for a
lock another transaction holds), and its webhook pending (the receiver holds the request). A
witness job holds a slot throughout. The server restarts and every job ends, once, with the
invariants of invariants.py; on SQLite and PostgreSQL."""

from __future__ import annotations

import signal
import threading

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
from receiver import Answer, Receiver
from rig import ACCOUNT, Rig

pytestmark = [pytest.mark.faults, pytest.mark.blackbox, pytest.mark.both_databases]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_job_at_every_stage_survives_the_signal(
    rig: Rig, receiver: Receiver, sig: signal.Signals
) -> None:
    hold = threading.Event()
    receiver.plan.append(Answer(until=hold))  # the first try, the webhook job's: held
    rig.start()
    try:
        jobids = reach_every_stage(rig, receiver, sig)
    finally:
        hold.set()
    rig.start()
    with rig.client() as client:
        probe(client, list(jobids.values()))  # answers at once, whatever it recovers
        rig.open("running", "run", "store")
        rig.open("storing", "store")
        witness = jobids.pop("witness")
        ended(client, list(jobids.values()))
        # The witness still holds its slot: every other job gave its own back, once.
        assert slots(client) == {ACCOUNT: 1}  # the config declares accounts: no placeholder
        rig.open("witness", "run", "store")
        jobids["witness"] = witness
        records = ended(client, list(jobids.values()))
        assert {record["status"] for record in records.values()} == {"completed"}
        assert slots(client) == {ACCOUNT: 0}
        webhooks_delivered(client, receiver, jobids)
    rig.stop()
    assert "Application shutdown complete." in rig.outputs[-1]
    # Started once before the signal and once after it, except the job whose claim was
    # refused (once, after) and the one that had ended (once, before).
    assert never_twice_at_once(rig) == {tag: 2 for tag in jobids} | {"admitted": 1, "webhook": 1}
    assert receiver.count("/webhook") >= 2  # held when the server went, sent again after
    database_is_sound(rig)
    # At most the image the finishing job's first attempt stored: a SIGKILL, or a SIGTERM
    # while the job's end waited for the lock (the end may have committed: it is not safe to
    # delete them then), leaves it unreferenced on disk.
    assert len(stray_files(rig)) <= 1


def reach_every_stage(rig: Rig, receiver: Receiver, sig: signal.Signals) -> dict[str, str]:
    """Bring a job to every stage, probe the server, and send it `sig`; the jobids by tag."""
    url = receiver.url
    jobids: dict[str, str] = {}
    with rig.client() as client:
        for tag in ("witness", "running", "storing"):
            if tag == "storing":
                rig.open(tag, "run")
            jobids[tag] = rig.submit(client, tag, f"{url}/{tag}")
        rig.wait_journalled("witness", "start")
        rig.wait_journalled("running", "start")
        rig.wait_journalled("storing", "storing")
        rig.open("webhook", "run", "store")
        jobids["webhook"] = rig.submit(client, "webhook", f"{url}/webhook")
        rig.wait_for(lambda: receiver.count("/webhook") >= 1, "the webhook job's try held")
        with rig.claims_refused("admitted"):
            rig.open("admitted", "run", "store")
            jobids["admitted"] = rig.submit(client, "admitted", f"{url}/admitted")
            rig.wait_for(lambda: claim_refused(rig), "the admitted job's claim refused")
            jobids["finishing"] = rig.submit(client, "finishing", f"{url}/finishing")
            rig.wait_journalled("finishing", "start")
            with rig.lock_held(jobids["finishing"]):
                rig.open("finishing", "run", "store")
                rig.wait_journalled("finishing", "stored")
                rig.wait_for(lambda: len(rig.image_files()) == 2, "the finishing job's image")
                probe(client, list(jobids.values()))
                rig.stop(sig)
    return jobids


def claim_refused(rig: Rig) -> bool:
    output = rig.output
    return "runner crashed" in output or "not started: the database is busy" in output
