"""The client's exceptions: an error reply of the API as it came (status, message, body), a job
that ended `failed`, a server that could not be reached, and a wait that ran out."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from dreamserve.replies import JobRecord


class ClientError(Exception):
    """Every exception the client raises (httpx's own errors never leave it unwrapped)."""


class ApiError(ClientError):
    """The API answered with an error: `status` and `message` exactly as the server sent them
    (`message` is the body's `error`), `body` the whole parsed body (or its text when it is not
    JSON), `headers` the reply's headers."""

    def __init__(
        self, status: int, message: str, body: Any = None, headers: httpx.Headers | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body
        self.headers = headers if headers is not None else httpx.Headers()

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r})"


class BadRequest(ApiError):
    """400: a parameter the server refused; the message names it and what is valid."""


class Unauthorized(ApiError):
    """401: no token, or a wrong one."""


class Forbidden(ApiError):
    """403: e.g. changing a shared account, or an altered or expired file link."""


class NotFound(ApiError):
    """404: unknown, or another user's (a job, an account, an asset)."""


class IdempotencyConflict(ApiError):
    """422: the Idempotency-Key was already used with another request."""


class RateLimited(ApiError):
    """429: no free slot (`All accounts at capacity`), or a user limit. `retry_after` is the
    reply's Retry-After in seconds (None when it had none)."""

    @property
    def retry_after(self) -> float | None:
        return retry_after(self.headers)


class ServerError(ApiError):
    """5xx: e.g. 503 `Server is stopping` or `Database busy, retry later` (see
    `retry_after`), 507 `Storage full`."""

    @property
    def retry_after(self) -> float | None:
        return retry_after(self.headers)


class ConnectionFailed(ClientError):
    """The server could not be reached or dropped the connection (after the retries the call
    allows); the httpx error is the `__cause__`."""


class JobFailed(ClientError):
    """`wait` saw the job end `failed`: `record` is its final record, `error` and `details` its
    `error` and `errorDetails` (a cancelled job's error is `Cancelled by user`)."""

    def __init__(self, record: JobRecord) -> None:
        self.record = record
        self.error = record.get("error", "failed")
        self.details = record.get("errorDetails")
        super().__init__(self.error)

    @property
    def jobid(self) -> str:
        return self.record["jobid"]


class WaitTimedOut(ClientError, TimeoutError):
    """`wait` gave up before the job ended; `record` is the last record seen."""

    def __init__(self, record: JobRecord, seconds: float) -> None:
        super().__init__(f"Job {record['jobid']} still {record['status']} after {seconds:g} s")
        self.record = record


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    422: IdempotencyConflict,
    429: RateLimited,
}


def error_from(response: httpx.Response) -> ApiError:
    """The exception for an error reply: its class by status, its message the body's `error`
    (else the body's text, else the reason phrase)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message = body["error"]
    elif isinstance(body, str) and body.strip():
        message = body.strip()[:1000]
    else:
        message = f"{response.status_code} {response.reason_phrase}"
    status = response.status_code
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return kind(status, message, body, response.headers)


def retry_after(headers: httpx.Headers) -> float | None:
    """A Retry-After in seconds (its delay-seconds form; an HTTP date counts from now)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
