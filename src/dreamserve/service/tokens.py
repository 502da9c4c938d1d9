"""Users and their API tokens: who a request is, new tokens, and the first start's user."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Connection

from dreamserve.errors import NotFound, Unauthorized
from dreamserve.ids import new_token, parse_token
from dreamserve.jobs import millis
from dreamserve.service.config import ServiceConfig
from dreamserve.storage import account_queries, user_queries
from dreamserve.storage.database import Database
from dreamserve.storage.tables import SHARED

DEFAULT_ACCOUNT = "LOCAL:procedural"


class Tokens:
    def __init__(self, db: Database, clock: Callable[[], datetime], config: ServiceConfig) -> None:
        self.db = db
        self.clock = clock
        self.config = config
        self._known: dict[str, tuple[int, float]] = {}

    async def authenticate(self, authorization: str | None) -> int:
        """The user id of an `Authorization: Bearer <token>` header; Unauthorized otherwise.

        Known tokens are remembered for `token_cache_seconds`, so polling costs no token query.
        """
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            raise Unauthorized
        digest = _hash(token)
        cached = self._known.get(digest)  # only well-formed tokens are ever remembered
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        if parse_token(token) is None:
            raise Unauthorized
        user_id = await self.db.read(lambda conn: user_queries.user_of_token(conn, digest))
        if user_id is None or user_id != parse_token(token):
            raise Unauthorized
        if len(self._known) >= 10_000:
            self._known.clear()
        self._known[digest] = (user_id, time.monotonic() + self.config.token_cache_seconds)
        return user_id

    async def create(self, user_id: int | None = None) -> tuple[int, str]:
        """A new token for `user_id`, or for a new user when None. Only its hash is stored."""
        now = millis(self.clock())

        def create(conn: Connection) -> tuple[int, str]:
            if user_id is None:
                owner = user_queries.insert_user(conn, now)
            elif user_queries.user_exists(conn, user_id):
                owner = user_id
            else:
                raise NotFound(f"User {user_id} not found")
            token = new_token(owner)
            user_queries.insert_token(conn, owner, _hash(token), now)
            return owner, token

        return await self.db.write(create)

    async def bootstrap(self, placeholder: bool = True) -> str | None:
        """On the first start of an empty database: user 1, its token (returned, never stored in
        clear) and, with `placeholder` (the operator's configuration declares no accounts), the
        shared procedural account. None on every later start."""
        now = millis(self.clock())

        def first_start(conn: Connection) -> str | None:
            user_queries.lock_first_start(conn)
            if user_queries.count_users(conn):
                return None
            user_id = user_queries.insert_user(conn, now)
            token = new_token(user_id)
            user_queries.insert_token(conn, user_id, _hash(token), now)
            if not placeholder:
                return token
            region, _, email = DEFAULT_ACCOUNT.partition(":")
            account_queries.insert_account(
                conn,
                name=DEFAULT_ACCOUNT,
                owner=SHARED,
                email=email,
                region=region,
                engine="procedural",
                max_jobs=10,
                now=now,
            )
            return token

        return await self.db.write(first_start)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
