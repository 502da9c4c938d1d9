"""Users and their API tokens: who a request is, new tokens, and the first start's user."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from dreamserve.errors import BadRequest, NotFound, Unauthorized
from dreamserve.ids import iso_millis, new_token, parse_token
from dreamserve.jobs import millis
from dreamserve.service.config import ServiceConfig
from dreamserve.storage import account_queries, user_queries
from dreamserve.storage.database import Database
from dreamserve.storage.tables import SHARED

DEFAULT_ACCOUNT = "LOCAL:procedural"
PREFIX_SECRET_CHARS = 6  # of a token's secret kept in clear to name it: 36 of its 256 bits
LAST_USED_MS = 60_000  # a token's `last_used_at` is written at most once a minute


class Tokens:
    """Users and tokens. A revoked token is refused at once by the process that revoked it,
    and by the others once their cache of it expires (`token_cache_seconds`)."""

    def __init__(
        self,
        db: Database,
        clock: Callable[[], datetime],
        config: ServiceConfig,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.clock = clock
        self.config = config
        self.monotonic = monotonic
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
        if cached is not None and cached[1] > self.monotonic():
            return cached[0]
        if parse_token(token) is None:
            raise Unauthorized
        found = await self.db.read(lambda conn: user_queries.user_of_token(conn, digest))
        if found is None or found.user_id != parse_token(token):
            raise Unauthorized
        now = millis(self.clock())
        if found.last_used_at is None or found.last_used_at <= now - LAST_USED_MS:
            await self.db.write(lambda conn: user_queries.mark_used(conn, found.id, now))
        if len(self._known) >= 10_000:
            self._known.clear()
        expires = self.monotonic() + self.config.token_cache_seconds
        self._known[digest] = (found.user_id, expires)
        return found.user_id

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
            user_queries.insert_token(conn, owner, _hash(token), prefix(token), now)
            return owner, token

        return await self.db.write(create)

    async def users(self) -> list[dict[str, Any]]:
        """`dreamserve users list`: each user, its usable tokens and its limits."""
        rows = await self.db.read(user_queries.list_users)
        return [
            {
                "id": row["id"],
                "createdAt": _iso(row["created_at"]),
                "tokens": row["tokens"],
                "maxRunning": row["max_running"],
                "maxPerMinute": row["max_per_minute"],
            }
            for row in rows
        ]

    async def set_limits(self, user_id: int, values: dict[str, int | None]) -> dict[str, Any]:
        """Set a user's limits (None removes one); the user as `users list` shows it. Servers
        apply them within `account_cache_seconds` (Admission caches them with the accounts)."""
        for name, value in values.items():
            if value is not None and value < 1:
                option = name.replace("_", "-")
                raise BadRequest(f"--{option} must be a whole number of 1 or more, or 'none'")
        limits = await self.db.write(lambda conn: user_queries.set_limits(conn, user_id, values))
        if limits is None:
            raise NotFound(f"User {user_id} not found")
        [user] = [each for each in await self.users() if each["id"] == user_id]
        return user

    async def listing(self, user_id: int | None = None) -> list[dict[str, Any]]:
        """`dreamserve tokens list`: each token's id, user, prefix and times; never a secret."""

        def listing(conn: Connection) -> list[dict[str, Any]]:
            if user_id is not None and not user_queries.user_exists(conn, user_id):
                raise NotFound(f"User {user_id} not found")
            return user_queries.list_tokens(conn, user_id)

        return [
            {
                "id": row["id"],
                "user": row["user_id"],
                "prefix": row["prefix"] or f"user:{row['user_id']}-",
                "createdAt": _iso(row["created_at"]),
                "lastUsedAt": _iso(row["last_used_at"]),
                "revokedAt": _iso(row["revoked_at"]),
            }
            for row in await self.db.read(listing)
        ]

    async def revoke(self, name: str) -> dict[str, Any]:
        """Revoke the token of id `name`, or the one token whose prefix starts with `name`;
        the token as `tokens list` shows it."""
        now = millis(self.clock())

        def revoke(conn: Connection) -> int:
            found = user_queries.tokens_named(conn, name)
            if not found:
                raise NotFound(f"Token {name} not found")
            if len(found) > 1:
                ids = ", ".join(str(each["id"]) for each in found)
                raise BadRequest(f"Token prefix {name} names {len(found)} tokens (ids {ids})")
            [token] = found
            user_queries.revoke_token(conn, int(token["id"]), now)  # kept if already revoked
            return int(token["id"])

        token_id = await self.db.write(revoke)
        self._known.clear()  # this process refuses it at once
        [shown] = [each for each in await self.listing() if each["id"] == token_id]
        return shown

    async def without_token(self) -> bool:
        """Whether user 1 exists and was never given a token (none was ever made for it)."""

        def check(conn: Connection) -> bool:
            return user_queries.user_exists(conn, 1) and user_queries.count_tokens(conn, 1) == 0

        return await self.db.read(check)

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
            user_queries.insert_token(conn, user_id, _hash(token), prefix(token), now)
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


def prefix(token: str) -> str:
    """What names a token to people: `user:N-` and the first characters of its secret."""
    owner, _, secret = token.partition("-")
    return f"{owner}-{secret[:PREFIX_SECRET_CHARS]}"


def _iso(at: int | None) -> str | None:
    return None if at is None else iso_millis(at)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
