"""A Python client for the dreamserve API, and for the hosted Dreamina API it speaks
(`https://api.useapi.net`): `Client` (blocking) and `AsyncClient` (asyncio), typed with the
server's own reply definitions, errors as exceptions carrying the server's status and message,
retries with an automatic Idempotency-Key. See docs/client.md.

It needs httpx, httpx-sse, pydantic, typing-extensions and standardwebhooks only (`pip install
dreamserve`), never the server's dependencies: pyproject.toml's import contract checks it.
"""

from __future__ import annotations

from dreamserve.client.asynchronous import AsyncClient
from dreamserve.client.calls import Retries
from dreamserve.client.errors import (
    ApiError,
    BadRequest,
    ClientError,
    ConnectionFailed,
    Forbidden,
    IdempotencyConflict,
    JobFailed,
    NotFound,
    RateLimited,
    ServerError,
    Unauthorized,
    WaitTimedOut,
)
from dreamserve.client.sync import Client
from dreamserve.client.webhooks import InvalidWebhook, verify_webhook

__all__ = [
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "Forbidden",
    "IdempotencyConflict",
    "InvalidWebhook",
    "JobFailed",
    "NotFound",
    "RateLimited",
    "Retries",
    "ServerError",
    "Unauthorized",
    "WaitTimedOut",
    "verify_webhook",
]
