"""Per-user webhook signing secrets: made on first use, rotated on request, sealed at rest.

A rotation keeps the old secret signing beside the new one for `overlap_seconds` (24 hours), as
the Standard Webhooks multi-signature header allows, so receivers can switch without losing a
delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from dreamserve.jobs import millis
from dreamserve.sealing import SecretBox
from dreamserve.storage import webhook_queries
from dreamserve.storage.database import Database
from dreamserve.storage.webhook_queries import SecretRow
from dreamserve.webhooks.rules import new_secret


@dataclass(frozen=True)
class Secrets:
    current: str
    previous: str | None  # still signing until `previous_until` (ms)
    previous_until: int | None


class WebhookSecrets:
    def __init__(
        self,
        db: Database,
        box: SecretBox,
        clock: Callable[[], datetime],
        overlap_seconds: float = 86_400,
    ) -> None:
        self.db = db
        self.box = box
        self.clock = clock
        self.overlap_ms = int(overlap_seconds * 1000)

    async def get(self, user_id: int) -> Secrets:
        """The user's secrets, the current one made now if the user has none yet."""
        now = millis(self.clock())
        found = await self.db.read(lambda conn: webhook_queries.secret_of(conn, user_id))
        if found is not None:
            return self._open(found, now)

        def get_or_make(conn: Connection) -> Secrets:
            row = webhook_queries.secret_of(conn, user_id, lock=True)
            if row is None:
                row = SecretRow(self._seal(new_secret()), None, None)
                webhook_queries.save_secret(conn, user_id, row, now, exists=False)
            return self._open(row, now)

        try:
            return await self.db.write(get_or_make)
        except IntegrityError:  # made at the same time by another request: read that one
            return await self.db.write(get_or_make)

    async def rotate(self, user_id: int) -> Secrets:
        """A new current secret; the old one keeps signing for the overlap."""
        now = millis(self.clock())

        def rotate(conn: Connection) -> Secrets:
            old = webhook_queries.secret_of(conn, user_id, lock=True)
            row = SecretRow(
                self._seal(new_secret()),
                None if old is None else old.secret,
                None if old is None else now + self.overlap_ms,
            )
            webhook_queries.save_secret(conn, user_id, row, now, exists=old is not None)
            return self._open(row, now)

        try:
            return await self.db.write(rotate)
        except IntegrityError:
            return await self.db.write(rotate)

    async def signing_keys(self, user_id: int) -> list[str]:
        """Every secret a delivery is signed with now: the current one, and the previous one
        while its overlap lasts."""
        secrets = await self.get(user_id)
        return [secrets.current] + ([secrets.previous] if secrets.previous else [])

    def _seal(self, secret: str) -> str:
        sealed = self.box.seal({"secret": secret})
        assert sealed is not None
        return sealed

    def _open(self, row: SecretRow, now: int) -> Secrets:
        current = self.box.open(row.secret)["secret"]
        if row.previous is None or row.previous_until is None or row.previous_until <= now:
            return Secrets(current, None, None)
        return Secrets(current, self.box.open(row.previous)["secret"], row.previous_until)
