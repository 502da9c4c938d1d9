"""The error tree: each error carries its HTTP status and builds its message in one place.

The API maps any `DreamserveError` to `{"error": message}` with its status; the CLI prints it.
"""

from __future__ import annotations

import errno


class DreamserveError(Exception):
    """Base of every error a client may see."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(DreamserveError):
    status = 400


class InvalidParameter(BadRequest):
    """A parameter whose value is not one of the valid ones: the message says which are."""

    def __init__(self, name: str, value: object, valid: str) -> None:
        super().__init__(f"Parameter {name} ({_show(value)}) valid values: {valid}")
        self.parameter = name


class InvalidRange(BadRequest):
    """A Range header of a file download that is not a valid byte range."""

    def __init__(self, value: str) -> None:
        super().__init__(
            f"Header Range ({_show(value)}) valid values: bytes=<first>-<last>, bytes=<first>- "
            "or bytes=-<length>, with first <= last"
        )


class MissingParameter(BadRequest):
    def __init__(self, name: str) -> None:
        super().__init__(f"Parameter {name} is required")
        self.parameter = name


class NoAccountForModel(BadRequest):
    def __init__(self, model: str) -> None:
        super().__init__(f"No account serves model {model}")


class EngineUnavailable(BadRequest):
    """An engine whose optional dependencies are not installed on this server."""

    def __init__(self, engine: str, missing: str, extra: str | None) -> None:
        install = f"pip install '{extra}'" if extra else f"pip install {missing}"
        super().__init__(
            f"Engine {engine} needs {missing}, which is not installed on this server: {install}"
        )


class EngineNotInstalled(EngineUnavailable):
    """An engine an account names that this server does not have (a plugin uninstalled since)."""

    def __init__(self, engine: str) -> None:
        BadRequest.__init__(self, f"Engine {engine} is not installed on this server")


class EngineBroken(EngineUnavailable):
    """An engine whose dependencies are installed but fail to import."""

    def __init__(self, engine: str, error: str) -> None:
        BadRequest.__init__(
            self, f"Engine {engine} cannot be loaded on this server ({error}: see the server log)"
        )


class Unauthorized(DreamserveError):
    status = 401

    def __init__(self) -> None:
        super().__init__("Unauthorized")


class Forbidden(DreamserveError):
    status = 403


class SharedAccount(Forbidden):
    def __init__(self, account: str) -> None:
        super().__init__(f"Account {account} is shared and managed by the operator")


class OperatorOnlyEngine(Forbidden):
    """An engine that runs on the server's own hardware and files, for shared accounts only."""

    def __init__(self, engine: str) -> None:
        super().__init__(
            f"Engine {engine} runs on the server's own hardware: only the operator declares "
            "its accounts (the config file, or dreamserve accounts add --shared)"
        )


class NotFound(DreamserveError):
    status = 404


class JobNotFound(NotFound):
    def __init__(self, jobid: str) -> None:
        super().__init__(f"Job {_show(jobid, _ID_LIMIT)} not found")


class JobNotRunning(NotFound):
    def __init__(self, jobid: str) -> None:
        super().__init__(f"Job {_show(jobid, _ID_LIMIT)} is not running")


class AssetNotFound(NotFound):
    def __init__(self, asset: str) -> None:
        super().__init__(f"Asset {_show(asset, _ID_LIMIT)} not found")


class AccountNotFound(NotFound):
    def __init__(self, account: str) -> None:
        super().__init__(f"Unable to find configuration for account {_show(account, _ID_LIMIT)}")


class PayloadTooLarge(DreamserveError):
    status = 413


class RangeNotSatisfiable(DreamserveError):
    """A Range header of a file download that starts past the file's end."""

    status = 416

    def __init__(self, value: str, size: int) -> None:
        super().__init__(
            f"Header Range ({_show(value)}) not satisfiable: the file has {size} bytes"
        )
        self.size = size

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class IdempotencyConflict(DreamserveError):
    """An Idempotency-Key used again, within its lifetime, with another request."""

    status = 422

    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {_show(key)} was already used with a different request: "
            "use a new key for a new request"
        )


class AtCapacity(DreamserveError):
    """No slot is free: the client should retry after `retry_after` seconds."""

    status = 429

    def __init__(self, account: str | None, retry_after: int) -> None:
        super().__init__(
            f"Account {account} at capacity" if account else "All accounts at capacity"
        )
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Stopping(DreamserveError):
    """The server received SIGTERM: it admits no new job while its running jobs finish (the
    client should retry after `retry_after` seconds, by then on a restarted server or another
    one behind the same address)."""

    status = 503

    def __init__(self, retry_after: int) -> None:
        super().__init__(STOPPING)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


STOPPING = "Server is stopping"


class UserLimitReached(DreamserveError):
    """A limit the operator set on the user (`dreamserve users set`) refuses the submission:
    `User limit reached: 3 running jobs (max-running)` or `User limit reached: 60 submissions
    per minute (max-per-minute)`; the client should retry after `retry_after` seconds."""

    status = 429

    def __init__(self, what: str, option: str, retry_after: int) -> None:
        super().__init__(f"User limit reached: {what} ({option})")
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TooManyBodiesOfUser(DreamserveError):
    """The user already has `limit` request bodies arriving: this one is refused before any of
    it is read, and the client should retry after `retry_after` seconds."""

    status = 429

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"Too many request bodies in progress (limit {limit} per user)")
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TooManyBodies(DreamserveError):
    """The server already has its most request bodies arriving, from all users together: this
    one is refused before any of it is read."""

    status = 503

    def __init__(self, retry_after: int) -> None:
        super().__init__("Too many request bodies in progress on the server, retry later")
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class StorageFull(DreamserveError):
    """The disk (or the quota) of the blob store or of the database has no space left: nothing
    of the request was kept. Retrying helps only once the operator has freed space."""

    status = 507

    def __init__(self) -> None:
        super().__init__("Storage full")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` is the operating system's "no space left" (ENOSPC) or "quota
    exceeded" (EDQUOT)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class StorageUnavailable(DreamserveError):
    """The blob store failed (a disk or network error) before anything was changed: the same
    request can be retried."""

    status = 503

    def __init__(self) -> None:
        super().__init__("Storage unavailable, retry later")


class DatabaseBusy(DreamserveError):
    """Another transaction (on SQLite, another process's) held a lock the request needed for
    longer than the database's busy bound: nothing was written, and the client should retry
    after `retry_after` seconds."""

    status = 503

    def __init__(self, retry_after: int) -> None:
        super().__init__("Database busy, retry later")
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class JobFailed(Exception):
    """Raised by an engine when a job cannot produce images; stored on the job, not sent as HTTP."""

    def __init__(self, error: str, details: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.details = details


class AccountError(JobFailed):
    """Raised by an engine when the account itself cannot work (the upstream refused its
    credentials, its model is missing): the job fails with `error`, and the account is put in
    error with the same message until it is saved again. Admission skips it meanwhile."""


class AccountTrouble(JobFailed):
    """Raised by an engine when a job failed for a reason that is the account's and may pass
    (connection errors, timeouts, upstream 5xx after the engine's retries, a device error): the
    job fails with `error`; a few such failures in a row cool the account down (admission
    leaves it out while others have room), and its next success ends that. `cool_for`: the
    seconds the upstream asked for (a 429's Retry-After), a cooldown at once."""

    def __init__(
        self, error: str, details: str | None = None, *, cool_for: float | None = None
    ) -> None:
        super().__init__(error, details)
        self.cool_for = cool_for


class Cancelled(Exception):
    """Raised inside an engine when its cancel signal is set."""


# Ids a 404 echoes (from the path, of any length) are cut like parameter values, but never a
# well-formed one: the longest, a jobid on an account id of 32 + 1 + 200 characters (ids.py),
# has 288.
_ID_LIMIT = 300


def _show(value: object, limit: int = 100) -> str:
    """A parameter value as it appears in a message: its text, cut to a readable length."""
    text = value if isinstance(value, str) else _json_like(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_like(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
