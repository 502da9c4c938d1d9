"""The rules of webhooks: the retry schedule, receiver hosts' cooldown and Standard Webhooks
signing.

Pure functions and small values; the delivery loop that uses them is delivery.py, the outbox's
SQL is storage/webhook_queries.py, and the address guard (also the upstream engines') is
netguard.py.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import datetime
from random import Random

from standardwebhooks import Webhook

# The whole retry schedule, in one place: the delay before each try after the first, in
# seconds. Each is stretched or shrunk by up to JITTER, so that receivers coming back from an
# outage are not hit by every delivery at once. Even with every delay shrunk, the last try
# comes more than 24 hours after the first (tests/unit/test_webhook_rules.py checks it).
RETRY_DELAYS: tuple[int, ...] = (
    5,
    60,
    5 * 60,
    30 * 60,
    2 * 3600,
    5 * 3600,
    10 * 3600,
    10 * 3600,
    10 * 3600,
)
JITTER = 0.2
TRIES = 1 + len(RETRY_DELAYS)

# A receiver host whose tries got no answer (a timeout, a refused or dropped connection)
# HOST_FAILURES times in a row cools down: no try goes there for HOST_COOLDOWN seconds, doubled
# at each further failure up to HOST_COOLDOWN_MAX, and then one try at a time until one is
# answered. Its deliveries wait meanwhile, their tries unspent: the schedule above is the
# least time between tries, a cooldown only lengthens it.
HOST_FAILURES = 3
HOST_COOLDOWN = 10.0
HOST_COOLDOWN_MAX = 300.0


def retry_delay(tries: int, rng: Random) -> float | None:
    """Seconds to wait after the `tries`-th failed try, or None when it was the last."""
    if tries > len(RETRY_DELAYS):
        return None
    return RETRY_DELAYS[tries - 1] * rng.uniform(1 - JITTER, 1 + JITTER)


def host_cooldown(failures: int) -> float | None:
    """Seconds a host that got no answer to its last `failures` tries cools down, or None."""
    if failures < HOST_FAILURES:
        return None
    doublings = min(failures - HOST_FAILURES, 16)  # past the cap long before
    return min(HOST_COOLDOWN * 2.0**doublings, HOST_COOLDOWN_MAX)


def should_retry(status_code: int) -> bool:
    """Whether an HTTP answer asks for another try: every answer but a 2xx (delivered) and a
    410 Gone (the receiver asks us to stop). Other 4xx are retried like 5xx: a receiver
    mid-deploy often answers 404 or 401 for a while."""
    return not (200 <= status_code < 300 or status_code == 410)


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: `whsec_` and 32 random bytes, base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(keys: Sequence[str], message_id: str, at: datetime, body: str) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per key, space-separated (a rotated-out
    key signs beside the new one while it is still honoured)."""
    return " ".join(Webhook(key).sign(message_id, at, body) for key in keys)
