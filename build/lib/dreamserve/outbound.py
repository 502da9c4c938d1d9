"""HTTP to the addresses users choose (webhook receivers, upstream model APIs), each connection
pinned to an address the guard of netguard.py has checked.

A new connection resolves its host once, checks every address the answer holds, and opens the
TCP connection to one of those very addresses: nothing connects before the check, so a refused
address never sees a SYN, and a DNS answer that changes between the check and the connection
(rebinding) cannot lead anywhere else. The URL keeps its hostname, so the Host header, TLS SNI
and certificate checks are the hostname's, as without the guard.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping

import anyio
import httpcore
import httpx

from dreamserve.netguard import HostRefused, Resolver, addresses_refusal

# httpx's own pool limits (httpx.AsyncClient's defaults).
MAX_CONNECTIONS = 100
MAX_KEEPALIVE_CONNECTIONS = 20
KEEPALIVE_SECONDS = 5.0


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend whose `connect_tcp` connects only to addresses `resolver`
    gave for the host and `netguard` allows (all of them must be allowed, unless
    `allow_private`, which skips the check but still connects to what `resolver` gave).

    The addresses are tried in the resolver's order, each with its share of the connect
    timeout left. Raises `HostRefused` (its words: "<host> resolves to <address>, a loopback
    address") before any connection when an address is refused; `httpcore.ConnectError` when
    the host does not resolve; the last address's `ConnectError` or `ConnectTimeout` when none
    accepts the connection. `network` makes the connections once the addresses are checked
    (httpcore's own; tests pass a fake).
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        allow_private: bool,
        network: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.resolver = resolver
        self.allow_private = allow_private
        self._network = network or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with anyio.fail_after(timeout):
                *others, last = await self.addresses(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"{host} did not resolve in time") from None

        async def connect(address: str, share: int) -> httpcore.AsyncNetworkStream:
            # Each address its share of the time left, so that one that never answers (an
            # IPv6 route that drops packets, say) leaves time for the next.
            left = None if deadline is None else max(0.0, deadline - time.monotonic()) / share
            return await self._network.connect_tcp(
                address, port, left, local_address, socket_options
            )

        for tried, address in enumerate(others):  # in the resolver's order: getaddrinfo's
            with contextlib.suppress(httpcore.ConnectError, httpcore.ConnectTimeout):
                return await connect(address, len(others) + 1 - tried)
        return await connect(last, 1)

    async def addresses(self, host: str, port: int) -> list[str]:
        """The addresses of `host`, every one of them checked (at least one)."""
        try:
            addresses = list(await self.resolver(host, port))
        except (OSError, UnicodeError, ValueError) as error:  # unknown, or not a valid name
            raise httpcore.ConnectError(f"{host} does not resolve ({error})") from None
        if not addresses:
            raise httpcore.ConnectError(f"{host} does not resolve")
        if not self.allow_private and (reason := addresses_refusal(host, addresses)) is not None:
            raise HostRefused(reason)
        return addresses

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its pool's connections made by a `GuardedBackend`."""

    def __init__(self, backend: GuardedBackend) -> None:
        context = httpx.create_ssl_context(trust_env=False)
        super().__init__(verify=context, trust_env=False)
        # httpx 0.28 takes no network backend (encode/httpx#3749 proposes one), so the pool it
        # made is replaced by the same pool over `backend`: the one private name used here.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_KEEPALIVE_CONNECTIONS,
            keepalive_expiry=KEEPALIVE_SECONDS,
            network_backend=backend,
        )


def guarded_client(
    resolver: Resolver,
    *,
    allow_private: bool,
    timeout: float,
    headers: Mapping[str, str],
) -> httpx.AsyncClient:
    """An httpx client whose every connection goes through a `GuardedBackend`. It follows no
    redirect (a caller that does sends each hop through it again) and ignores the proxy and
    certificate settings of the environment: a proxy would make the connection, unchecked."""
    transport = GuardedTransport(GuardedBackend(resolver, allow_private=allow_private))
    return httpx.AsyncClient(
        transport=transport,
        timeout=timeout,
        headers=headers,
        follow_redirects=False,
        trust_env=False,
    )
