"""The `s3://bucket/prefix` blob store: objects in any S3-compatible store, through obstore.

Where the store is and who we are come from the standard variables, which obstore reads
itself: `AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, and `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint such as a local test
store (the variables every other S3 tool of the deployment reads). Links are the API's own
signed links, which it serves by reading the object (the default: clients need reach only the
API), or the store's presigned URLs (`DREAMSERVE_BLOB_LINKS=presigned`: the bytes skip the API,
and clients must reach the store's endpoint).
"""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta
from functools import lru_cache
from typing import IO

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import S3Store

from dreamserve.errors import NotFound
from dreamserve.links import LinkSigner
from dreamserve.storage.blob_keys import check_key

# obstore's *_async calls resolve their Python futures from tokio's threads; a process that
# exits after one failed (a refused connection) aborted (SIGABRT, exit 134) in 15 of 30 runs
# on Python 3.11, a tokio thread taking the GIL while the interpreter finalized. The blocking
# calls in a worker thread keep every Python object on Python's threads: 0 of 30. So each call
# below is obstore's blocking call run by `asyncio.to_thread`.

# A failed request is retried (obstore: connection errors, 5xx, 429) for at most this long, so
# that a job or an upload waiting on an unavailable store fails in bounded time.
RETRY_SECONDS = 10


class S3BlobStore:
    """Each blob one object under the bucket's prefix. An object PUT is atomic: readers see the
    old object or the new one, never part of either."""

    def __init__(self, bucket: str, prefix: str, signer: LinkSigner, presigned: bool) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.signer = signer
        self.presigned = presigned
        self._store = S3Store(
            bucket,
            prefix=prefix or None,
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=RETRY_SECONDS)},
        )
        # Polling asks for the same links again and again within one expiry window.
        self._presign = lru_cache(maxsize=8192)(self._presigned_url)

    async def put(self, key: str, data: bytes) -> None:
        check_key(key)
        try:
            await asyncio.to_thread(obstore.put, self._store, key, bytes(data))
        except BaseError as error:
            raise _unavailable("store", key, error) from error

    async def put_file(self, key: str, file: IO[bytes]) -> None:
        """As `put`, read from the file a part at a time (obstore uploads a large file in
        parts, a multipart upload, each part sent before the next is read)."""
        check_key(key)
        try:
            await asyncio.to_thread(obstore.put, self._store, key, file)
        except BaseError as error:
            raise _unavailable("store", key, error) from error

    async def get(self, key: str) -> bytes:
        check_key(key)
        try:
            return await asyncio.to_thread(self._read, key)
        except NotFoundError:
            raise FileNotFoundError(f"no blob {key!r}") from None
        except BaseError as error:
            raise _unavailable("read", key, error) from error

    async def delete(self, key: str) -> None:
        check_key(key)
        try:
            # S3 answers a missing object's delete as any other
            await asyncio.to_thread(obstore.delete, self._store, key)
        except NotFoundError:
            pass
        except BaseError as error:
            raise _unavailable("delete", key, error) from error

    def link(self, key: str) -> str:
        if self.presigned:
            return self._presign(key, self.signer.expiry())
        return self.signer.url(key)

    def link_expiry(self) -> int:
        return self.signer.expiry()

    async def open_link(self, key: str, expires: str | None, signature: str | None) -> bytes:
        if self.presigned:  # the links point at the store: the API serves no file
            raise NotFound("Not Found")
        self.signer.verify(key, expires, signature)
        try:
            return await self.get(key)
        except (FileNotFoundError, ValueError):  # ValueError: not a blob key
            raise NotFound("File not found") from None

    def _read(self, key: str) -> bytes:
        return bytes(obstore.get(self._store, key).bytes())

    def _presigned_url(self, key: str, expires: int) -> str:
        """A GET of the object signed by the store's credentials (SigV4, computed here, no
        request), valid until `expires`, the end of the links' window (at least the TTL)."""
        seconds = math.ceil(expires - self.signer.clock().timestamp())
        return obstore.sign(self._store, "GET", check_key(key), timedelta(seconds=seconds))


def _unavailable(action: str, key: str, error: BaseError) -> OSError:
    """An OSError, as a disk's errors are, naming the object: callers treat both alike."""
    first_line = str(error).split("\n", 1)[0]  # the rest is obstore's debug dump
    return OSError(f"object store: cannot {action} {key}: {first_line}")
