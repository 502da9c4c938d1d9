"""Blob stores: where image files live, and the links clients fetch them from.

`BlobStore` is the seam (local disk today, an S3 bucket when one machine is not enough).
Keys are relative, slash-separated paths made by the server, never by a client.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from dreamserve.errors import NotFound
from dreamserve.links import LinkSigner

_KEY = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*\.[A-Za-z0-9]+")

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_TYPE_OF_EXTENSION = {
    EXTENSIONS[name]: content_type for name, content_type in CONTENT_TYPES.items()
}


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any earlier blob; readers never see a partial one."""

    async def get(self, key: str) -> bytes:
        """The blob's bytes; FileNotFoundError when there is none."""

    async def delete(self, key: str) -> None:
        """Remove the blob; no error when it is already gone."""

    def link(self, key: str) -> str:
        """A URL that fetches the blob with a plain GET, without a token, until it expires."""

    def link_expiry(self) -> int:
        """When the links made now expire (Unix seconds); links made until it changes are the
        same, so a record holding them can be reused."""


class LocalBlobStore:
    """Files under a root directory, served by the API itself through signed, expiring links."""

    def __init__(self, root: Path, signer: LinkSigner) -> None:
        self.root = root
        self.signer = signer

    def path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._write, self.path(key), data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self.path(key).read_bytes)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path(key).unlink, True)

    def link(self, key: str) -> str:
        return self.signer.url(key)

    def link_expiry(self) -> int:
        return self.signer.expiry()

    def open(self, key: str, expires: str | None, signature: str | None) -> Path:
        """The file a signed link points at: Forbidden for a bad or expired link, NotFound when
        there is no such file."""
        self.signer.verify(key, expires, signature)
        path = self.path(key) if is_blob_key(key) else None
        if path is None or not path.is_file():
            raise NotFound("File not found")
        return path

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise


def is_blob_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None


def content_type(key: str) -> str:
    """The Content-Type of a blob, from its key's extension."""
    return _TYPE_OF_EXTENSION.get(key.rpartition(".")[2], "application/octet-stream")
