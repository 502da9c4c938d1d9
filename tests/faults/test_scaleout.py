"""Scale-out, black box: on one PostgreSQL and one blob store (a shared folder), two API
processes that run no jobs (DREAMSERVE_RUN_JOBS=false) and two `dreamserve worker`s. Jobs are
submitted through either API and waited on through the other; a cancel through one API stops
the engine on the worker running the job; a worker SIGKILLed mid-job leaves its job to the
other worker, with the invariants of invariants.py."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from invariants import database_is_sound, ended, never_twice_at_once, slots, webhooks_delivered
from receiver import Receiver
from rig import ACCOUNT, Rig
from servers import DREAMSERVE_SERVE, DREAMSERVE_WORKER, Server
from support import free_port

pytestmark = [pytest.mark.faults, pytest.mark.blackbox]

# Short leases: a killed worker's job is taken back within seconds.
SCALE_OUT = {
    "DREAMSERVE_RUN_JOBS": "false",
    "DREAMSERVE_LEASE_SECONDS": "3",
    "DREAMSERVE_REAPER_INTERVAL_SECONDS": "0.2",
}


@contextmanager
def processes(rig: Rig) -> Iterator[tuple[list[Server], list[Server]]]:
    """Two API processes (the first one started alone: it migrates and prints the token) and
    two workers of the gated account, all on the rig's database and data dir (its keys, its
    blobs); each killed at the end."""
    env = rig.environment() | SCALE_OUT
    with ExitStack() as stack:

        def started(command: tuple[str, ...], ready: str) -> Server:
            server = Server(
                rig.data_dir, free_port(), rig.database_url, env, command, ready_line=ready
            )
            stack.callback(_kill, server)
            rig.pids.append(server.process.pid)
            return server

        apis = [started(DREAMSERVE_SERVE, "Uvicorn running on")]
        rig.token = apis[0].token or ""
        assert rig.token, "the first start prints a token"
        apis.append(started(DREAMSERVE_SERVE, "Uvicorn running on"))
        worker = (*DREAMSERVE_WORKER, "--accounts", ACCOUNT)
        workers = [started(worker, "worker started: runs the jobs of") for _ in range(2)]
        yield apis, workers


def _kill(server: Server) -> None:
    if server.process.poll() is None:
        server.stop(signal.SIGKILL)


@contextmanager
def clients(rig: Rig, apis: list[Server]) -> Iterator[list[httpx.Client]]:
    headers = {"Authorization": f"Bearer {rig.token}"}
    with ExitStack() as stack:
        yield [
            stack.enter_context(httpx.Client(base_url=api.url, headers=headers, timeout=30))
            for api in apis
        ]


def test_two_apis_and_two_workers_share_the_jobs(pg_rig: Rig, receiver: Receiver) -> None:
    rig = pg_rig
    with processes(rig) as (apis, workers), clients(rig, apis) as (one, two):
        # Submitted through each API, waited on (?wait=) through the other: the job runs on a
        # worker, whose changes wake the waiter through PostgreSQL's notifications.
        jobids = {
            "a": rig.submit(one, "a", receiver.url + "/a"),
            "b": rig.submit(two, "b", receiver.url + "/b"),
        }
        rig.open("a", "run", "store")
        rig.open("b", "run", "store")
        waited = two.get(f"/v1/dreamina/images/{jobids['a']}", params={"wait": 30})
        assert waited.json()["status"] == "completed", waited.text
        waited = one.get(f"/v1/dreamina/images/{jobids['b']}", params={"wait": 30})
        assert waited.json()["status"] == "completed", waited.text

        # Cancelled through the other API than it was submitted to: its engine, on a worker,
        # sees the cancel (the gated engine's wait ends: `end` is journalled).
        cancelled = rig.submit(two, "cancelled")
        rig.wait_journalled("cancelled", "start")
        reply = one.delete(f"/v1/dreamina/scheduler/{cancelled}")
        assert reply.status_code == 200, reply.text
        rig.wait_journalled("cancelled", "end")
        record = two.get(f"/v1/dreamina/images/{cancelled}").json()
        assert (record["status"], record["error"]) == ("failed", "Cancelled by user")

        # A worker killed mid-job: the other one runs the job again, once its lease ran out.
        jobids["killed"] = rig.submit(one, "killed")
        rig.wait_journalled("killed", "start")
        pid = next(line["pid"] for line in rig.journal() if line["tag"] == "killed")
        victim = next(worker for worker in workers if worker.process.pid == pid)
        victim.stop(signal.SIGKILL)
        rig.died(pid)
        rig.wait_journalled("killed", "start", 2)
        rig.open("killed", "run", "store")
        records = ended(two, [jobids["killed"]])
        assert records[jobids["killed"]]["status"] == "completed"

        assert slots(one) == {ACCOUNT: 0, "LOCAL:procedural": 0}
        webhooks_delivered(two, receiver, {"a": jobids["a"]})
    assert never_twice_at_once(rig) == {"a": 1, "b": 1, "cancelled": 1, "killed": 2}
    database_is_sound(rig)
