"""The network address guard: which addresses the server may connect to on a user's behalf.

Webhook receivers (webhooks/delivery.py) and the upstream model APIs of users' accounts
(engines/upstream.py) are both addresses a user chooses; neither may reach the server's own
services, its cloud's metadata or its private network unless the operator allows it. A host is
resolved and every address checked before anything connects; outbound.py makes the connections
themselves go only to an address checked this way.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address
from urllib.parse import urlsplit

# Addresses a webhook or an upstream engine must never reach unless the operator allows them:
# where the server's own services, its cloud's metadata and its private network live.
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
    """Why the server may not connect to `address` ("a loopback address", ...), or None."""
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
    """Every address `host` resolves to (a literal address: itself), once each, in the order
    getaddrinfo prefers them: the order to try connecting in."""
    loop = asyncio.get_running_loop()
    found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


class HostRefused(ValueError):
    """A URL whose host cannot be reached or must not be."""


async def check_host(url: str, resolver: Resolver = resolve) -> None:
    """Refuse (HostRefused, saying why) a URL whose host resolves to no address or to any
    address `refusal` names. The URL's form is the caller's to check."""
    reason = await host_refusal(url, resolver)
    if reason is not None:
        raise HostRefused(reason)


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
    return addresses_refusal(host, addresses)


def addresses_refusal(host: str, addresses: Sequence[str]) -> str | None:
    """Why `host`, resolved to `addresses`, may not be reached: the first of them (sorted, so
    that the words do not hang on the resolver's order) that `refusal` names, in words
    ("localhost resolves to 127.0.0.1, a loopback address"); None when every one may be. One
    bad address is enough: a connection may go to any of them."""
    for address in sorted(addresses):
        reason = refusal(address)
        if reason is not None:
            if host.strip("[]") == address:
                return f"{address} is {reason}"
            return f"{host} resolves to {address}, {reason}"
    return None
