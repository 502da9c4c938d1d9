"""Request bodies: JSON or form posts read whole as one dict of fields, uploads spooled to a
temporary file, each with a size limit; and `BodyReads`, the count of bodies arriving, per user
and in all, which bounds what clients that hold bodies open can make the server keep.

How long a body may take to arrive is bounded before the app, by the HTTP protocol
(httplimits.py): it knows when the head ended, and it sees the bodies no route reads too.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from starlette.requests import Request
from starlette.types import Message, Receive

from dreamserve.errors import (
    BadRequest,
    DreamserveError,
    PayloadTooLarge,
    StorageFull,
    TooManyBodies,
    TooManyBodiesOfUser,
    is_disk_full,
)

JSON_TYPES = ("", "application/json")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# An upload is kept in memory up to this size, and past it in an unnamed temporary file: a
# client that holds an upload open (all but its last byte sent) holds no more of the server's
# memory than this.
SPOOL_BYTES = 256 * 1024


@dataclass(frozen=True)
class BodyLimits:
    max_bytes: int = 1_048_576  # of a JSON or form body
    reads_per_user: int = 6  # bodies of one user arriving at once
    reads: int = 64  # bodies arriving at once, all users together
    retry_after: int = 5  # seconds, the Retry-After of a refusal
    spool_dir: Path | None = None  # where uploads past SPOOL_BYTES are spooled (None: the OS's)


class BodyReads:
    """The request bodies now arriving, per user and in all. A body past either cap is refused
    before any of it is read: 429 past the user's (`TooManyBodiesOfUser`), 503 past the
    server's (`TooManyBodies`). A body counts from its first read to its last, so the bodies a
    client holds open (and the memory or disk they take) are at most the caps; one that arrives
    at once, as most do, counts for no time at all."""

    def __init__(self, limits: BodyLimits) -> None:
        self.limits = limits
        self._by_user: dict[int, int] = {}
        self._all = 0

    @contextmanager
    def reading(self, user: int) -> Iterator[None]:
        """One of the user's bodies arriving, until the block ends, whatever ends it."""
        limits = self.limits
        held = self._by_user.get(user, 0)
        if held >= limits.reads_per_user:
            raise TooManyBodiesOfUser(limits.reads_per_user, limits.retry_after)
        if self._all >= limits.reads:
            raise TooManyBodies(limits.retry_after)
        self._by_user[user] = held + 1
        self._all += 1
        try:
            yield
        finally:
            self._all -= 1
            left = self._by_user[user] - 1
            if left:
                self._by_user[user] = left
            else:
                del self._by_user[user]

    def in_progress(self, user: int | None = None) -> int:
        """The bodies arriving now: the user's, or everyone's."""
        return self._all if user is None else self._by_user.get(user, 0)


def body_reads(request: Request) -> BodyReads:
    reads: BodyReads = request.app.state.body_reads
    return reads


async def read_fields(request: Request, user: int) -> dict[str, Any]:
    """The posted fields: a JSON object as it is, form fields as strings (files refused)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in JSON_TYPES and media not in FORM_TYPES and not media.endswith("+json"):
        raise BadRequest(
            f"Content-Type ({media}) not supported. Valid values: application/json, "
            "multipart/form-data, application/x-www-form-urlencoded"
        )
    body = await read_body(request, user, body_reads(request).limits.max_bytes)
    if media in FORM_TYPES:
        fields = await _form_fields(request, body)
    elif not body.strip():
        return {}
    else:
        fields = _json(body)
        if not isinstance(fields, dict):
            raise BadRequest("Request body must be a JSON object")
        if not _MAY_BE_UNSTORABLE.search(body):
            return fields
    check_storable(fields)
    return fields


def check_storable(fields: Mapping[str, Any]) -> None:
    """BadRequest when a string of the posted fields (names included) cannot be stored."""
    if not _storable(fields):
        raise BadRequest("Request body has text with NUL or unpaired surrogate characters")


async def read_body(request: Request, user: int, limit: int) -> bytes:
    """The whole body, as one of the user's bodies arriving (`BodyReads`), refused with 413 as
    soon as it passes `limit` bytes."""
    chunks: list[bytes] = []

    async def keep(chunk: bytes, size: int) -> None:
        chunks.append(chunk)

    await _receive(request, user, limit, _too_large, keep)
    return b"".join(chunks)


async def spool_body(
    request: Request, user: int, limit: int, too_large: Callable[[int], DreamserveError]
) -> IO[bytes]:
    """The whole body in a file positioned at its start (the caller closes it), as one of the
    user's bodies arriving (`BodyReads`): in memory up to SPOOL_BYTES, past that in an unnamed
    temporary file. Refused with the error `too_large` makes as soon as it passes `limit`
    bytes; 507 when the disk is full."""
    where = body_reads(request).limits.spool_dir
    # Closed here when the body fails, by the caller otherwise.
    spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115
        max_size=SPOOL_BYTES, dir=None if where is None else str(where)
    )

    async def write(chunk: bytes, size: int) -> None:
        if size > SPOOL_BYTES:  # this write moves the file to the disk, or it is there
            await asyncio.to_thread(spool.write, chunk)
        else:
            spool.write(chunk)

    try:
        await _receive(request, user, limit, too_large, write)
        spool.seek(0)
    except BaseException as error:
        spool.close()
        if is_disk_full(error):
            raise StorageFull from error
        raise
    return spool


async def _receive(
    request: Request,
    user: int,
    limit: int,
    too_large: Callable[[int], DreamserveError],
    sink: Callable[[bytes, int], Awaitable[None]],
) -> None:
    """Hand each chunk of the body to `sink` with the size so far, refusing as soon as it
    passes `limit` bytes (before reading any of it when Content-Length says so)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    with body_reads(request).reading(user):
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            await sink(chunk, size)


async def _form_fields(request: Request, body: bytes) -> dict[str, Any]:
    replay = Request(request.scope, _replay(body))
    async with replay.form() as form:
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):
                raise BadRequest(f"Parameter {key} must be a text field, not a file")
            fields[key] = value
    return fields


def _json(body: bytes) -> Any:
    """The body parsed as the standard library parses it (UTF-16 and -32 too), without NaN,
    Infinity or numbers out of a float's range. orjson parses the common case several times
    faster to the same values. The standard library decides the rest: what orjson refuses
    (those, a BOM, lone surrogates), integers of 19 digits or more (orjson makes floats of
    those outside 64 bits, as -9223372036854775809), and bodies with many brackets (orjson
    takes nesting 1024 deep, the standard library stops short of its recursion limit)."""
    if _LONG_INTEGER.search(body) is None and body.count(b"[") + body.count(b"{") < _FEW_BRACKETS:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        raise BadRequest("Request body is not valid JSON") from None


_LONG_INTEGER = re.compile(rb"\d{19}")
_FEW_BRACKETS = 256  # nested no deeper than this, which both parsers read alike
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# What a JSON body holds when its text may have such characters: an escape (\u0000, \ud800),
# a surrogate's UTF-8 lead byte (the parser decodes them: U+D000-U+D7FF share it), or NUL bytes
# (raw NULs are refused in strings; UTF-16 and UTF-32 bodies are full of NUL bytes). Most bodies
# have none, and skip the walk of every string.
_MAY_BE_UNSTORABLE = re.compile(rb"\\u|[\x00\xed]")


def _storable(value: Any) -> bool:
    """Whether every string in `value` can be stored and sent back as UTF-8 text: JSON escapes
    can spell a NUL (which PostgreSQL text refuses) or half a surrogate pair (which no UTF-8
    encoder takes). Iterative: JSON nests deeper than Python recurses."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item) is not None:
                return False
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's json takes them


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400
        raise ValueError(f"{text} is out of range")
    return number


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body too large (limit {limit} bytes)")
