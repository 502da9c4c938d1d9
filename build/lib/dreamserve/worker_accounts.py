"""The accounts a `dreamserve worker` started without `--accounts` takes: every account whose
engine this process can load (an engine it does not have, or whose module or dependencies do
not import here, as `diffusers` on a host without torch, is left to other workers). The list is
read again every few seconds, so that accounts added later are taken without a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, select

from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import EngineUnavailable
from dreamserve.storage.database import Database
from dreamserve.storage.tables import accounts

# How often a worker without `--accounts` reads the accounts again for new ones.
RELIST_SECONDS = 5.0


@dataclass(frozen=True)
class Picked:
    taken: list[str]  # account names, in order
    left: dict[str, str]  # account name -> why it is left


class AccountPicker:
    """Picks the accounts whose engines load here; an engine is tried once per process (a
    package installed later needs a restart, as for the server)."""

    def __init__(self, db: Database, engines: EngineRegistry) -> None:
        self._db = db
        self._engines = engines
        self._loads: dict[str, str | None] = {}  # engine -> None (loads) or why not

    def why_not(self, engine: str) -> str | None:
        """None when this process can load `engine`; else the reason, in words."""
        if engine not in self._loads:
            try:
                self._engines.factory(engine)
                self._loads[engine] = None
            except EngineUnavailable as error:  # not installed, not importable, broken
                self._loads[engine] = error.message
        return self._loads[engine]

    async def pick(self) -> Picked:
        """Every account's name, taken when each account of that name (a name's queue is
        shared by the accounts of that name, one per owner) has an engine that loads here."""
        rows = await self._db.read(_account_engines)
        reasons: dict[str, str | None] = {}
        for name, engine in rows:
            why = self.why_not(engine)
            if reasons.get(name) is None:
                reasons[name] = why
        taken = [name for name, why in reasons.items() if why is None]
        left = {name: why for name, why in reasons.items() if why is not None}
        return Picked(taken, left)

    async def missing(self, names: Sequence[str]) -> list[str]:
        """The names of `names` that no account has (yet)."""
        known = {name for name, _ in await self._db.read(_account_engines)}
        return [name for name in names if name not in known]


def _account_engines(conn: Connection) -> list[tuple[str, str]]:
    query = select(accounts.c.name, accounts.c.engine).order_by(accounts.c.name, accounts.c.id)
    return [(str(name), str(engine)) for name, engine in conn.execute(query)]
