"""Checking a webhook delivery: the server signs each one the Standard Webhooks way with your
secret (`GET /webhooks/secret`), and `verify_webhook` checks it with the same library."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from dreamserve.client.errors import ClientError
from dreamserve.replies import JobRecord


class InvalidWebhook(ClientError):
    """The delivery's signature headers are missing, malformed, too old or too new (5 min), or
    none of its signatures is by the secret."""


def verify_webhook(payload: bytes | str, headers: Mapping[str, str], secret: str) -> JobRecord:
    """The job record a delivery carries, once its `webhook-id`, `webhook-timestamp` and
    `webhook-signature` headers prove it came from the server: `payload` is the request body
    exactly as received (bytes; do not parse and re-serialize it), `headers` the request's
    headers (any case), `secret` your `whsec_...` secret. Raises `InvalidWebhook`."""
    try:
        record = Webhook(secret).verify(payload, dict(headers.items()))
    except (WebhookVerificationError, ValueError) as error:
        raise InvalidWebhook(f"Invalid webhook: {error}") from error
    return cast(JobRecord, record)
