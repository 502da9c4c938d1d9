"""What each API call sends, and when a call is sent again: shared by `Client` and
`AsyncClient`, which differ only in how they wait for the network.

Every body field keeps its contract name (`queueSeconds`, `imageRef_1`...); the methods take them
as Python keywords (`queue_seconds`, `refs=[...]`) and leave out what the caller left None, so the
server applies its own defaults.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, cast
from urllib.parse import quote, urlsplit

import httpx

from dreamserve import __version__
from dreamserve.client.errors import ClientError, retry_after
from dreamserve.replies import ImageOut, JobRecord

API_PREFIX = "/v1/dreamina"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 30.0
# `GET /images/<jobid>?wait=N` holds a request at most this long (the server's bound).
LONGEST_WAIT = 60
# A wait that came back sooner than this with the job unfinished was not held by the server (a
# server without `?wait=`, the hosted API): the next poll waits POLL_SECONDS first.
POLL_SECONDS = 2.0
USER_AGENT = f"dreamserve-client/{__version__}"

# A file to upload: its path, its bytes, or an open binary file.
Upload = str | os.PathLike[str] | bytes | IO[bytes]


@dataclass(frozen=True)
class Call:
    """One request: `path` is under /v1/dreamina (or an absolute URL). `retryable` calls may
    be sent again after a dropped connection or a 429/502/503/504 (GET, DELETE, upserts, and
    POSTs that carry an Idempotency-Key); `read_timeout` overrides the client's for calls the
    server holds."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    retryable: bool = False
    read_timeout: float | None = None
    anonymous: bool = False  # sent without the token (signed file links)


def settings(base_url: str | None, token: str | None) -> tuple[str, str | None]:
    """The server root and token: as given, else `DREAMSERVE_URL` / `DREAMSERVE_TOKEN`, else
    the local default server and no token. A URL given with the API's path
    (`https://api.useapi.net/v1/dreamina`, as the hosted API's documents write it) is taken
    for its root. A URL that is not http(s) raises ClientError (not httpx's own error)."""
    url = (base_url or os.environ.get("DREAMSERVE_URL") or DEFAULT_URL).rstrip("/")
    url = url.removesuffix(API_PREFIX)
    try:
        scheme = httpx.URL(url).scheme
    except httpx.InvalidURL as error:
        raise ClientError(f"Invalid server URL {url!r}: {error}") from error
    if scheme not in ("http", "https"):
        raise ClientError(f"Invalid server URL {url!r}: it must start with http:// or https://")
    return url, token or os.environ.get("DREAMSERVE_TOKEN") or None


def headers(token: str | None) -> dict[str, str]:
    found = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if token:
        found["Authorization"] = f"Bearer {token}"
    return found


def segment(value: str) -> str:
    """A job or account id as one path segment (ids hold `:`, `@`, maybe `/`)."""
    return quote(value, safe="")


def fields(**given: Any) -> dict[str, Any]:
    """The fields given a value; None means "the server's default"."""
    return {name: value for name, value in given.items() if value is not None}


def idempotent(key: str | None) -> dict[str, str]:
    """The Idempotency-Key of a job-creating POST: the caller's, else a new one, the same on
    every try of the call."""
    return {"Idempotency-Key": key or str(uuid.uuid4())}


# The calls


def models() -> Call:
    return Call("GET", "/models", retryable=True)


def submit(
    prompt: str | None,
    *,
    model: str | None,
    ratio: str | None,
    resolution: str | None,
    refs: Sequence[str],
    image_strength: float | None,
    account: str | None,
    count: int | None,
    seed: int | None,
    queue_seconds: int | None,
    reply_url: str | None,
    reply_ref: str | None,
    max_jobs: int | None,
    idempotency_key: str | None,
    extra: Mapping[str, Any],
) -> Call:
    body = fields(
        prompt=prompt,
        model=model,
        ratio=ratio,
        resolution=resolution,
        imageStrength=image_strength,
        account=account,
        count=count,
        seed=seed,
        queueSeconds=queue_seconds,
        replyUrl=reply_url,
        replyRef=reply_ref,
        maxJobs=max_jobs,
    )
    body |= {f"imageRef_{n}": ref for n, ref in enumerate(refs, start=1)}
    body |= extra
    return Call("POST", "/images", json=body, headers=idempotent(idempotency_key), retryable=True)


def upscale(
    jobid: str,
    *,
    index: int | None,
    resolution: str | None,
    original_strength: float | None,
    detail_strength: float | None,
    reply_url: str | None,
    reply_ref: str | None,
    max_jobs: int | None,
    idempotency_key: str | None,
    extra: Mapping[str, Any],
) -> Call:
    body = fields(
        jobid=jobid,
        imageIndex=index,
        upscaleResolution=resolution,
        originalImageStrength=original_strength,
        detailStrength=detail_strength,
        replyUrl=reply_url,
        replyRef=reply_ref,
        maxJobs=max_jobs,
    )
    body |= extra
    return Call(
        "POST", "/images/upscale", json=body, headers=idempotent(idempotency_key), retryable=True
    )


def get(jobid: str, wait: int | None = None) -> Call:
    if wait is None:
        return Call("GET", f"/images/{segment(jobid)}", retryable=True)
    return Call(
        "GET",
        f"/images/{segment(jobid)}",
        params={"wait": str(wait)},
        retryable=True,
        read_timeout=wait + DEFAULT_TIMEOUT,
    )


def events(jobid: str) -> Call:
    # The server sends a comment every 15 s of quiet: a minute without a byte is a dead stream.
    return Call(
        "GET",
        f"/images/{segment(jobid)}/events",
        headers={"Accept": "text/event-stream", "Cache-Control": "no-store"},
        retryable=True,
        read_timeout=60.0,
    )


def jobs(
    status: str | None,
    model: str | None,
    account: str | None,
    since: str | datetime | None,
    limit: int | None,
    cursor: str | None,
) -> Call:
    if isinstance(since, datetime):
        # A naive time is this machine's local time, as Python reads it (the server wants a
        # time zone: `2026-12-01T10:00:00` alone is a 400).
        since = since.astimezone().isoformat()
    params = fields(status=status, model=model, account=account, since=since, cursor=cursor)
    if limit is not None:
        params["limit"] = str(limit)
    return Call("GET", "/images", params=params, retryable=True)


def upload(account: str, file: Upload, content_type: str | None) -> Call:
    data = _read(file)
    media = content_type or _sniff(data) or "application/octet-stream"
    # Not retried: each upload is a new asset.
    return Call(
        "POST", f"/assets/{segment(account)}", content=data, headers={"Content-Type": media}
    )


def assets(account: str, count: int | None, offset: int | None) -> Call:
    params = {name: str(value) for name, value in fields(count=count, offset=offset).items()}
    return Call("GET", f"/assets/{segment(account)}", params=params, retryable=True)


def delete_asset(asset_id: str) -> Call:
    return Call("DELETE", f"/assets/{segment(asset_id)}", retryable=True)


def accounts() -> Call:
    return Call("GET", "/accounts", retryable=True)


def account(account_id: str) -> Call:
    return Call("GET", f"/accounts/{segment(account_id)}", retryable=True)


def put_account(
    account: str | None,
    *,
    engine: str | None,
    email: str | None,
    region: str | None,
    max_jobs: int | None,
    priority: int | None,
    models: Sequence[str] | None,
    settings: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
) -> Call:
    body = fields(
        account=account,
        engine=engine,
        email=email,
        region=region,
        maxJobs=max_jobs,
        priority=priority,
        models=list(models) if models is not None else None,
        settings=dict(settings) if settings is not None else None,
    )
    # An upsert: sending it twice leaves what sending it once does.
    return Call("POST", "/accounts", json=body | dict(extra), retryable=True)


def delete_account(account_id: str) -> Call:
    return Call("DELETE", f"/accounts/{segment(account_id)}", retryable=True)


def scheduler() -> Call:
    return Call("GET", "/scheduler", retryable=True)


def cancel(jobid: str) -> Call:
    return Call("DELETE", f"/scheduler/{segment(jobid)}", retryable=True)


def webhook_secret() -> Call:
    return Call("GET", "/webhooks/secret", retryable=True)


def rotate_webhook_secret() -> Call:
    return Call("POST", "/webhooks/secret")  # each call rotates: never sent twice


def deliveries(jobid: str) -> Call:
    return Call("GET", f"/images/{segment(jobid)}/webhooks", retryable=True)


def redeliver(jobid: str) -> Call:
    return Call("POST", f"/images/{segment(jobid)}/webhooks")


def parsed(response: httpx.Response) -> Any:
    """A successful reply's JSON body; a body that is not JSON (a proxy's or a portal's page)
    raises ClientError, as every other failure of the client does."""
    try:
        return response.json()
    except ValueError as error:
        kind = response.headers.get("content-type", "no Content-Type")
        raise ClientError(
            f"{response.request.method} {response.request.url.copy_with(query=None)} answered "
            f"{response.status_code} with a body that is not JSON ({kind})"
        ) from error


# Retries


@dataclass(frozen=True)
class Retries:
    """How often and after how long a call is sent again: at most `attempts` more times, after
    `backoff` seconds doubled at each try (with jitter, at most `max_wait`), or after the
    reply's Retry-After when it has one, unless that is over `max_wait` (then the error is
    raised at once: a server that asks for a minute is better answered by the caller).

    A connection that could not be opened is retried for every call (nothing was sent); a
    connection lost after sending, and 429, 502, 503 and 504 replies, only for retryable calls."""

    attempts: int = 3
    backoff: float = 0.5
    max_wait: float = 10.0

    def delay(
        self,
        call: Call,
        attempt: int,
        response: httpx.Response | None = None,
        error: httpx.TransportError | None = None,
    ) -> float | None:
        """Seconds to wait before try `attempt + 1` (0 is the first try), or None to stop."""
        if attempt >= self.attempts:
            return None
        if error is not None:
            unsent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
            return self._backoff(attempt) if unsent or call.retryable else None
        assert response is not None
        if not call.retryable or response.status_code not in (429, 502, 503, 504):
            return None
        after = retry_after(response.headers)
        if after is None:
            return self._backoff(attempt)
        return after if after <= self.max_wait else None

    def _backoff(self, attempt: int) -> float:
        return min(self.max_wait, self.backoff * 2.0**attempt * random.uniform(0.5, 1.0))


# Uploads and downloads


def _read(file: Upload) -> bytes:
    if isinstance(file, bytes):
        return file
    if isinstance(file, str | os.PathLike):
        return Path(file).read_bytes()
    return file.read()


def _sniff(data: bytes) -> str | None:
    """The Content-Type of an image from its first bytes (the three the API takes)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def download(url: str) -> Call:
    # Signed links need no token, and a bucket's presigned link refuses one.
    return Call(
        "GET", url, headers={"Accept": "*/*"}, retryable=True, anonymous=True, read_timeout=120.0
    )


def download_url(base_url: str, image: str | ImageOut) -> str:
    """The absolute URL of an image: its `imageUrl`, or a link as given; a link relative to
    the server (`/v1/dreamina/files/...`) is taken from its root."""
    url = image if isinstance(image, str) else image["imageUrl"]
    if urlsplit(url).scheme:
        return url
    return base_url + ("" if url.startswith("/") else "/") + url


def event_record(data: str) -> JobRecord:
    """The job record of a `progress` or `done` event; ClientError for anything else (a
    proxy's page, a stream that is not dreamserve's)."""
    try:
        return cast(JobRecord, json.loads(data))
    except ValueError as error:
        raise ClientError(f"Not a job record in the event stream: {error}") from None


def download_path(target: str | os.PathLike[str], url: str, image: str | ImageOut) -> Path:
    """Where a download goes: `target` itself, or inside it when it is a directory (named by
    the image's itemId and format, else by the link's last segment). A target that ends with
    a separator (`out/`) is a directory, made when missing: Path drops the slash, and each
    image would have been written over the last, as a file named `out`."""
    path = Path(target)
    if os.fspath(target).endswith(("/", os.sep)):
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        return path
    if not isinstance(image, str):
        name = f"{image['itemId']}.{_SUFFIXES.get(image['format'], image['format'])}"
    else:
        name = urlsplit(url).path
    # The last segment only: a name from a server never leads out of the directory.
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return path / (name if name not in ("", ".", "..") else "image")


_SUFFIXES = {"jpeg": "jpg", "png": "png", "webp": "webp"}
