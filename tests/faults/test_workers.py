"""Workers on PostgreSQL under faults, black box: an API process that runs no jobs
(DREAMSERVE_RUN_JOBS=false) and `dreamserve worker`s without `--accounts` (they take the gated
account: its engine loads there). A worker SIGKILLed mid-job leaves no procrastinate row behind;
an API process killed between a job's commit and its enqueue loses no job; the database's
sessions ended and refused for a while stop no worker. Every job ends once, with the
invariants of invariants.py."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import psycopg
import pytest
from invariants import database_is_sound, ended, never_twice_at_once, slots
from rig import ACCOUNT, Rig
from servers import DREAMSERVE_SERVE, DREAMSERVE_WORKER, Server
from sqlalchemy.engine import make_url
from support import free_port

pytestmark = [pytest.mark.faults, pytest.mark.blackbox]

# Short leases: a dead worker's job (and its procrastinate row: a heartbeat every second, a
# worker without one for 3 s is dead) is taken back within seconds.
WORKERS = {
    "DREAMSERVE_RUN_JOBS": "false",
    "DREAMSERVE_LEASE_SECONDS": "3",
    "DREAMSERVE_REAPER_INTERVAL_SECONDS": "0.2",
}
# Longer than a heartbeat (a second) and the listeners' reconnection pauses.
AWAY_SECONDS = 4.0
API_READY = "Uvicorn running on"
WORKER_READY = "worker started: runs the jobs of"


class Processes:
    """API processes and workers on the rig's database and data dir, each killed at the end."""

    def __init__(self, rig: Rig, stack: ExitStack) -> None:
        self.rig = rig
        self.stack = stack
        self.env = rig.environment() | WORKERS

    def start(self, command: tuple[str, ...], ready: str) -> Server:
        server = Server(
            self.rig.data_dir, free_port(), self.rig.database_url, self.env, command, ready
        )
        self.stack.callback(_kill, server)
        self.rig.pids.append(server.process.pid)
        return server

    def api(self) -> Server:
        server = self.start(DREAMSERVE_SERVE, API_READY)
        self.rig.token = server.token or self.rig.token
        assert self.rig.token, "the first start prints a token"
        return server

    def worker(self) -> Server:
        server = self.start(DREAMSERVE_WORKER, WORKER_READY)
        assert f"{WORKER_READY} {ACCOUNT}" in server.output, server.output
        return server


@contextmanager
def processes(rig: Rig) -> Iterator[Processes]:
    with ExitStack() as stack:
        yield Processes(rig, stack)


def _kill(server: Server) -> None:
    if server.process.poll() is None:
        server.stop(signal.SIGKILL)


@contextmanager
def client(rig: Rig, api: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {rig.token}"}
    with httpx.Client(base_url=api.url, headers=headers, timeout=30) as opened:
        yield opened


def queued(rig: Rig) -> list[tuple[str, str]]:
    """procrastinate's rows: (status, queue)."""
    assert rig.database_url is not None
    with psycopg.connect(rig.database_url) as conn:
        rows = conn.execute("SELECT status::text, queue_name FROM procrastinate_jobs").fetchall()
    return [(status, queue) for status, queue in rows]


def test_a_worker_killed_mid_job_leaves_no_procrastinate_row_doing(pg_rig: Rig) -> None:
    """The killed worker's row stays `doing` (nothing of it runs any more); once no heartbeat
    came for a lease, a sweep deletes it, and the job runs again on the other worker (the
    reaper's, once): one second attempt, and no row left."""
    rig = pg_rig
    with processes(rig) as started:
        api = started.api()
        workers = [started.worker(), started.worker()]
        with client(rig, api) as one:
            jobid = rig.submit(one, "killed")
            rig.wait_journalled("killed", "start")
            pid = next(line["pid"] for line in rig.journal() if line["tag"] == "killed")
            victim = next(worker for worker in workers if worker.process.pid == pid)
            victim.stop(signal.SIGKILL)
            rig.died(pid)
            assert queued(rig) == [("doing", f"account:{ACCOUNT}")]
            (left,) = _doing(rig)
            rig.wait_journalled("killed", "start", 2)
            rig.wait_for(lambda: left not in _doing(rig), "the killed worker's row deleted")
            rig.open("killed", "run", "store")
            records = ended(one, [jobid])
            assert records[jobid]["status"] == "completed"
            rig.wait_for(lambda: queued(rig) == [], "procrastinate's rows all gone")
            assert slots(one) == {ACCOUNT: 0}
            assert "of a dead worker deleted" in "".join(w.output for w in (api, *workers))
    assert never_twice_at_once(rig) == {"killed": 2}
    database_is_sound(rig)


def _doing(rig: Rig) -> list[int]:
    """The ids of procrastinate's rows `doing`."""
    assert rig.database_url is not None
    with psycopg.connect(rig.database_url) as conn:
        rows = conn.execute("SELECT id FROM procrastinate_jobs WHERE status = 'doing'")
        return [job_id for (job_id,) in rows.fetchall()]


def test_an_api_process_killed_between_commit_and_enqueue_loses_no_job(pg_rig: Rig) -> None:
    """procrastinate's table is locked by another transaction, so the API process's enqueue
    waits after the job was committed; the process is SIGKILLed there (its session ended with
    it, the enqueue never made). Once the lock is free, the job's lease runs out, a reaper
    sends it, and it runs once on the worker, its slot released once."""
    rig = pg_rig
    assert rig.database_url is not None
    with processes(rig) as started:
        api = started.api()
        started.worker()
        with psycopg.connect(rig.database_url) as locker:
            locker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
            posted: list[Any] = []
            poster = threading.Thread(target=_post, args=(rig, api, posted), daemon=True)
            poster.start()
            rig.wait_for(lambda: _admitted(rig, "lost"), "the job committed")
            rig.wait_for(lambda: _enqueues_waiting(rig) >= 1, "its enqueue waiting on the lock")
            api.stop(signal.SIGKILL)
            _end_enqueues_waiting(rig)  # the dead process's session, as the database ends it
            locker.rollback()
        poster.join(30)
        assert posted, "the request never ended"
        assert not isinstance(posted[0], httpx.Response), posted  # never answered
        other = started.api()  # another API process: the job is there, and ends
        rig.open("lost", "run", "store")
        with client(rig, other) as two:
            (jobid,) = _jobids(rig, "lost")
            records = ended(two, [jobid])
            assert records[jobid]["status"] == "completed"
            assert slots(two) == {ACCOUNT: 0}
    assert never_twice_at_once(rig) == {"lost": 1}
    database_is_sound(rig)


def _post(rig: Rig, api: Server, posted: list[Any]) -> None:
    try:
        with client(rig, api) as one:
            posted.append(one.post("/v1/dreamina/images", json=rig.body("lost")))
    except httpx.HTTPError as error:  # the process died under the request
        posted.append(error)


def _jobids(rig: Rig, tag: str) -> list[str]:
    assert rig.database_url is not None
    with psycopg.connect(rig.database_url) as conn:
        rows = conn.execute(
            "SELECT jobid FROM jobs WHERE request->>'prompt' = %s", (tag,)
        ).fetchall()
    return [jobid for (jobid,) in rows]


def _admitted(rig: Rig, tag: str) -> bool:
    return len(_jobids(rig, tag)) == 1


def _waiting_enqueues(rig: Rig) -> str:
    return (
        "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND wait_event_type = 'Lock' AND query LIKE '%procrastinate_defer_jobs%'"
    )


def _enqueues_waiting(rig: Rig) -> int:
    assert rig.database_url is not None
    with psycopg.connect(rig.database_url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) {_waiting_enqueues(rig)}").fetchone()
    return 0 if row is None else int(row[0])


def _end_enqueues_waiting(rig: Rig) -> None:
    assert rig.database_url is not None
    with psycopg.connect(rig.database_url, autocommit=True) as conn:
        conn.execute(f"SELECT pg_terminate_backend(pid, 5000) {_waiting_enqueues(rig)}")


@contextmanager
def database_away(rig: Rig) -> Iterator[None]:
    """Every session of the database ended, and new ones refused until the block ends (a
    database restarting, or failing over)."""
    assert rig.database_url is not None
    url = make_url(rig.database_url)
    name = url.database
    admin = url.set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            conn.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            yield
        finally:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_a_worker_gets_over_its_database_sessions_ended_and_refused(pg_rig: Rig) -> None:
    """Every session ended and new ones refused for a few seconds (longer than the worker's
    heartbeat and its listener's reconnect): the worker's procrastinate worker stops on the
    error and is started again, with no operator, and a job submitted afterwards runs there."""
    rig = pg_rig
    with processes(rig) as started:
        api = started.api()
        worker = started.worker()
        with client(rig, api) as one:
            rig.open("before", "run", "store")
            jobids = {"before": rig.submit(one, "before")}
            ended(one, [jobids["before"]])
            with database_away(rig):
                time.sleep(AWAY_SECONDS)  # not a timing check: how long the database is away
            rig.open("after", "run", "store")
            jobids["after"] = rig.submit(one, "after")
            records = ended(one, list(jobids.values()))
            assert {record["status"] for record in records.values()} == {"completed"}
            assert slots(one) == {ACCOUNT: 0}
    # Its procrastinate worker was started again; the reaper said in a line what failed.
    assert "starting it again" in worker.output
    assert "reaper sweep failed: the database is unreachable" in worker.output
    assert "ERROR dreamserve.reaper" not in worker.output
    assert never_twice_at_once(rig) == {"before": 1, "after": 1}
    database_is_sound(rig)
