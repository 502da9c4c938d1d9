"""What must hold after every fault, checked the same way by every test of the suite:

- no job lost: every admitted job ends, completed or failed with a message, never stuck;
- never two attempts of a job at once (the gated engine's journal, the servers' deaths);
- every slot given back exactly once: the account's running count is its unfinished jobs (a
  witness job still holding its slot tells a slot given back twice from one kept), then 0;
- every webhook delivered at least once, each job's under one webhook-id, signed;
- the server answers a probe within a generous bound, also while the fault lasts;
- the database passes its own check (SQLite's integrity_check, PostgreSQL's amcheck) and its
  rows agree with one another (slot counts, leases, assets and their files, one delivery each).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import psycopg
from receiver import Receiver
from rig import PROBE_SECONDS, WAIT_SECONDS, Rig
from standardwebhooks import Webhook


def probe(client: httpx.Client, jobids: Sequence[str] = ()) -> None:
    """The server answers what needs no write (the catalogue, job records) within the probe's
    bound: a server stuck behind the fault would time out instead."""
    paths = ["/v1/dreamina/models", *(f"/v1/dreamina/images/{jobid}" for jobid in jobids)]
    for path in paths:
        reply = client.get(path, timeout=PROBE_SECONDS)
        assert reply.status_code == 200, (path, reply.status_code, reply.text)


def ended(
    client: httpx.Client, jobids: list[str], seconds: float = WAIT_SECONDS
) -> dict[str, dict[str, Any]]:
    """No job lost: each job ends within `seconds`, completed, or failed with an error message;
    their records."""
    deadline = time.monotonic() + seconds
    records: dict[str, dict[str, Any]] = {}
    for jobid in jobids:
        while True:
            record = client.get(f"/v1/dreamina/images/{jobid}").json()
            if record["status"] != "created":
                break
            assert time.monotonic() < deadline, f"job {jobid} stuck: {record}"
            time.sleep(0.05)
        assert record["status"] in ("completed", "failed"), record
        if record["status"] == "failed":
            assert record.get("error"), f"failed without a message: {record}"
        else:
            assert len(record["response"]["images"]) == record["request"].get("count", 1)
        records[jobid] = record
    return records


def attempts(rig: Rig) -> dict[str, list[tuple[float, float]]]:
    """Each job's attempts (by tag) as (start, end) on the machine's monotonic clock: an attempt
    ends with its last step, or when its server died if it never finished its steps."""
    deaths = {line["pid"]: line["t"] for line in rig.journal() if line["event"] == "died"}
    steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for line in rig.journal():
        if line["tag"] is not None:
            steps[line["attempt"]].append(line)
    found: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for lines in steps.values():
        events = [line["event"] for line in lines]
        start, pid, tag = lines[0]["t"], lines[0]["pid"], lines[0]["tag"]
        assert events[0] == "start", lines
        finished = "end" in events and events.count("storing") == events.count("stored")
        if finished:
            end = max(line["t"] for line in lines)
        else:
            assert pid in deaths, f"attempt of {tag} still running in {pid}: {lines}"
            end = deaths[pid]
        found[tag].append((start, end))
    return {tag: sorted(spans) for tag, spans in found.items()}


def never_twice_at_once(rig: Rig) -> dict[str, int]:
    """No two attempts of a job overlapped; how many each job had."""
    counts = {}
    for tag, spans in attempts(rig).items():
        for (_, first_end), (second_start, _) in pairwise(spans):
            assert first_end <= second_start, f"{tag}: two attempts at once: {spans}"
        counts[tag] = len(spans)
    return counts


def slots(client: httpx.Client) -> dict[str, int]:
    accounts = client.get("/v1/dreamina/accounts").json()
    return {name: account["running"] for name, account in accounts.items()}


def webhooks_delivered(
    client: httpx.Client, receiver: Receiver, jobids: dict[str, str], seconds: float = WAIT_SECONDS
) -> None:
    """Each job (tag -> jobid, its replyUrl `<receiver>/<tag>`) has one delivery, delivered:
    the receiver got it at least once, every time with that delivery's webhook-id and a valid
    signature of the job's final record."""
    secret = client.get("/v1/dreamina/webhooks/secret").json()["secret"]
    deadline = time.monotonic() + seconds
    for tag, jobid in jobids.items():
        while True:
            listed = client.get(f"/v1/dreamina/images/{jobid}/webhooks").json()["deliveries"]
            assert len(listed) == 1, f"{tag}: {listed}"
            if listed[0]["status"] == "delivered":
                break
            assert listed[0]["status"] == "pending", f"{tag}: {listed}"
            assert time.monotonic() < deadline, f"{tag}: webhook never delivered: {listed}"
            time.sleep(0.1)
        received = [each for each in receiver.received if each.path == f"/{tag}"]
        assert received, f"{tag}: delivered, yet the receiver has nothing"
        assert {each.headers["webhook-id"] for each in received} == {listed[0]["webhookId"]}
        payload = Webhook(secret).verify(received[-1].body, received[-1].headers)
        assert (payload["jobid"], payload["status"]) == (jobid, "completed")


def database_is_sound(rig: Rig, stored: Callable[[str], bool] | None = None) -> None:
    """The database's own check, then its rows against one another and the blobs: the rig's
    files, or those `stored` says are in the blob store (by key)."""
    if stored is None:
        stored = lambda uri: (rig.blobs / uri).is_file()  # noqa: E731
    if rig.database_url is None:
        with sqlite3.connect(rig.sqlite_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
            _rows_agree(conn.execute, stored)
        return
    with psycopg.connect(rig.database_url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        indexes = conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_am a ON a.oid = c.relam JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE a.amname = 'btree' AND n.nspname = current_schema()"
        ).fetchall()
        assert indexes
        for (index,) in indexes:  # raises on a corrupt index
            conn.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
        _rows_agree(conn.execute, stored)


def _rows_agree(execute: Any, stored: Callable[[str], bool]) -> None:
    running = execute(
        "SELECT a.name, a.running, (SELECT count(*) FROM jobs j WHERE j.account_id = a.id "
        "AND j.status = 'created') FROM accounts a"
    ).fetchall()
    assert all(taken == unfinished for _, taken, unfinished in running), running
    leased = execute(
        "SELECT jobid FROM jobs WHERE status <> 'created' AND lease_until IS NOT NULL"
    ).fetchall()
    assert leased == [], f"ended jobs still leased: {leased}"
    rows = execute("SELECT id, status, images, request FROM jobs").fetchall()
    assets = execute("SELECT job_id, uri FROM assets WHERE kind = 'generated'").fetchall()
    deliveries = execute("SELECT job_id FROM webhook_deliveries").fetchall()
    for job_id, status, images, request in rows:
        images = json.loads(images) if isinstance(images, str) else images
        request = json.loads(request) if isinstance(request, str) else request
        uris = sorted(uri for owner, uri in assets if owner == job_id)
        assert uris == sorted(image["uri"] for image in images or ()), (job_id, uris, images)
        assert all(stored(uri) for uri in uris), uris
        expected = int(status != "created" and "replyUrl" in request)
        assert [owner for (owner,) in deliveries].count(job_id) == expected, (job_id, request)


def stray_files(rig: Rig) -> list[Path]:
    """Image files no asset row names: what attempts left that never ended (a SIGKILL)."""
    named = set()
    if rig.database_url is None:
        with sqlite3.connect(rig.sqlite_path) as conn:
            named = {uri for (uri,) in conn.execute("SELECT uri FROM assets")}
    else:
        with psycopg.connect(rig.database_url) as conn:
            named = {uri for (uri,) in conn.execute("SELECT uri FROM assets")}
    return [path for path in rig.image_files() if str(path.relative_to(rig.blobs)) not in named]
