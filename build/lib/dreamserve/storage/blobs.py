"""Blob stores: where image files live, and the links clients fetch them from.

`BlobStore` is the seam; `open_blob_store` picks the implementation from a URL, as
`open_database` does for the database: `file://` (local_blobs.py, the default), `memory://`
(memory_blobs.py) and `s3://` (s3_blobs.py, any S3-compatible store, when one machine is not
enough). Keys are relative,
slash-separated paths made by the server, never by a client.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Protocol
from urllib.parse import SplitResult, unquote_to_bytes, urlsplit

from dreamserve.config import ConfigError
from dreamserve.links import LinkSigner

_URL_FORMS = "file:///<absolute dir>, file:<relative dir>, memory:// or s3://<bucket>[/<prefix>]"


class BlobStore(Protocol):
    """Every method taking a key raises ValueError for one that is not a blob key (`../x`,
    `a b.jpg`, an absolute path), before touching anything."""

    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any earlier blob; readers never see a partial one.
        StorageFull when the store has no space left for it: nothing of it is kept."""

    async def put_file(self, key: str, file: IO[bytes]) -> None:
        """Store what `file` holds from its current position to its end, as `put` stores
        bytes, without holding all of it in memory where the store can (an upload spooled to
        a temporary file)."""

    async def get(self, key: str) -> bytes:
        """The blob's bytes; FileNotFoundError when there is none."""

    async def delete(self, key: str) -> None:
        """Remove the blob; no error when it is already gone. OSError when the store cannot
        (a disk or network error): the blob may still be there, and a later call may succeed."""

    def link(self, key: str) -> str:
        """A URL that fetches the blob with a plain GET, without a token, until it expires."""

    def link_expiry(self) -> int:
        """When the links made now expire (Unix seconds); links made until it changes are the
        same, so a record holding them can be reused."""

    async def open_link(self, key: str, expires: str | None, signature: str | None) -> bytes | Path:
        """What a link of this store points at, for the API's files route to serve: a Path when
        the blob is a file on this machine (streamed from the disk), else its bytes.

        Forbidden("Invalid link signature") or Forbidden("Link expired") for a tampered or
        expired link, checked first; then NotFound("File not found") when there is no such blob
        (a key that is not a blob key included). A store whose links point elsewhere (a
        bucket's presigned URLs) raises NotFound("Not Found"), as if the route were not there.
        """


def open_blob_store(url: str, signer: LinkSigner, presigned: bool = False) -> BlobStore:
    """The blob store a URL names; `signer` makes and checks the links of stores the API serves.
    `presigned`: links are the store's own presigned URLs (`s3://` only).

    - `file:///absolute/dir` (or `file://localhost/absolute/dir`), or `file:relative/dir`
      (relative to the working directory, as the data dir may be): files on this disk. The
      path is percent-decoded; `file://dir` is refused, since `dir` would be a host.
    - `memory://`: a dict of this process (tests, ephemeral servers).
    - `s3://bucket` or `s3://bucket/prefix`: objects in an S3-compatible store, which the
      standard `AWS_*` variables locate (s3_blobs.py).

    ConfigError, saying what is accepted, for anything else.
    """
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise ConfigError(f"Blob store URL {url} does not name a bucket: use {_URL_FORMS}")
        try:
            from dreamserve.storage.s3_blobs import S3BlobStore
        except ImportError:
            raise ConfigError(
                f"Blob store URL {url} needs obstore: pip install 'dreamserve[s3]'"
            ) from None

        return S3BlobStore(parts.netloc, parts.path.strip("/"), signer, presigned)
    if presigned:
        raise ConfigError(f"Presigned links need an s3:// blob store, not {url}")
    if parts.scheme == "file":
        from dreamserve.storage.local_blobs import LocalBlobStore

        return LocalBlobStore(_directory(url, parts), signer)
    if parts.scheme == "memory":
        if parts.netloc or parts.path or parts.query or parts.fragment:
            raise ConfigError(f"Blob store URL {url} takes nothing after memory://")
        from dreamserve.storage.memory_blobs import MemoryBlobStore

        return MemoryBlobStore(signer)
    raise ConfigError(f"Blob store URL {url} is not supported: use {_URL_FORMS}")


def _directory(url: str, parts: SplitResult) -> Path:
    """The directory a `file:` URL names."""
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(f"Blob store URL {url} names the host {parts.netloc}: use {_URL_FORMS}")
    if not parts.path or parts.query or parts.fragment:
        raise ConfigError(f"Blob store URL {url} does not name a directory: use {_URL_FORMS}")
    # Bytes, then the file system's decoding: a directory name need not be UTF-8.
    return Path(os.fsdecode(unquote_to_bytes(parts.path)))
