"""What the engines that call an official model API share (`ark`, `gemini`, `openai`).

An `Upstream` is one account's httpx client with the error mapping of shared/upstreams.md:
401/403 put the account in error, 429 and 5xx are retried (honouring `Retry-After`) within the
job's time budget, other 4xx fail the job with the upstream's own message. Every image an
upstream hands back, as a link or inline, is downloaded and decoded here: a job never hands out
an upstream link, and those links expire.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import io
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, TypeVar

import httpx
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from dreamserve import __version__
from dreamserve.engines.base import (
    CancelSignal,
    EngineContext,
    EngineSettings,
    to_size,
    until_cancelled,
)
from dreamserve.errors import AccountError, AccountTrouble, BadRequest, JobFailed
from dreamserve.netguard import HostRefused, Resolver, addresses_refusal, resolve
from dreamserve.outbound import guarded_client

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BACKOFF_SECONDS = 30.0
MAX_MESSAGE_CHARS = 500
MAX_REDIRECTS = 5  # of an output link (to its storage)
ANSWER_IMAGES = 4  # inline images one answer may carry: its size is bounded by that many
ERROR_BODY_BYTES = 64 << 10  # of an error answer, enough for its message
REFERENCE_QUALITIES = (95, 85, 75, 60)  # JPEG qualities tried to fit a reference in its bound
# What an upstream engine holds of each image at its peak (its `image_copies`, counted by the
# render-memory budget): the file downloaded or decoded from base64, the image at the size the
# API made, and the image brought to the job's size.
UPSTREAM_IMAGE_COPIES = 3
# How long saving an account waits for its API host to resolve before letting it through.
SAVE_RESOLVE_SECONDS = 5.0


class UpstreamSettings(EngineSettings):
    """Settings every upstream engine takes; each engine adds its own and the default
    `baseUrl` (the vendor's)."""

    apiKey: SecretStr
    baseUrl: str
    timeoutSeconds: float = Field(300, gt=0, le=3600)  # one call: these APIs answer slowly
    retries: int = Field(3, ge=0, le=10)  # after a 429, a 5xx or a network error
    budgetSeconds: float = Field(900, gt=0, le=86400)  # the whole job, retries included
    maxImageBytes: int = Field(32 << 20, ge=1024)  # one downloaded or inline image

    @field_validator("baseUrl")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as error:
            raise ValueError(f"not a URL ({error})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http or https URL with a host")
        if url.query or url.fragment:
            raise ValueError("must not have a query or a fragment")
        if url.userinfo:
            raise ValueError("must not carry credentials (the key goes in apiKey)")
        return value.rstrip("/")


class SizeLimit(BaseModel):
    """The sizes one upstream model takes (docs/engines.md cites each vendor's). A catalogue
    size outside them is asked for at the same aspect within them (`fit`), and the image the
    upstream makes is brought to the catalogue's size (`decode_image`); an aspect no scaling
    can bring within them fails the job before any call (`fitted_size`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    minSide: int | None = Field(None, ge=1)
    maxSide: int | None = Field(None, ge=1)
    minPixels: int | None = Field(None, ge=1)
    maxPixels: int | None = Field(None, ge=1)
    multipleOf: int | None = Field(None, ge=1, le=1024)  # both sides
    maxRatio: float | None = Field(None, ge=1)  # long side : short side

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """`width` x `height`, scaled at the same aspect into these limits (as near as whole
        pixels and `multipleOf` allow). ValueError names the limits no scaling can meet."""
        if self.maxRatio and max(width, height) > self.maxRatio * min(width, height):
            raise ValueError(f"{width}x{height}: long:short is over {self.maxRatio:g}:1 (maxRatio)")
        scale = 1.0
        if self.maxPixels and width * height > self.maxPixels:
            scale = math.sqrt(self.maxPixels / (width * height))
        if self.minPixels and width * height < self.minPixels:
            scale = math.sqrt(self.minPixels / (width * height))
        if self.maxSide and max(width, height) * scale > self.maxSide:
            scale = self.maxSide / max(width, height)
        if self.minSide and min(width, height) * scale < self.minSide:
            scale = self.minSide / min(width, height)
        step = self.multipleOf or 1
        # The nearest multiples first; then rounded inwards (shrinking) or outwards (growing),
        # so that the limits hold.
        tries: list[Callable[[float], int]] = [round] if scale == 1.0 else []
        tries += [math.floor, math.ceil] if scale <= 1 else [math.ceil, math.floor]
        for rounding in tries:
            size = (
                max(step, step * rounding(width * scale / step)),
                max(step, step * rounding(height * scale / step)),
            )
            if not self.broken(*size):
                return size
        raise ValueError(f"{width}x{height}: no size at its aspect within {self.describe()}")

    def describe(self) -> str:
        """The limits set, as settings name them."""
        return ", ".join(f"{name} {value:g}" for name, value in self if value is not None)

    def broken(self, width: int, height: int) -> list[str]:
        """The limits `width` x `height` is outside of, as settings name them."""
        step = self.multipleOf or 1
        checks = [
            (self.minSide, min(width, height) >= (self.minSide or 0), "minSide"),
            (self.maxSide, max(width, height) <= (self.maxSide or 0), "maxSide"),
            (self.minPixels, width * height >= (self.minPixels or 0), "minPixels"),
            (self.maxPixels, width * height <= (self.maxPixels or 0), "maxPixels"),
            (self.multipleOf, width % step == 0 and height % step == 0, "multipleOf"),
        ]
        return [f"{name} {limit}" for limit, holds, name in checks if limit and not holds]


def fitted_size(
    vendor: str, model: str, limits: Mapping[str, SizeLimit], width: int, height: int
) -> tuple[int, int]:
    """The size to ask upstream `model` for, for a catalogue size of `width` x `height`; a
    JobFailed naming the limit when there is none (raised before any call)."""
    limit = limits.get(model)
    if limit is None:
        return width, height
    try:
        return limit.fit(width, height)
    except ValueError as error:
        raise JobFailed(f"Size not possible on {vendor} model {model}", str(error)) from None


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: httpx.Headers
    content: bytes  # the body, or its first ERROR_BODY_BYTES for an error

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300


class Upstream:
    """One account's connection to a model API."""

    def __init__(
        self,
        vendor: str,
        settings: UpstreamSettings,
        context: EngineContext,
        credentials: Mapping[str, str],
    ) -> None:
        self.vendor = vendor
        self.settings = settings
        self.context = context
        self._credentials = dict(credentials)  # headers sent to the API, never to downloads
        self._secrets = [settings.apiKey.get_secret_value()]  # never shown in a message
        self._client: httpx.AsyncClient | None = None
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.resolver: Resolver = resolve  # the API's and its links' hosts; tests put a fake one

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # Every connection to an address checked first (a private one only when the account
            # may), redirects never followed: one would carry the API key elsewhere.
            self._client = guarded_client(
                lambda host, port: self.resolver(host, port),  # at each connection, as it is then
                allow_private=self.context.allow_private,
                timeout=self.settings.timeoutSeconds,
                headers={"user-agent": f"dreamserve/{__version__}"},
            )
        return self._client

    def url(self, path: str) -> str:
        return f"{self.settings.baseUrl}{path}"

    async def check_address(self) -> None:
        """Refuse (BadRequest naming settings.baseUrl) an API address that every call would be
        refused, when the account may not reach private addresses: asked when a user saves the
        account, so that it fails there rather than in each job. A host that does not resolve
        now is let through (DNS may be down, or the name not published yet); every connection
        is checked again anyway (`client`)."""
        if self.context.allow_private:
            return
        url = httpx.URL(self.settings.baseUrl)
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            async with asyncio.timeout(SAVE_RESOLVE_SECONDS):
                addresses = await self.resolver(url.host, port)
        except (OSError, UnicodeError, ValueError, TimeoutError):
            return
        reason = addresses_refusal(url.host, addresses)
        if reason is not None:
            raise BadRequest(f"Parameter settings.baseUrl is invalid: {reason}")

    def deadline(self) -> float:
        return time.monotonic() + self.settings.budgetSeconds

    async def call(
        self, method: str, path: str, cancel: CancelSignal, deadline: float, **kwargs: Any
    ) -> Any:
        """The parsed JSON answer of the API, after retries; raises what the job ends with."""
        url = self.url(path)
        limit = self.settings.maxImageBytes * 4 // 3 * ANSWER_IMAGES + (1 << 20)

        async def send() -> _Answer:
            return await self._fetch(method, url, limit, headers=self._credentials, **kwargs)

        answer = await self._send(send, cancel, deadline, download=False)
        body = _json(answer.content)
        if body is _NOT_JSON:
            raise JobFailed(
                "Upstream answered with something that is not JSON",
                f"{self.vendor} answered {answer.status} with "
                f"{answer.headers.get('content-type', 'no content type')}",
            )
        return body

    async def download(self, url: str, cancel: CancelSignal, deadline: float) -> bytes:
        """The bytes behind an output link, following its redirects (to storage), each hop
        checked, and without the API's credentials: links are signed, and lead elsewhere."""

        async def get() -> _Answer:
            location = url
            for _ in range(MAX_REDIRECTS + 1):
                answer = await self._fetch("GET", location, self.settings.maxImageBytes)
                if answer.status not in (301, 302, 303, 307, 308):
                    return answer
                target = answer.headers.get("location")
                if not target:
                    return answer
                location = str(httpx.URL(location).join(target))
            raise JobFailed("Upstream image could not be downloaded", "too many redirects")

        answer = await self._send(get, cancel, deadline, download=True)
        return answer.content

    async def image(
        self, item: Any, width: int, height: int, cancel: CancelSignal, deadline: float
    ) -> Image.Image:
        """The image a `data` item of an answer stands for (`b64_json` or `url`: the shape Ark
        and OpenAI share), decoded at the job's size."""
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            data = self.decode_inline(item["b64_json"])
        elif isinstance(item, dict) and isinstance(item.get("url"), str):
            data = await self.download(item["url"], cancel, deadline)
        else:
            raise JobFailed(
                "Upstream answered in an unknown shape", f"{self.vendor}: no url nor b64_json"
            )
        return await self.decode(data, width, height)

    async def top_up(
        self,
        images: list[Image.Image],
        count: int,
        call: Callable[[int], Awaitable[list[Image.Image]]],
    ) -> list[Image.Image]:
        """`images` made up to `count` (a batch may bring fewer than asked): one call of one
        image for each missing one, side by side."""
        missing = count - len(images)
        for batch in await first_failure_cancels([call(1) for _ in range(missing)]):
            if not batch:
                raise JobFailed(
                    "Upstream returned no image", f"{self.vendor} answered without an image"
                )
            images.append(batch[0])
        return images[:count]

    async def decode(self, data: bytes, width: int, height: int) -> Image.Image:
        """`decode_image` in the executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.context.executor, decode_image, data, width, height)

    def decode_inline(self, data: str) -> bytes:
        """The bytes of a base64 image in an answer."""
        if len(data) > self.settings.maxImageBytes * 4 // 3 + 4:
            raise JobFailed(
                "Upstream image is too large", f"more than {self.settings.maxImageBytes} bytes"
            )
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise JobFailed("Upstream returned an image that is not valid base64") from None

    async def _fetch(self, method: str, url: str, limit: int, **kwargs: Any) -> _Answer:
        """One request, its body read up to `limit` bytes (decompressed: what is counted is
        what is kept), an error's to ERROR_BODY_BYTES. A refused address (the client refuses it
        before connecting) fails the job with one message whatever the reason, so that a
        refusal says nothing of what listens there."""
        try:
            async with self.client.stream(method, url, **kwargs) as response:
                data = bytearray()
                keep = limit if response.is_success else ERROR_BODY_BYTES
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > keep:
                        if response.is_success:
                            raise JobFailed(
                                "Upstream answer is too large", f"more than {limit} bytes"
                            )
                        break  # enough of an error to read its message
                return _Answer(response.status_code, response.headers, bytes(data[:keep]))
        except HostRefused:
            host = httpx.URL(url).host
            raise JobFailed(
                "Upstream address refused", f"{host} does not resolve to a public address"
            ) from None

    async def _send(
        self,
        request: Callable[[], Awaitable[_Answer]],
        cancel: CancelSignal,
        deadline: float,
        *,
        download: bool,
    ) -> _Answer:
        # Timeouts, network errors, 5xx and 429 that outlast the retries are the account's
        # trouble (AccountTrouble: a few in a row cool it down); a 429's Retry-After cools it
        # for as long as the upstream asked.
        tries = self.settings.retries + 1
        cool_for = None
        for attempt in range(tries):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AccountTrouble("Upstream did not answer in time", self._budget_spent())
            try:
                async with asyncio.timeout(left):
                    answer = await until_cancelled(request(), cancel)
            except TimeoutError:
                raise AccountTrouble(
                    "Upstream did not answer in time", self._budget_spent()
                ) from None
            except (httpx.InvalidURL, httpx.UnsupportedProtocol):
                raise JobFailed(
                    "Upstream returned a link that cannot be fetched", self.vendor
                ) from None
            except httpx.HTTPError as error:
                failure = f"{type(error).__name__} from {self.vendor}"
                delay = _backoff(attempt)
                cool_for = None
            else:
                if answer.is_success:
                    return answer
                failure, refused = self._failure(answer, download)
                if refused is not None:
                    raise refused
                asked = _retry_after(answer.headers)
                delay = _backoff(attempt) if asked is None else asked
                cool_for = asked if answer.status == 429 else None
            if attempt + 1 == tries:
                break
            if time.monotonic() + delay >= deadline:
                raise AccountTrouble(
                    "Upstream unavailable", f"{failure}; the job's time ran out", cool_for=cool_for
                )
            log.info("%s: %s, retry %d in %.1f s", self.vendor, failure, attempt + 1, delay)
            await until_cancelled(self.sleep(delay), cancel)
        raise AccountTrouble(
            "Upstream unavailable", f"{failure} after {tries} tries", cool_for=cool_for
        )

    def _failure(self, answer: _Answer, download: bool) -> tuple[str, JobFailed | None]:
        """What went wrong, as errorDetails say it, and the failure to end the job with now
        (None: 429 and 5xx, worth another try)."""
        status = answer.status
        body = None if download else _json(answer.content)
        message = error_message(body)
        where = "the image link" if download else self.vendor
        failure = f"{where} answered {status}"
        if message:
            failure = f"{failure}: {self._short(message)}"
        if status == 429 or status >= 500:
            return failure, None
        if download:
            return failure, JobFailed(
                "Upstream image could not be downloaded (link expired?)", failure
            )
        if status in (401, 403) or _credentials_refused(body):
            return failure, AccountError("Upstream refused the account's credentials", failure)
        return failure, JobFailed("Upstream refused the request", failure)

    def _short(self, message: str) -> str:
        """An upstream's message made fit for errorDetails: printable, bounded, and without
        the account's key (a proxy may echo it; a shared account's users must not see it)."""
        for secret in self._secrets:
            if secret:
                message = message.replace(secret, "***")
        cleaned = "".join(ch if ch.isprintable() else " " for ch in message).strip()
        if len(cleaned) <= MAX_MESSAGE_CHARS:
            return cleaned
        return cleaned[: MAX_MESSAGE_CHARS - 1] + "…"

    def _budget_spent(self) -> str:
        return f"{self.vendor}: no answer within the job's {self.settings.budgetSeconds:g} s"

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def decode_image(data: bytes, width: int, height: int) -> Image.Image:
    """An upstream's image file, decoded and brought to the job's size (blocking: call it in
    the executor). An image of far more pixels than the job's is refused before it is
    decoded: a small file can hold a huge picture."""
    limit = max(4 * width * height, 4096 * 4096)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limit:
                raise JobFailed(
                    "Upstream image is too large", f"{image.width}x{image.height} pixels"
                )
            image.load()
            decoded = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise JobFailed("Upstream returned an image that cannot be decoded") from None
    return to_size(decoded, width, height)


def encode_reference(image: Image.Image, max_bytes: int = 10 << 20) -> bytes:
    """A reference as the JPEG sent upstream, within `max_bytes` (Ark takes 10 MB a
    reference): lower qualities first, then half the size, until it fits."""
    picture = image.convert("RGB")
    while True:
        for quality in REFERENCE_QUALITIES:
            buffer = io.BytesIO()
            picture.save(buffer, "JPEG", quality=quality)
            if buffer.tell() <= max_bytes:
                return buffer.getvalue()
        picture = picture.resize((max(1, picture.width // 2), max(1, picture.height // 2)))


def data_url(image: Image.Image, max_bytes: int = 10 << 20) -> str:
    """A reference as the `data:` URL the APIs take."""
    return "data:image/jpeg;base64," + base64.b64encode(encode_reference(image, max_bytes)).decode()


def error_message(body: Any) -> str | None:
    """`error.message` of the error bodies all three vendors use."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return None


def _backoff(attempt: int) -> float:
    return float(min(MAX_BACKOFF_SECONDS, 2**attempt))


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from a `Retry-After` header (seconds or an HTTP date), bounded."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, as HTTP dates are
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return max(0.0, min(seconds, 3600.0))


_NOT_JSON = object()


def _json(content: bytes) -> Any:
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # not JSON, or nested past what Python parses
        return _NOT_JSON


def _credentials_refused(body: Any) -> bool:
    """An error body that says the key itself is bad, whatever its status: Gemini answers an
    invalid key with 400 INVALID_ARGUMENT and the reason API_KEY_INVALID."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    if error.get("status") in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return True
    details = error.get("details")
    return isinstance(details, list) and any(
        isinstance(detail, dict) and detail.get("reason") == "API_KEY_INVALID" for detail in details
    )


async def first_failure_cancels(works: list[Awaitable[T]]) -> list[T]:
    """All results in order; the first failure cancels the rest and is raised as itself."""
    if not works:
        return []
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
