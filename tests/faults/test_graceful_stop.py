"""SIGTERM with jobs running: the server stops admitting (503 `Server is stopping`, with
Retry-After) while reads go on, lets the running jobs end for DREAMSERVE_STOP_GRACE_SECONDS,
stops those still running then (they run again at the next start, never two attempts at once),
and releases the webhook tries it cut short (sent at once by the next start, not when their
claims run out). Nothing admitted is lost or run twice; on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import pytest
from invariants import (
    database_is_sound,
    ended,
    never_twice_at_once,
    slots,
    webhooks_delivered,
)
from receiver import Answer, Receiver
from rig import ACCOUNT, Rig
from test_workers import client, processes, queued

pytestmark = [pytest.mark.faults, pytest.mark.blackbox]

# Long enough for the short jobs, their webhooks and the requests below on a loaded machine
# (4 s was not always: a job the grace cut runs twice), short for the test's time.
GRACE = 8
STOPPING = {"error": "Server is stopping"}


@pytest.mark.both_databases
def test_sigterm_lets_running_jobs_finish_and_leaves_the_rest_to_the_next_start(
    rig: Rig, receiver: Receiver
) -> None:
    rig.extra |= {
        "DREAMSERVE_STOP_GRACE_SECONDS": str(GRACE),
        # A try in flight at the stop is still in flight when the process ends (its timeout is
        # past the grace), and a claim would hold its delivery far past the test: only the
        # release at the stop lets the next start send it within the test.
        "DREAMSERVE_WEBHOOK_TIMEOUT_SECONDS": "30",
        "DREAMSERVE_WEBHOOK_CLAIM_GRACE_SECONDS": "600",
    }
    hold = threading.Event()
    receiver.plan.append(Answer(until=hold))  # the first try, the held job's: held
    url = receiver.url
    rig.start()
    assert rig.server is not None
    try:
        with rig.client() as client:
            jobids = {tag: rig.submit(client, tag, f"{url}/{tag}") for tag in ("long", "short")}
            jobids["held"] = rig.submit(client, "held", f"{url}/held")
            for tag in jobids:
                rig.wait_journalled(tag, "start")
            os.killpg(rig.server.process.pid, signal.SIGTERM)
            # A POST is refused before its body is read: a bad one is a 400 until the stop.
            rig.wait_for(lambda: refused(client, "/v1/dreamina/images", {}), "submissions refused")
            reply = client.post("/v1/dreamina/images", json=rig.body("refused", f"{url}/refused"))
            assert (reply.status_code, reply.json()) == (503, STOPPING)
            assert reply.headers["retry-after"] == "5"  # DREAMSERVE_RETRY_AFTER_SECONDS
            assert refused(client, "/v1/dreamina/images/upscale", {"jobid": jobids["long"]})
            # Reads go on; a `?wait=` answers at once with the job as it is (the client's
            # timeout, far below the wait, fails the test if it held).
            reply = client.get(f"/v1/dreamina/images/{jobids['long']}", params={"wait": 60})
            assert (reply.status_code, reply.json()["status"]) == (200, "created")
            rig.open("held", "run", "store")  # ends within the grace; its webhook's try held
            rig.wait_for(lambda: receiver.count("/held") == 1, "the held job's try")
            rig.open("short", "run", "store")  # ends within the grace; its webhook answered
            # Recorded, not just received: a try the stop cut short between the two is sent
            # again at the next start.
            rig.wait_for(
                lambda: delivery_status(client, jobids["short"]) == "delivered",
                "the short job's webhook recorded",
            )
            assert receiver.count("/short") == 1
            reply = client.get(f"/v1/dreamina/images/{jobids['short']}")
            assert (reply.status_code, reply.json()["status"]) == (200, "completed")
        rig.stop()  # the long job is still in its engine: the grace runs out
    finally:
        hold.set()
    assert (
        f"1 job(s) still running after {GRACE} s (DREAMSERVE_STOP_GRACE_SECONDS)"
        in (rig.outputs[-1])
    )
    assert "Application shutdown complete." in rig.outputs[-1]
    rig.start()
    with rig.client() as client:
        rig.open("long", "run", "store")
        records = ended(client, list(jobids.values()))
        assert {record["status"] for record in records.values()} == {"completed"}
        assert slots(client) == {ACCOUNT: 0}  # each job's slot released once
        webhooks_delivered(client, receiver, jobids)  # the held one's: the same webhook-id
    rig.stop()
    # The short and held jobs ran once (within the grace); the long one twice, one after the
    # other; the refused submission never became a job.
    assert never_twice_at_once(rig) == {"long": 2, "short": 1, "held": 1}
    assert receiver.count("/short") == 1  # delivered once, at the stop
    assert receiver.count("/held") == 2  # cut short by the stop, sent again at the next start
    assert receiver.count("/refused") == 0
    database_is_sound(rig)


def delivery_status(client: httpx.Client, jobid: str) -> str | None:
    """The status of the job's webhook delivery as the server has it recorded (None before the
    job's end made it)."""
    deliveries = client.get(f"/v1/dreamina/images/{jobid}/webhooks").json()["deliveries"]
    assert len(deliveries) <= 1, deliveries
    return str(deliveries[0]["status"]) if deliveries else None


def refused(client: httpx.Client, path: str, body: dict[str, object]) -> bool:
    """Whether a POST to `path` gets the stopping server's 503 (with Retry-After)."""
    reply = client.post(path, json=body)
    if reply.status_code != 503:
        return False
    assert reply.json() == STOPPING, reply.text
    assert reply.headers["retry-after"] == "5", reply.headers
    return True


def test_a_worker_sigterm_lets_its_running_jobs_finish(pg_rig: Rig) -> None:
    """`dreamserve worker` at SIGTERM: its procrastinate workers take no more jobs, the job that
    ends within the grace ends there (one attempt), the one still running then is stopped and
    runs again, once, on the next worker (when its lease runs out)."""
    rig = pg_rig
    with processes(rig) as started:
        api = started.api()
        started.env |= {"DREAMSERVE_STOP_GRACE_SECONDS": str(GRACE)}
        worker = started.worker()
        with client(rig, api) as one:
            jobids = {tag: rig.submit(one, tag) for tag in ("graced", "cut")}
            for tag in jobids:
                rig.wait_journalled(tag, "start")
            os.killpg(worker.process.pid, signal.SIGTERM)
            rig.open("graced", "run", "store")
            rig.wait_for(lambda: rig.journalled("graced", "stored") == 1, "the graced job stored")
            worker.process.wait(30)  # once the grace ran out for the other
            rig.died(worker.process.pid)
            worker.reader.join(10)
            assert worker.process.stdout is not None
            worker.process.stdout.close()
            assert f"1 job(s) still running after {GRACE} s" in worker.output, worker.output
            started.worker()
            rig.open("cut", "run", "store")
            records = ended(one, list(jobids.values()))
            assert {record["status"] for record in records.values()} == {"completed"}
            assert slots(one) == {ACCOUNT: 0}
            rig.wait_for(lambda: queued(rig) == [], "procrastinate's rows all gone")
    assert never_twice_at_once(rig) == {"graced": 1, "cut": 2}
    database_is_sound(rig)
