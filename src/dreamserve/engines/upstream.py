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
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import IPv4Address, IPv6Address
from typing import Any, TypeVar

import httpx
from httpx_secure import SSRFProtectionError, httpx_ssrf_protection
from PIL import Image, UnidentifiedImageError
from pydantic import Field, SecretStr, field_validator

from dreamserve import __version__
from dreamserve.engines.base import (
    CancelSignal,
    EngineContext,
    EngineSettings,
    to_size,
    until_cancelled,
)
from dreamserve.errors import AccountError, JobFailed
from dreamserve.webhooks import refusal

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BACKOFF_SECONDS = 30.0
MAX_MESSAGE_CHARS = 500
REFERENCE_QUALITY = 95  # references are sent as JPEG: a tenth of the PNG, well under 10 MB


class UpstreamSettings(EngineSettings):
    """Settings every upstream engine takes; each engine adds its own and the default
    `baseUrl` (the vendor's)."""

    apiKey: SecretStr
    baseUrl: str
    timeoutSeconds: float = Field(300, gt=0, le=3600)  # one call: these APIs answer slowly
    retries: int = Field(3, ge=0, le=10)  # after a 429, a 5xx or a network error
    budgetSeconds: float = Field(900, gt=0, le=86400)  # the whole job, retries included
    maxImageBytes: int = Field(64 << 20, ge=1024)  # one downloaded or inline image

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
        return value.rstrip("/")


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
        self._client: httpx.AsyncClient | None = None
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            client = httpx.AsyncClient(
                timeout=self.settings.timeoutSeconds,
                follow_redirects=True,  # download links redirect to storage
                trust_env=False,
                headers={"user-agent": f"dreamserve/{__version__}"},
            )
            if not self.context.allow_private:
                httpx_ssrf_protection(client, custom_validator=_public, dns_cache_ttl=60)
            self._client = client
        return self._client

    def url(self, path: str) -> str:
        return f"{self.settings.baseUrl}{path}"

    async def call(
        self, method: str, path: str, cancel: CancelSignal, deadline: float, **kwargs: Any
    ) -> Any:
        """The parsed JSON answer of the API, after retries; raises what the job ends with."""
        response = await self._send(
            lambda: self.client.request(
                method, self.url(path), headers=self._credentials, **kwargs
            ),
            cancel,
            deadline,
            download=False,
        )
        try:
            return response.json()
        except ValueError:
            raise JobFailed(
                "Upstream answered with something that is not JSON",
                f"{self.vendor} answered {response.status_code} with "
                f"{response.headers.get('content-type', 'no content type')}",
            ) from None

    async def download(self, url: str, cancel: CancelSignal, deadline: float) -> bytes:
        """The bytes behind an output link (without the API's credentials: links are
        signed, and they may lead to another host)."""
        if httpx.URL(url).scheme not in ("http", "https"):
            raise JobFailed("Upstream returned an image link that cannot be fetched", url[:100])

        async def get() -> httpx.Response:
            async with self.client.stream("GET", url) as response:
                data = bytearray()
                if response.is_success:
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > self.settings.maxImageBytes:
                            raise JobFailed(
                                "Upstream image is too large",
                                f"more than {self.settings.maxImageBytes} bytes",
                            )
                else:
                    await response.aread()
                return httpx.Response(
                    response.status_code, headers=response.headers, content=bytes(data)
                )

        response = await self._send(get, cancel, deadline, download=True)
        return response.content

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

    async def _send(
        self,
        request: Callable[[], Awaitable[httpx.Response]],
        cancel: CancelSignal,
        deadline: float,
        *,
        download: bool,
    ) -> httpx.Response:
        tries = self.settings.retries + 1
        for attempt in range(tries):
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobFailed("Upstream did not answer in time", self._budget_spent())
            try:
                async with asyncio.timeout(left):
                    response = await until_cancelled(request(), cancel)
            except TimeoutError:
                raise JobFailed("Upstream did not answer in time", self._budget_spent()) from None
            except SSRFProtectionError as denied:
                raise JobFailed(
                    "Upstream address refused", f"{denied.hostname} is not a public address"
                ) from None
            except httpx.HTTPError as error:
                failure = f"{type(error).__name__} from {self.vendor}"
                delay = _backoff(attempt)
            else:
                if response.is_success:
                    return response
                failure = self._failure(response, download)
                if response.status_code != 429 and response.status_code < 500:
                    raise self._refusal(response, failure, download)
                asked = _retry_after(response)
                delay = _backoff(attempt) if asked is None else asked
            if attempt + 1 == tries:
                break
            if time.monotonic() + delay >= deadline:
                raise JobFailed("Upstream unavailable", f"{failure}; the job's time ran out")
            log.info("%s: %s, retry %d in %.1f s", self.vendor, failure, attempt + 1, delay)
            await until_cancelled(self.sleep(delay), cancel)
        raise JobFailed("Upstream unavailable", f"{failure} after {tries} tries")

    def _failure(self, response: httpx.Response, download: bool) -> str:
        where = "the image link" if download else self.vendor
        message = None
        if not download:
            try:
                message = error_message(response.json())
            except ValueError:
                message = None
        text = f"{where} answered {response.status_code}"
        return f"{text}: {_short(message)}" if message else text

    def _refusal(self, response: httpx.Response, failure: str, download: bool) -> JobFailed:
        status = response.status_code
        if download:
            return JobFailed("Upstream image could not be downloaded (link expired?)", failure)
        if status in (401, 403):
            return AccountError("Upstream refused the account's credentials", failure)
        return JobFailed("Upstream refused the request", failure)

    def _budget_spent(self) -> str:
        return f"{self.vendor}: no answer within the job's {self.settings.budgetSeconds:g} s"

    def deadline(self) -> float:
        return time.monotonic() + self.settings.budgetSeconds

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def decode_image(data: bytes, width: int, height: int) -> Image.Image:
    """An upstream's image file, decoded and brought to the job's size (blocking: call it in
    the executor)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            decoded = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise JobFailed("Upstream returned an image that cannot be decoded") from None
    return to_size(decoded, width, height)


def encode_reference(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=REFERENCE_QUALITY)
    return buffer.getvalue()


def data_url(image: Image.Image) -> str:
    """A reference as the `data:` URL the APIs take."""
    return "data:image/jpeg;base64," + base64.b64encode(encode_reference(image)).decode()


def error_message(body: Any) -> str | None:
    """`error.message` of the error bodies all three vendors use."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return None


def _public(hostname: str, address: IPv4Address | IPv6Address, port: int) -> bool:
    return refusal(address) is None


def _backoff(attempt: int) -> float:
    return float(min(MAX_BACKOFF_SECONDS, 2**attempt))


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a `Retry-After` header (seconds or an HTTP date), bounded."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, 3600.0))


def _short(message: str) -> str:
    cleaned = "".join(ch if ch.isprintable() else " " for ch in message).strip()
    if len(cleaned) <= MAX_MESSAGE_CHARS:
        return cleaned
    return cleaned[: MAX_MESSAGE_CHARS - 1] + "…"


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
