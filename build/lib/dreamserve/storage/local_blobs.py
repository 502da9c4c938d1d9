"""The `file://` blob store: files under a directory, served by the API through signed links."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dreamserve.errors import NotFound, StorageFull, is_disk_full
from dreamserve.links import LinkSigner
from dreamserve.storage.blob_keys import check_key, is_blob_key


class LocalBlobStore:
    """Files under a root directory, served by the API itself through signed, expiring links.
    Disk work runs in threads, off the event loop."""

    def __init__(self, root: Path, signer: LinkSigner) -> None:
        self.root = root
        self.signer = signer

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes) -> None:
        """StorageFull when the disk or the quota has no space left (nothing written, no
        temporary file left); any other OSError as it came."""
        await self._off_loop(self._write, self.path(key), data)

    async def put_file(self, key: str, file: IO[bytes]) -> None:
        """As `put`, copied a chunk at a time."""
        await self._off_loop(self._copy, self.path(key), file)

    @staticmethod
    async def _off_loop(write: Callable[[Path, Any], None], path: Path, source: Any) -> None:
        try:
            await asyncio.to_thread(write, path, source)
        except OSError as error:
            if is_disk_full(error):
                raise StorageFull from error
            raise

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self.path(key).read_bytes)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.path(key).unlink, True)

    def link(self, key: str) -> str:
        return self.signer.url(key)

    def link_expiry(self) -> int:
        return self.signer.expiry()

    async def open_link(self, key: str, expires: str | None, signature: str | None) -> Path:
        self.signer.verify(key, expires, signature)
        # Even a correctly signed key must be a blob key: a link never leaves the root. The
        # stat costs less than a hop to a thread and back.
        path = self.path(key) if is_blob_key(key) else None
        if path is None or not path.is_file():
            raise NotFound("File not found")
        return path

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        _replace(path, lambda file: file.write(data))

    @staticmethod
    def _copy(path: Path, source: IO[bytes]) -> None:
        _replace(path, lambda file: shutil.copyfileobj(source, file))


def _replace(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a file with `write`: into a temporary file in the same directory, renamed over
    the blob, so that a reader sees the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
