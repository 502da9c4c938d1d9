"""The guarded connections of outbound.py: the host resolved once, every address checked, the
connection made to a checked address. The network under them is a recording fake: nothing
here opens a socket."""

from __future__ import annotations

from collections.abc import Iterable

import httpcore
import pytest
from support import fake_dns

from dreamserve.netguard import HostRefused
from dreamserve.outbound import GuardedBackend

pytestmark = pytest.mark.anyio


class RecordingNetwork(httpcore.AsyncNetworkBackend):
    """Records where it is asked to connect; refuses the addresses in `refusing`."""

    def __init__(self, refusing: Iterable[str] = ()) -> None:
        self.connects: list[tuple[str, int]] = []
        self.refusing = set(refusing)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        if host in self.refusing:
            raise httpcore.ConnectError("[Errno 111] Connection refused")
        return httpcore.AsyncMockStream([])


async def test_every_address_is_checked_before_any_connection() -> None:
    network = RecordingNetwork()
    backend = GuardedBackend(
        fake_dns({"split.test": ["93.184.216.34", "10.0.0.7"]}),
        allow_private=False,
        network=network,
    )
    with pytest.raises(HostRefused) as refused:
        await backend.connect_tcp("split.test", 443, timeout=1)
    assert str(refused.value) == "split.test resolves to 10.0.0.7, a private address"
    assert network.connects == []


async def test_the_connection_goes_to_the_address_that_was_checked() -> None:
    """One lookup per connection, and its answer is where the connection goes: a name that
    rebinds to loopback just after the check cannot lead the connection there."""
    answers = [["93.184.216.34"], ["127.0.0.1"]]
    asked: list[tuple[str, int]] = []

    async def rebinding(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return answers.pop(0)

    network = RecordingNetwork()
    backend = GuardedBackend(rebinding, allow_private=False, network=network)
    await backend.connect_tcp("rebind.test", 443, timeout=1)
    assert asked == [("rebind.test", 443)]
    assert network.connects == [("93.184.216.34", 443)]


async def test_the_checked_addresses_are_tried_in_order_until_one_connects() -> None:
    network = RecordingNetwork(refusing={"93.184.216.34"})
    addresses = ["93.184.216.34", "2606:2800:220:1::1"]
    backend = GuardedBackend(
        fake_dns({"two.test": addresses}), allow_private=False, network=network
    )
    await backend.connect_tcp("two.test", 80, timeout=1)
    assert network.connects == [("93.184.216.34", 80), ("2606:2800:220:1::1", 80)]
    network.refusing.add("2606:2800:220:1::1")
    with pytest.raises(httpcore.ConnectError, match="Connection refused"):
        await backend.connect_tcp("two.test", 80, timeout=1)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("nowhere.test", "nowhere.test does not resolve (nowhere.test: Name or service not known)"),
        ("empty.test", "empty.test does not resolve"),
    ],
)
async def test_a_host_that_does_not_resolve_is_a_connection_error(host: str, message: str) -> None:
    """Not a refusal: a name that resolves to nothing today is a network failure, retried."""
    network = RecordingNetwork()
    backend = GuardedBackend(fake_dns({"empty.test": []}), allow_private=False, network=network)
    with pytest.raises(httpcore.ConnectError) as failure:
        await backend.connect_tcp(host, 80, timeout=1)
    assert str(failure.value) == message
    assert network.connects == []


async def test_allowing_private_addresses_skips_the_check_but_not_the_pinning() -> None:
    network = RecordingNetwork()
    backend = GuardedBackend(
        fake_dns({"receiver.test": ["127.0.0.1"]}), allow_private=True, network=network
    )
    await backend.connect_tcp("receiver.test", 8000, timeout=1)
    assert network.connects == [("127.0.0.1", 8000)]
