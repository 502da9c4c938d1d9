"""Webhooks: the retry schedule, the address guard, and Standard Webhooks signing.

Pure functions and small values; the delivery loop that uses them is delivery.py, the outbox's
SQL is storage/webhook_queries.py.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address
from random import Random
from urllib.parse import urlsplit

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


def retry_delay(tries: int, rng: Random) -> float | None:
    """Seconds to wait after the `tries`-th failed try, or None when it was the last."""
    if tries > len(RETRY_DELAYS):
        return None
    return RETRY_DELAYS[tries - 1] * rng.uniform(1 - JITTER, 1 + JITTER)


def should_retry(status_code: int) -> bool:
    """Whether an HTTP answer asks for another try: every answer but a 2xx (delivered) and a
    410 Gone (the receiver asks us to stop). Other 4xx are retried like 5xx: a receiver
    mid-deploy often answers 404 or 401 for a while."""
    return not (200 <= status_code < 300 or status_code == 410)


# Addresses a webhook must never reach unless the operator allows them: where the server's own
# services, its cloud's metadata and its private network live.
_METADATA = {
    ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
    ip_address("fd00:ec2::254"),  # AWS over IPv6
    ip_address("100.100.100.200"),  # Alibaba Cloud
}
_NAT64 = IPv6Network("64:ff9b::/96")  # IPv4 in the last 32 bits (RFC 6052)
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")  # local-use translation, any layout (RFC 8215)
_COMPATIBLE = IPv6Network("::/96")  # deprecated IPv4-compatible addresses
_TRANSLATED = IPv6Network("::ffff:0:0:0/96")  # IPv4-translated (SIIT)


def refusal(address: IPv4Address | IPv6Address | str) -> str | None:
    """Why a webhook may not go to `address` ("a loopback address", ...), or None."""
    ip = ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, IPv6Address):
        if ip in _NAT64_LOCAL:
            return "not a public address"
        if ip.is_site_local:
            return "a private address"
        embedded = ip.ipv4_mapped or ip.sixtofour
        wraps_ipv4 = ip in _NAT64 or ip in _TRANSLATED
        if embedded is None and (wraps_ipv4 or (ip in _COMPATIBLE and int(ip) > 1)):
            embedded = IPv4Address(ip.packed[-4:])
        if embedded is not None and (reason := refusal(embedded)) is not None:
            return reason
    if ip.is_loopback:
        return "a loopback address"
    if ip in _METADATA:
        return "a cloud metadata address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (a literal address: itself)."""
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in found})


class ReplyUrlRefused(ValueError):
    """A replyUrl whose host cannot be reached or must not be."""


async def check_reply_url(url: str, resolver: Resolver = resolve) -> None:
    """Refuse (ReplyUrlRefused, saying why) a replyUrl whose host resolves to no address or to
    any address `refusal` names. The URL's form was checked by submission.py."""
    reason = await host_refusal(url, resolver)
    if reason is not None:
        raise ReplyUrlRefused(reason)


async def host_refusal(url: str, resolver: Resolver = resolve) -> str | None:
    """Why the host of `url` may not be reached (it resolves to no address, or to an address
    `refusal` names), or None. Checked before connecting, so that nothing, not even a
    connection attempt, reaches a refused address."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = await resolver(host, port)
    except (OSError, UnicodeError, ValueError):  # unknown, or no valid name (empty labels)
        addresses = []
    if not addresses:
        return f"host {host} does not resolve"
    for address in addresses:
        reason = refusal(address)
        if reason is not None:
            if host.strip("[]") == address:
                return f"{address} is {reason}"
            return f"{host} resolves to {address}, {reason}"
    return None


def new_secret() -> str:
    """A signing secret in the Standard Webhooks form: `whsec_` and 32 random bytes, base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    """A `webhook-id`: unique per delivery, the same on each of its tries."""
    return "msg_" + secrets.token_urlsafe(18)


def signature(keys: Sequence[str], message_id: str, at: datetime, body: str) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per key, space-separated (a rotated-out
    key signs beside the new one while it is still honoured)."""
    return " ".join(Webhook(key).sign(message_id, at, body) for key in keys)
