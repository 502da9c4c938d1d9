"""Test helpers: the in-process harness (app + httpx over ASGI) and a gated engine."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import Connection, Executable

from dreamserve.app import DispatcherFactory, Server, create_app, run_worker, utc_now
from dreamserve.catalogue import Model
from dreamserve.dispatch.inprocess import InProcessDispatcher
from dreamserve.engines.base import CancelSignal, EngineContext, GenerationRequest
from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.engines.registry import BUILTIN, EngineSource
from dreamserve.jobs import millis
from dreamserve.netguard import Resolver
from dreamserve.service import Service
from dreamserve.settings import Settings
from dreamserve.storage import account_queries
from dreamserve.storage.tables import accounts

# Every field POST /images knows, and one imageRef_N beyond the six.
IMAGE_FIELDS = [
    "prompt",
    "model",
    "ratio",
    "resolution",
    "imageRef_1",
    "imageRef_2",
    "imageRef_7",
    "imageStrength",
    "account",
    "replyUrl",
    "replyRef",
    "maxJobs",
    "seed",
    "count",
]
# assetRefs of every shape: zero, huge and non-ASCII sizes, other accounts, odd keys.
ASSET_REFS = st.builds(
    "{}-image:w{}:h{}:s{}-uri:{}".format,
    st.sampled_from(["LOCAL:procedural", "US:a@b.c", "nocolon", ""]),
    st.integers(0, 10**7) | st.text(max_size=8) | st.just("9" * 5000),
    st.integers(0, 10**7) | st.sampled_from(["\u0663", "x"]),
    st.integers(0, 10**13),
    st.sampled_from(["images/a.jpg", "", "../x", "a b"]) | st.text(max_size=12),
)
# A small, quick job: nano-banana renders 1024x1024 at 1:1.
SMALL = {"prompt": "a small test picture", "model": "nano-banana", "ratio": "1:1", "count": 1}
SEED_BODY = {
    "prompt": "A stunning aurora borealis over a frozen lake at midnight",
    "model": "seedream-4.0",
    "ratio": "16:9",
    "resolution": "2k",
}


# The PostgreSQL server the tests use (tests/conftest.py makes a database on it per worker).
POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Harness:
    app: FastAPI
    server: Server  # every part, for tests that set up or watch what the API cannot reach
    service: Service
    client: httpx.AsyncClient
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def post(self, body: Mapping[str, Any], token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return await self.client.post("/v1/dreamina/images", json=body, headers=headers)

    async def get(self, jobid: str, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return await self.client.get(f"/v1/dreamina/images/{jobid}", headers=headers)

    async def wait(self, jobid: str, seconds: float = 60) -> dict[str, Any]:
        """Poll until the job is terminal; its record."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            reply = await self.get(jobid)
            assert reply.status_code == 200, reply.text
            if reply.json()["status"] != "created":
                return dict(reply.json())
            await asyncio.sleep(0.05)
        raise AssertionError(f"job {jobid} did not finish in {seconds}s")

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> httpx.Response:
        """Any API call, as user 1 unless another token is given."""
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return await self.client.request(method, f"/v1/dreamina{path}", json=body, headers=headers)

    async def put_account(
        self, body: Mapping[str, Any], token: str | None = None
    ) -> dict[str, Any]:
        reply = await self.call("POST", "/accounts", body, token)
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    async def new_user(self) -> str:
        """A token of a new user."""
        return (await self.service.tokens.create())[1]

    async def slots(self) -> dict[str, int]:
        return await self.server.db.read(account_queries.slots_taken)

    async def execute(self, *statements: Executable) -> None:
        """Run SQL statements in one transaction (to set up a state the API cannot reach), as
        another process would: this one learns of account changes when its cache expires, so
        the cache is dropped here."""

        def run(conn: Connection) -> None:
            for statement in statements:
                conn.execute(statement)

        await self.server.db.write(run)
        self.server.admission.forget()

    async def sideline_placeholder(self) -> None:
        """Give the placeholder LOCAL:procedural another model (seedream-3.0), so that only the
        test's own accounts take the jobs it submits."""
        placeholder = accounts.update().where(accounts.c.name == "LOCAL:procedural")
        await self.execute(placeholder.values(models=["seedream-3.0"]))


@asynccontextmanager
async def open_harness(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = utc_now,
    engines: Mapping[str, EngineSource] = BUILTIN,
    dispatcher: DispatcherFactory | None = InProcessDispatcher,
    resume: bool = True,
) -> AsyncIterator[Harness]:
    """The app on `settings`, started, with a token of user 1. Jobs run in-process unless
    `dispatcher` says otherwise (None: the server's own choice, procrastinate on PostgreSQL)."""
    app = create_app(settings, clock=clock, engines=engines, dispatcher=dispatcher, resume=resume)
    async with app.router.lifespan_context(app):
        server: Server = app.state.server
        service = server.service
        token = await service.tokens.bootstrap() or (await service.tokens.create(1))[1]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Harness(app, server, service, client, token)


@asynccontextmanager
async def in_process_worker(
    settings: Settings,
    accounts: Sequence[str] | None,
    engines: Mapping[str, EngineSource],
    relist_seconds: float = 5.0,
) -> AsyncIterator[None]:
    """`dreamserve worker` in this process (its own server parts, events and listener), on the
    PostgreSQL database of `settings`; stopped at the end."""
    stop, started = asyncio.Event(), asyncio.Event()
    work = run_worker(
        settings, accounts, stop, engines=engines, started=started, relist_seconds=relist_seconds
    )
    task = asyncio.create_task(work)
    try:
        waiting = asyncio.create_task(started.wait())
        await asyncio.wait([task, waiting], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        assert started.is_set(), task.exception() if task.done() else "worker not started"
        yield
    finally:
        stop.set()
        await task


def procrastinate_rows(url: str) -> list[tuple[str, str]]:
    """(queue, status) of procrastinate's jobs, sorted."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT queue_name, status::text FROM procrastinate_jobs").fetchall()
    return sorted((queue, status) for queue, status in rows)


async def eventually(condition: Callable[[], bool], seconds: float = 10) -> None:
    """Wait until `condition()` holds (checked every 10 ms); fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {seconds}s")
        await asyncio.sleep(0.01)


async def wait_started(
    engine: GatedEngine | CancellableEngine | ReturnsOnCancelEngine, count: int
) -> None:
    """Wait until `count` jobs reached the gated engine (a bound a loaded machine stays within:
    a job that never starts fails the test all the same)."""
    deadline = time.monotonic() + 30
    while engine.started < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{engine.started} of {count} jobs started")
        await asyncio.sleep(0.01)


def tap_event_streams(harness: Harness) -> list[Any]:
    """What the harness's event streams are sent, as the service yields it (a record, or None
    for a keep-alive comment): a test can act once a stream reached a given point instead of
    sleeping for a time a loaded machine may overrun."""
    yielded: list[Any] = []
    records = harness.service.records
    inner = records.follow

    async def follow(user_id: int, jobid: str) -> AsyncIterator[Any]:
        async for each in inner(user_id, jobid):
            yielded.append(each)
            yield each

    records.follow = follow  # type: ignore[method-assign]
    return yielded


class _SharedEngine:
    """One instance serves every account (its factory returns itself), so a test can watch it."""

    def factory(self, settings: Mapping[str, Any], context: EngineContext) -> _SharedEngine:
        return self

    def serves(self, model: Model) -> bool:
        return True

    async def close(self) -> None:
        return None


class CancellableEngine(_SharedEngine):
    """Runs until cancelled: records each job's start and the cancels it saw."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        self.started += 1
        while not cancel.is_set:  # noqa: ASYNC110 (a thread event, polled as engines do)
            await asyncio.sleep(0.01)
        self.cancelled += 1
        cancel.raise_if_set()
        raise AssertionError("unreachable")


class GatedEngine(_SharedEngine):
    """The procedural engine behind a gate: every job waits until the test opens it."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0
        self.inner: ProceduralEngine | None = None

    def factory(self, settings: Mapping[str, Any], context: EngineContext) -> GatedEngine:
        self.inner = ProceduralEngine(settings, context)
        return self

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        self.started += 1
        await self.gate.wait()
        assert self.inner is not None
        return await self.inner.generate(request, progress, cancel)


class ReturnsOnCancelEngine(_SharedEngine):
    """Blank images behind a gate, returned when the gate opens or when the job's cancel is set
    (as an engine finishing the step it was in): records in order each job's start and the
    cancels it saw, with the time (epoch milliseconds) of each cancel."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0
        self.events: list[tuple[str, int]] = []  # ("started" | "cancelled", the nth job)
        self.cancels_seen_at: list[int] = []

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        self.started += 1
        nth = self.started
        self.events.append(("started", nth))
        while not (cancel.is_set or self.gate.is_set()):  # noqa: ASYNC110 (as engines poll)
            await asyncio.sleep(0.01)
        if cancel.is_set:
            self.events.append(("cancelled", nth))
            self.cancels_seen_at.append(millis(utc_now()))
        return [Image.new("RGB", (request.width, request.height)) for _ in range(request.count)]


def watch_puts(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the blobs written from now on."""
    blobs = harness.server.blobs
    real = blobs.put
    keys: list[str] = []

    async def put(key: str, data: bytes) -> None:
        keys.append(key)
        await real(key, data)

    monkeypatch.setattr(blobs, "put", put)
    return keys


async def public_dns(host: str, port: int) -> list[str]:
    """A resolver for replyUrl checks that puts every host at a public address (no DNS query
    leaves the machine). Use it only where no job with a replyUrl ends while the test runs: a
    delivery would go to that address."""
    return ["93.184.216.34"]


def fake_dns(table: Mapping[str, list[str]]) -> Resolver:
    """A resolver that answers from `table` (no DNS query leaves the machine); a literal
    address resolves to itself, as with the real one, and any other name is unknown."""

    async def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return list(table[host])
        try:
            return [str(ip_address(host))]
        except ValueError:
            raise OSError(f"{host}: Name or service not known") from None

    return resolve


def post_scope(path: str, token: str, media: str, length: int | None = None) -> dict[str, Any]:
    """The ASGI scope of a POST to `path` with the user's token and a Content-Type (and a
    Content-Length when given): for tests that send the body a part at a time, or none."""
    headers = [
        (b"host", b"testserver"),
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", media.encode()),
    ]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }


# Opens a plain TCP connection to a served server (raw_connections).
Connect = Callable[[], socket.socket]


@contextmanager
def raw_connections(url: str) -> Iterator[Connect]:
    """Opens TCP connections to the server at `url` (on 127.0.0.1), for tests that speak HTTP
    byte by byte; all are closed at the block's end, failed or not."""
    port = int(url.rsplit(":", 1)[1])
    opened: list[socket.socket] = []

    def opening() -> socket.socket:
        opened.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        return opened[-1]

    try:
        yield opening
    finally:
        for sock in opened:
            sock.close()


def answer(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends until it closes the connection (b"" for a bare close); fails when
    it is still open after `seconds`."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(
            f"still open after {seconds}s, having sent {received[:80]!r}"
        ) from None
    return received


def _own_ports() -> list[int]:
    """The ports free_port hands out in this process: below the kernel's ephemeral range, so
    never given by the kernel to a bind to port 0 or to an outgoing connection, and a slice of
    their own for each pytest-xdist worker. A port from bind(0), closed and given to a server
    later, could be taken in between by any connection of any process (then the server could
    not start, or a test's 'nothing listens there' was wrong)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    ports = list(range(max(10_000, low - 12_000), low))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if worker.startswith("gw") and worker[2:].isdigit():
        size = len(ports) // _PORT_SLICES
        start = int(worker[2:]) % _PORT_SLICES * size
        ports = ports[start : start + size]
    offset = random.randrange(len(ports)) if ports else 0
    return ports[offset:] + ports[:offset]


_PORT_SLICES = 8
_ports: Iterator[int] | None = None


def free_port() -> int:
    """A port of 127.0.0.1 where nothing listens (closed: a connection would be refused), and
    that no other process will take unless it names that very port (`_own_ports`)."""
    global _ports
    if _ports is None:
        own = _own_ports()
        _ports = itertools.cycle(own) if own else iter(())
    for _ in range(1000):
        port = next(_ports, None)
        if port is None:
            break
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use, or closed by this process a moment ago (TIME_WAIT)
                continue
            return port
    with socket.socket() as sock:  # no such range here: any free port
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def refused_port() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections for as long as this lasts: held bound and
    never listening, so that no other test's server takes it meanwhile (a port of
    `free_port` may be listened on by another test once it is given)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or utc_now()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)


class FailingEngine(_SharedEngine):
    """An engine that fails every job with the error it was built with."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        raise self.error


# Another process that takes the write lock of a SQLite file, says so, and lets it go when its
# stdin closes (as `dreamserve accounts add` or a backup would hold it).
_LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.rollback()
"""


class HeldLock:
    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._process = process

    def release(self) -> None:
        """Let the lock go; returns once it is free."""
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            self._process.wait(5)


@contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real file system of `size` (tmpfs, e.g. "1m") mounted at `where`, unmounted after;
    the test is skipped, saying why, where this process may not mount one (not root, or a
    container without CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'mount failed'}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)


def fill(disk: Path) -> Path:
    """Fill the file system of `disk` to its last byte with one file; that file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = 65536
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as error:  # no space: smaller pieces, down to one byte
                if error.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    return filler


@contextmanager
def holding_write_lock(database: Path) -> Iterator[HeldLock]:
    """Another process holds the SQLite file's write lock (BEGIN IMMEDIATE) until the block
    ends or `release()`."""
    process = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    held = HeldLock(process)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "locked\n"
        yield held
    finally:
        held.release()
        if process.stdout is not None:
            process.stdout.close()
