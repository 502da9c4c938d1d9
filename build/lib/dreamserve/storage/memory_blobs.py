"""The `memory://` blob store: blobs in a dict of this process, served by the API through the
same signed links as files. For tests and ephemeral servers: its contents vanish when the
process stops, so a restarted server's records point at images it no longer has."""

from __future__ import annotations

from typing import IO

from dreamserve.errors import NotFound
from dreamserve.links import LinkSigner
from dreamserve.storage.blob_keys import check_key


class MemoryBlobStore:
    """Blobs held as bytes in this process; every call runs on the event loop, and a dict
    assignment is whole, so readers never see a partial blob."""

    def __init__(self, signer: LinkSigner) -> None:
        self.signer = signer
        self._blobs: dict[str, bytes] = {}

    async def put(self, key: str, data: bytes) -> None:
        # A copy when given a mutable buffer: a later change to it must not reach the store.
        self._blobs[check_key(key)] = bytes(data)

    async def put_file(self, key: str, file: IO[bytes]) -> None:
        key = check_key(key)
        self._blobs[key] = file.read()

    async def get(self, key: str) -> bytes:
        try:
            return self._blobs[check_key(key)]
        except KeyError:
            raise FileNotFoundError(f"no blob {key!r}") from None

    async def delete(self, key: str) -> None:
        self._blobs.pop(check_key(key), None)

    def link(self, key: str) -> str:
        return self.signer.url(key)

    def link_expiry(self) -> int:
        return self.signer.expiry()

    async def open_link(self, key: str, expires: str | None, signature: str | None) -> bytes:
        self.signer.verify(key, expires, signature)
        blob = self._blobs.get(key)  # a key that is not a blob key is never there
        if blob is None:
            raise NotFound("File not found")
        return blob
