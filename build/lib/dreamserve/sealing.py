"""Secrets at rest: an account's secret settings (API keys, tokens) sealed with Fernet.

The key lives in the data dir (`secrets.key`, mode 0600, made on first start) and never in the
database, so a copy of the database alone reveals no credentials. Every process that runs jobs
of the database (the server, the CLI, workers) needs the same key file.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping

from cryptography.fernet import Fernet, InvalidToken


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the secrets key must be 32 bytes")
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, secrets: Mapping[str, str]) -> str | None:
        """The secrets as one opaque string to store; None when there are none."""
        if not secrets:
            return None
        return self._fernet.encrypt(json.dumps(dict(secrets)).encode()).decode("ascii")

    def open(self, sealed: str | None) -> dict[str, str]:
        """What `seal` was given. ValueError when the string was sealed with another key."""
        if sealed is None:
            return {}
        try:
            opened: dict[str, str] = json.loads(self._fernet.decrypt(sealed.encode("ascii")))
        except InvalidToken:
            raise ValueError(
                "account secrets were sealed with another key: restore the data dir's secrets.key"
            ) from None
        return opened
