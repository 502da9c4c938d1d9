"""The fault suite's harness: `dreamserve serve` in a subprocess (SQLite or PostgreSQL) whose
shared account `LOCAL:gated` runs the gated plugin engine (gated_engine.py), the faults it
applies to that server from outside (a held lock, a refused claim), and what the invariant
checks read (the engine's journal, the server's deaths, the database).

Jobs are named by their prompt, the *tag*: `rig.submit(client, "running")` makes a job that
waits in its engine until `rig.open("running", "run")`, and whose images wait to be encoded
until `rig.open("running", "store")`.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from plugin_site import PluginSite
from servers import DREAMSERVE_SERVE, Server
from support import fill, free_port, holding_write_lock

ACCOUNT = "LOCAL:gated"
PROBE_SECONDS = 10.0  # generous: a probe that waits this long means the server hangs
WAIT_SECONDS = 60.0  # the outer bound of every wait for a state

CONFIG = """
[sizes.tiny.1k]
"1:1" = "64x64"

[[models]]
name = "tiny"
resolutions = ["1k"]
sizes = "tiny"
max_refs = 0
prompt_required = true
auto_ratio = false

[[accounts]]
account = "{account}"
engine = "gated"
maxJobs = 10
models = ["tiny"]
settings = {{ gates = "{gates}" }}
"""

# What every fault server runs with: webhooks to the receiver on 127.0.0.1, tried for a second
# (a try held past it is recorded as timed out: either way the delivery goes on) and claimed for
# 2 s more (a try the fault left unrecorded is sent again then, not 20 s later), and lock waits
# bounded by a second so that a held lock shows within the test's time.
SETTINGS = {
    "DREAMSERVE_WEBHOOK_ALLOW_PRIVATE": "true",
    "DREAMSERVE_WEBHOOK_TIMEOUT_SECONDS": "1",
    "DREAMSERVE_WEBHOOK_CLAIM_GRACE_SECONDS": "2",
    "DREAMSERVE_DATABASE_BUSY_SECONDS": "1",
    "DREAMSERVE_ACCESS_LOG": "false",
}


@dataclass
class Rig:
    root: Path  # the test's own folder
    database_url: str | None  # None: SQLite in the data dir
    site: Path  # the plugin site holding the gated engine
    extra: dict[str, str] = field(default_factory=dict)  # more DREAMSERVE_* settings
    data_dir: Path = field(init=False)
    blobs: Path = field(init=False)  # where the image files are (DREAMSERVE_BLOB_URL)
    gates: Path = field(init=False)
    server: Server | None = None
    token: str = ""
    outputs: list[str] = field(default_factory=list)  # of every server stopped, in order
    pids: list[int] = field(default_factory=list)  # of every server started, in order

    def __post_init__(self) -> None:
        self.data_dir = self.root / "data"
        self.blobs = self.data_dir / "blobs"
        self.gates = self.root / "gates"
        self.gates.mkdir(exist_ok=True)
        (self.gates / "journal.jsonl").touch()
        config = CONFIG.format(account=ACCOUNT, gates=self.gates)
        (self.root / "dreamserve.toml").write_text(config)

    # The server

    def environment(self) -> dict[str, str]:
        """What every process of the rig runs with: the gated engine's site on its path, the
        configuration file, the settings."""
        pythonpath = os.pathsep.join(
            [str(self.site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        )
        return {
            **SETTINGS,
            "DREAMSERVE_CONFIG": str(self.root / "dreamserve.toml"),
            "PYTHONPATH": pythonpath,
            **self.extra,
        }

    def start(self) -> Server:
        assert self.server is None, "one server at a time"
        self.server = Server(
            self.data_dir,
            free_port(),
            self.database_url,
            self.environment(),
            command=DREAMSERVE_SERVE,
        )
        self.token = self.server.token or self.token
        assert self.token, "the first start prints a token"
        self.pids.append(self.server.process.pid)
        return self.server

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal the server and wait for it to end: its exit status. Its death is journalled:
        an attempt it left unfinished ended then."""
        server = self.server
        assert server is not None
        try:
            server.stop(sig)
        finally:
            self.server = None
            self.outputs.append(server.output)
            self._journal("died", pid=server.process.pid)
        if self.database_url is not None:  # its sessions go with it, the runner lock's too
            self.wait_for(lambda: not self._advisory_locks(), "the runner lock freed")
        return int(server.process.returncode)

    @property
    def output(self) -> str:
        """What every server printed, the running one's last."""
        return "".join(self.outputs) + (self.server.output if self.server else "")

    @contextmanager
    def client(self) -> Iterator[httpx.Client]:
        assert self.server is not None
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.server.url, headers=headers, timeout=30) as client:
            yield client

    # Jobs and gates

    def body(self, tag: str, reply_url: str | None = None) -> dict[str, Any]:
        """POST /images of a job `tag` on the gated account."""
        body: dict[str, Any] = {"prompt": tag, "model": "tiny", "ratio": "1:1", "count": 1}
        body["account"] = ACCOUNT
        if reply_url is not None:
            body["replyUrl"] = reply_url
        return body

    def submit(self, client: httpx.Client, tag: str, reply_url: str | None = None) -> str:
        reply = client.post("/v1/dreamina/images", json=self.body(tag, reply_url))
        assert reply.status_code == 200, reply.text
        return str(reply.json()["jobid"])

    def open(self, tag: str, *gates: str) -> None:
        """Let the job `tag` go past its `run` and/or `store` gate."""
        for gate in gates:
            (self.gates / f"{tag}.{gate}").touch()

    def journal(self) -> list[dict[str, Any]]:
        lines = (self.gates / "journal.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def journalled(self, tag: str, event: str) -> int:
        return sum(1 for line in self.journal() if (line["tag"], line["event"]) == (tag, event))

    def died(self, pid: int) -> None:
        """Journal the death of a process the test killed itself (not through `stop`)."""
        self._journal("died", pid=pid)

    def _journal(self, event: str, **fields: Any) -> None:
        line = {"event": event, "tag": None, "t": time.monotonic(), **fields}
        with open(self.gates / "journal.jsonl", "a") as journal:
            journal.write(json.dumps(line) + "\n")

    def wait_for(
        self, condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS
    ) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"never {what} (after {seconds:g} s):\n{self.output[-4000:]}")
            time.sleep(0.02)

    def wait_journalled(self, tag: str, event: str, count: int = 1) -> None:
        self.wait_for(lambda: self.journalled(tag, event) >= count, f"{tag}: {event} x{count}")

    def image_files(self) -> list[Path]:
        return [path for path in self.blobs.rglob("*") if path.is_file()]

    # Faults applied from outside

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "dreamserve.db"

    @contextmanager
    def lock_held(self, jobid: str | None = None) -> Iterator[None]:
        """Another transaction holds a lock the job's next write needs: on SQLite another
        process holds the write lock; on PostgreSQL another connection holds the job's row
        (every job's, without `jobid`)."""
        if self.database_url is None:
            with holding_write_lock(self.sqlite_path):
                yield
            return
        with psycopg.connect(self.database_url) as other:
            if jobid is None:
                other.execute("SELECT id FROM jobs FOR UPDATE")
            else:
                other.execute("SELECT id FROM jobs WHERE jobid = %s FOR UPDATE", (jobid,))
            yield
            other.rollback()

    def end_backends(self) -> int:
        """End every PostgreSQL session of the server (its pool, its runner lock's, its
        listener), as a restarted or failed-over database would: how many."""
        assert self.database_url is not None
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            ended = conn.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
        return len(ended)

    @contextmanager
    def claims_refused(self, tag: str) -> Iterator[None]:
        """The database refuses to start (claim) the job `tag`, as a trigger: on SQLite with an
        error, on PostgreSQL with lock_not_available (what a lock wait past lock_timeout
        raises). The job stays admitted and queued, as a server stopped between admission and
        claim leaves it. The trigger is gone after the block."""
        if self.database_url is None:
            with sqlite3.connect(self.sqlite_path, timeout=10) as conn:
                conn.execute(
                    "CREATE TRIGGER fault_claims_refused BEFORE UPDATE OF attempts ON jobs "
                    f"WHEN NEW.attempts > OLD.attempts AND json_extract(NEW.request, '$.prompt') "
                    f"= '{tag}' BEGIN SELECT RAISE(ABORT, 'claim refused by the fault suite'); END"
                )
            try:
                yield
            finally:
                with sqlite3.connect(self.sqlite_path, timeout=10) as conn:
                    conn.execute("DROP TRIGGER fault_claims_refused")
            return
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION fault_claims_refused() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF NEW.request->>'prompt' = '{tag}' THEN RAISE EXCEPTION "
                "'claim refused by the fault suite' USING ERRCODE = 'lock_not_available'; "
                "END IF; RETURN NEW; END $$"
            )
            conn.execute(
                "CREATE TRIGGER fault_claims_refused BEFORE UPDATE OF attempts ON jobs FOR EACH "
                "ROW WHEN (NEW.attempts > OLD.attempts) EXECUTE FUNCTION fault_claims_refused()"
            )
        try:
            yield
        finally:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute("DROP TRIGGER fault_claims_refused ON jobs")
                conn.execute("DROP FUNCTION fault_claims_refused")

    @contextmanager
    def no_space_left(self, disk: Path | None) -> Iterator[None]:
        """The database has no space for another write until the block ends: on SQLite the
        file system of the data dir (`disk`, a tmpfs) is filled to its last byte, its WAL
        emptied beforehand and held from being reused (a reader's open snapshot, as a backup's)
        so that every write must grow it; on PostgreSQL, triggers raise disk_full (53100, what
        the server raises when its disk fills) on every new job and every job's end."""
        if self.database_url is None:
            assert disk is not None
            with sqlite3.connect(self.sqlite_path, timeout=10, isolation_level=None) as reader:
                reader.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM jobs").fetchall()
                filler = fill(disk)
                try:
                    yield
                finally:
                    filler.unlink()
                    reader.execute("ROLLBACK")
            return
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION fault_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' "
                "USING ERRCODE = 'disk_full'; END $$"
            )
            conn.execute(
                "CREATE TRIGGER fault_disk_full BEFORE INSERT OR UPDATE OF status ON jobs "
                "FOR EACH ROW EXECUTE FUNCTION fault_disk_full()"
            )
        try:
            yield
        finally:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute("DROP TRIGGER fault_disk_full ON jobs")
                conn.execute("DROP FUNCTION fault_disk_full")

    def _advisory_locks(self) -> list[Any]:
        assert self.database_url is not None
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            return conn.execute(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()


def install_gated_engine(site: PluginSite) -> None:
    source = (Path(__file__).with_name("gated_engine.py")).read_text()
    site.install(
        "dreamserve-fault-engine", {"gated": "fault_engine:GatedEngine"}, {"fault_engine": source}
    )
