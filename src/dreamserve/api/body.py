"""Request bodies of JSON or form posts, read with a size limit, as one dict of fields."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.types import Message, Receive

from dreamserve.errors import BadRequest, DreamserveError, PayloadTooLarge

JSON_TYPES = ("", "application/json")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def read_fields(request: Request, limit: int) -> dict[str, Any]:
    """The posted fields: a JSON object as it is, form fields as strings (files refused)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media not in JSON_TYPES and media not in FORM_TYPES and not media.endswith("+json"):
        raise BadRequest(
            f"Content-Type ({media}) not supported. Valid values: application/json, "
            "multipart/form-data, application/x-www-form-urlencoded"
        )
    body = await read_body(request, limit)
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
    if not _storable(fields):
        raise BadRequest("Request body has text with NUL or unpaired surrogate characters")
    return fields


async def read_body(
    request: Request, limit: int, too_large: Callable[[int], DreamserveError] | None = None
) -> bytes:
    """The whole body, refusing as soon as it passes `limit` bytes (before reading any of it
    when Content-Length says so): 413, or the error `too_large` makes."""
    refuse = too_large or _too_large
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise refuse(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise refuse(limit)
        chunks.append(chunk)
    return b"".join(chunks)


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
