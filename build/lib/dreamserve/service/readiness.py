"""The checks behind GET /readyz (api/health.py): whether this server can do its work.

The checks, each bounded by `CHECK_SECONDS` and all at once:
- `database`: one read of the schema's revision, which must be the package's newest migration;
- `blobs`: a probe blob written and deleted under the reserved prefix `readiness/`, through the
  BlobStore interface (the disk or the bucket);
- `runners`: in a process that runs jobs, its job tasks (the reaper, the runner lock's watch,
  procrastinate's workers) still running; "not run here" in one that runs none.
Requests that come while a check runs share it: a flood of probes costs one check at a time.
The reasons in the reply are short; the server log says more, once per change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from dreamserve.errors import DatabaseBusy, StorageFull
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.database import Database

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0  # each check's bound: /readyz answers within it
PROBE_PREFIX = "readiness"  # blob keys under it are the probe's own
NOT_RUN_HERE = "not run here"

RunnerTasks = Callable[[], Sequence["asyncio.Task[None]"]]


@dataclass
class Readiness:
    """The checks of /readyz for one server; `runners` gives the tasks that run jobs here
    (None: this process runs no jobs)."""

    db: Database
    blobs: BlobStore
    runners: RunnerTasks | None
    seconds: float = CHECK_SECONDS
    _current: asyncio.Future[dict[str, str]] | None = field(default=None, repr=False)
    _failing: dict[str, str] = field(default_factory=dict, repr=False)

    async def check(self) -> dict[str, str]:
        """Each check's result: "ok" (or "not run here"), or why it fails."""
        if self._current is None or self._current.done():
            self._current = asyncio.ensure_future(self._check_all())
        return await asyncio.shield(self._current)

    async def _check_all(self) -> dict[str, str]:
        details: dict[str, str] = {}
        database, blobs = await asyncio.gather(
            self._bounded(check_database(self.db, details)),
            self._bounded(check_blobs(self.blobs, details)),
        )
        runners = NOT_RUN_HERE if self.runners is None else check_runners(self.runners())
        checks = {"database": database, "blobs": blobs, "runners": runners}
        self._log_changes(checks, details)
        return checks

    async def _bounded(self, check: Coroutine[Any, Any, str]) -> str:
        try:
            async with asyncio.timeout(self.seconds):
                return await check
        except TimeoutError:
            return f"no answer within {self.seconds:g} s"

    def _log_changes(self, checks: dict[str, str], details: dict[str, str]) -> None:
        """A check that starts failing (or fails otherwise) logged once, with the error's text
        that the reply leaves out (paths, hosts); one that passes again, once."""
        for name, result in checks.items():
            failing = result not in ("ok", NOT_RUN_HERE)
            if failing and self._failing.get(name) != result:
                detail = f": {details[name]}" if name in details else ""
                log.warning("not ready: %s: %s%s", name, result, detail)
                self._failing[name] = result
            elif not failing and self._failing.pop(name, None) is not None:
                log.info("ready again: %s", name)


def failing(checks: dict[str, str]) -> dict[str, str]:
    return {name: result for name, result in checks.items() if result not in ("ok", NOT_RUN_HERE)}


@cache
def migration_heads() -> frozenset[str]:
    """The newest revision(s) of the package's migrations (read once)."""
    config = Config()
    location = resources.files("dreamserve") / "storage" / "migrations"
    config.set_main_option("script_location", str(location))
    return frozenset(ScriptDirectory.from_config(config).get_heads())


def _revisions(conn: Connection) -> frozenset[str]:
    return frozenset(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())


def _detail(error: BaseException) -> str:
    return str(error).strip().split("\n", 1)[0] or type(error).__name__


async def check_database(db: Database, details: dict[str, str] | None = None) -> str:
    """Whether the database answers one read and its schema is at the newest migration: "ok",
    or why not (the error's text in `details`)."""
    try:
        found = await db.read(_revisions)
    except DatabaseBusy:
        return "busy (locked by another transaction)"
    except Exception as error:
        if details is not None:
            details["database"] = _detail(error)
        cause = error.orig if isinstance(error, DBAPIError) else error
        return f"unreachable ({type(cause).__name__})"
    heads = migration_heads()
    if found != heads:
        at = ", ".join(sorted(found)) or "no revision"
        return f"schema at {at}, this version needs {', '.join(sorted(heads))}"
    return "ok"


async def check_blobs(blobs: BlobStore, details: dict[str, str] | None = None) -> str:
    """Whether a probe blob can be written and deleted: "ok", or why not (the error's text in
    `details`)."""
    key = f"{PROBE_PREFIX}/{os.getpid()}-{secrets.token_hex(8)}.probe"
    try:
        await blobs.put(key, b"ok")
        await blobs.delete(key)
    except StorageFull:
        return "not writable (no space left)"
    except Exception as error:
        if details is not None:
            details["blobs"] = _detail(error)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else None
        return f"not writable ({reason or type(error).__name__})"
    return "ok"


def check_runners(tasks: Sequence[asyncio.Task[None]]) -> str:
    """Whether every task still runs: "ok", or which ended, and how."""
    ended = []
    for task in tasks:
        if not task.done():
            continue
        if task.cancelled():
            ended.append(f"{task.get_name()} stopped")
        elif (error := task.exception()) is not None:
            ended.append(f"{task.get_name()} crashed ({type(error).__name__})")
        else:
            ended.append(f"{task.get_name()} ended")
    return ", ".join(ended) if ended else "ok"
