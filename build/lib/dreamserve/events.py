"""Job change notifications: what wakes `GET /images/<jobid>?wait=`, the event stream and the
webhook deliverer, instead of a loop over the database.

Whoever commits a change to a job calls `JobEvents.publish` after the commit (in this process)
and, inside the transaction, `announce` (PostgreSQL: a NOTIFY, delivered at commit to every
other process that listens, which `PostgresFeed` turns into `publish` there). A waiter holds no
database connection: it watches an asyncio event and reads the job once per change.

On SQLite every job change of a server is made by that server, with one exception: a CLI
command in another process (`accounts remove` cancels jobs). A waiter on such a job wakes at
its deadline, or when the runner of the job sees the change at its next lease renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator

import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "dreamserve_jobs"
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


class Watch:
    """One waiter's view of one job: set on every change, `ended` once it ended, `stopping`
    once the server shuts down (then every wait returns at once: the waiter should answer with
    what it has and go)."""

    def __init__(self, stopping: bool = False) -> None:
        self._changed = asyncio.Event()
        self.ended = False
        self.stopping = stopping

    async def changed(self, seconds: float) -> bool:
        """Wait up to `seconds` for a change since the last call; whether one came. True at
        once while the server is stopping."""
        if self.stopping:
            return True
        try:
            async with asyncio.timeout(seconds):
                await self._changed.wait()
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    def _set(self, ended: bool) -> None:
        self.ended = self.ended or ended
        self._changed.set()

    def _stop(self) -> None:
        self.stopping = True
        self._changed.set()


class JobEvents:
    def __init__(self) -> None:
        self._watches: dict[str, set[Watch]] = {}
        self._endings: set[asyncio.Event] = set()
        self._listeners: list[Callable[[str], None]] = []
        self._end_listeners: list[Callable[[str], None]] = []
        self.origin = secrets.token_hex(8)  # this process, in its NOTIFY payloads
        self.generation = 0  # counts publications: a read that saw none is not stale
        self.stopping = False  # the server is shutting down: no waiter waits any more

    @contextlib.contextmanager
    def watch(self, jobid: str) -> Iterator[Watch]:
        """Watch a job for as long as the block runs. Start watching before reading the job, so
        that a change between the read and the wait is not missed."""
        watch = Watch(self.stopping)
        self._watches.setdefault(jobid, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(jobid)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[jobid]

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call `listener(jobid)` for every job published as changed (caches drop it)."""
        self._listeners.append(listener)

    def on_end(self, listener: Callable[[str], None]) -> None:
        """Call `listener(jobid)` for every job published as ended, by this process or another
        (a runner stops the engine of a job cancelled elsewhere)."""
        self._end_listeners.append(listener)

    def endings(self) -> asyncio.Event:
        """An event set whenever any job ends (the webhook deliverer waits on it)."""
        event = asyncio.Event()
        self._endings.add(event)
        return event

    def publish(self, jobids: Iterable[str], *, ended: bool, surely: bool = True) -> None:
        """Jobs changed (progress, or their end with `ended`): wake their waiters. Call it on
        the event loop, after the change committed. An end not `surely` one (a job found ended
        or taken back) wakes the waiters, but not the `on_end` listeners: a job taken back runs
        again, and its new attempt must not be stopped."""
        self.generation += 1
        any_job = False
        for jobid in jobids:
            any_job = True
            for listener in self._listeners:
                listener(jobid)
            if ended and surely:
                for listener in self._end_listeners:
                    listener(jobid)
            for watch in self._watches.get(jobid, ()):
                watch._set(ended)
        if ended and any_job:
            for event in self._endings:
                event.set()

    def wake_all(self) -> None:
        """Wake every waiter to read its job again (notifications may have been missed)."""
        self.generation += 1
        for watches in self._watches.values():
            for watch in watches:
                watch._set(False)
        for event in self._endings:
            event.set()

    def stop(self) -> None:
        """The server is shutting down: wake every waiter, now and from now on, to answer with
        the job as it is (`?wait=` returns the record, an event stream sends it and ends),
        so that a shutdown never waits for a job to end. Idempotent."""
        self.stopping = True
        for watches in self._watches.values():
            for watch in watches:
                watch._stop()

    def announce(self, conn: Connection, jobids: Iterable[str], *, ended: bool) -> None:
        """Inside a transaction that changes jobs: tell the other processes at commit
        (PostgreSQL NOTIFY; nothing on SQLite, where no other server runs)."""
        if conn.dialect.name != "postgresql":
            return
        kind = "e" if ended else "p"
        for jobid in jobids:
            payload = f"{self.origin} {kind} {jobid}"
            conn.execute(_NOTIFY, {"channel": CHANNEL, "payload": payload})


class PostgresFeed:
    """LISTENs on a PostgreSQL connection of its own and publishes what other processes
    announce. Reconnects after a loss, and then wakes every waiter (it may have missed some)."""

    RECONNECT_SECONDS = 1.0

    def __init__(self, url: str, events: JobEvents) -> None:
        self.url = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.events = events
        self.listening = asyncio.Event()

    async def run_forever(self) -> None:
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError) as error:
                log.warning("job notifications lost (%s); reconnecting", error)
            self.listening.clear()
            self.events.wake_all()
            await asyncio.sleep(self.RECONNECT_SECONDS)

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self.listening.set()
            async for notice in conn.notifies():
                origin, kind, jobid = [*notice.payload.split(" ", 2), "", ""][:3]
                if origin != self.events.origin and jobid:
                    self.events.publish([jobid], ended=kind == "e")
