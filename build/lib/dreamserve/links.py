"""Signed, expiring links to files served by the API: HMAC-SHA256 over the key and expiry."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from urllib.parse import quote

from dreamserve.errors import Forbidden

FILES_PATH = "/v1/dreamina/files/"
_EXPIRES = re.compile(r"[0-9]{1,12}")


class LinkSigner:
    """Makes and checks links of the form `<base>/v1/dreamina/files/<key>?expires=..&signature=..`.

    Expiry times are rounded up to a multiple of `ttl / 8`, so repeated GETs of a job return the
    same URL (cache friendly); every link lives at least `ttl` and at most 9/8 of it.
    """

    def __init__(
        self, key: bytes, base_url: str, ttl_seconds: int, clock: Callable[[], datetime]
    ) -> None:
        self._key = hashlib.sha256(b"dreamserve links\0" + key).digest()
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl_seconds
        self.clock = clock
        # Polling asks for the same links again and again within one expiry window.
        self._signed = lru_cache(maxsize=8192)(self._link)

    def url(self, key: str) -> str:
        return self._signed(key, self.expiry())

    def expiry(self) -> int:
        """The expiry time (Unix seconds) of the links made now."""
        step = max(1, self.ttl // 8)
        return math.ceil((self.clock().timestamp() + self.ttl) / step) * step

    def _link(self, key: str, expires: int) -> str:
        query = f"expires={expires}&signature={self.sign(key, expires)}"
        return f"{self.base_url}{FILES_PATH}{quote(key)}?{query}"

    def sign(self, key: str, expires: int) -> str:
        digest = hmac.new(self._key, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def verify(self, key: str, expires: str | None, signature: str | None) -> None:
        """Raise Forbidden unless the link is untampered and unexpired."""
        if (
            not expires
            or not signature
            or not _EXPIRES.fullmatch(expires)
            or not signature.isascii()
        ):
            raise Forbidden("Invalid link signature")
        if not hmac.compare_digest(self.sign(key, int(expires)), signature):
            raise Forbidden("Invalid link signature")
        if int(expires) < self.clock().timestamp():
            raise Forbidden("Link expired")
