"""The guarded connections of outbound.py: the host resolved once, every address checked, the
connection made to a checked address. The network under them is a recording fake, but for TLS,
which a real server on 127.0.0.1 answers."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpcore
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import fake_dns

from dreamserve.netguard import HostRefused
from dreamserve.outbound import GuardedBackend

pytestmark = pytest.mark.anyio


class RecordingNetwork(httpcore.AsyncNetworkBackend):
    """Records where it is asked to connect (and the time each try is given); refuses the
    addresses in `refusing`, times out on those in `silent`."""

    def __init__(self, refusing: Iterable[str] = (), silent: Iterable[str] = ()) -> None:
        self.connects: list[tuple[str, int]] = []
        self.timeouts: list[float | None] = []
        self.refusing = set(refusing)
        self.silent = set(silent)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        self.timeouts.append(timeout)
        if host in self.refusing:
            raise httpcore.ConnectError("[Errno 111] Connection refused")
        if host in self.silent:
            raise httpcore.ConnectTimeout("timed out")
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


async def test_an_address_that_never_answers_leaves_time_for_the_next() -> None:
    network = RecordingNetwork(silent={"2606:2800:220:1::1"})
    addresses = ["2606:2800:220:1::1", "93.184.216.34"]
    backend = GuardedBackend(
        fake_dns({"two.test": addresses}), allow_private=False, network=network
    )
    await backend.connect_tcp("two.test", 443, timeout=10)
    assert network.connects == [("2606:2800:220:1::1", 443), ("93.184.216.34", 443)]
    first, second = network.timeouts
    assert first == pytest.approx(5, abs=0.1)  # half of it: one of two addresses
    assert second == pytest.approx(10, abs=0.1)  # the fake timed out at once: all is left


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


async def test_tls_checks_the_hosts_name_on_the_pinned_connection(tmp_path: Path) -> None:
    """Pinned to 127.0.0.1, TLS still sends the name as SNI and checks the certificate
    against the name: a certificate for api.test passes for api.test and fails for
    other.test, though both names lead to the same address."""
    ca = certificates(tmp_path, "api.test")
    client = ssl.create_default_context(cafile=ca)
    names: list[str | None] = []
    resolver = fake_dns({"api.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    backend = GuardedBackend(resolver, allow_private=True)
    with tls_server(tmp_path, names) as port:
        async with httpcore.AsyncConnectionPool(
            ssl_context=client, network_backend=backend
        ) as pool:
            answer = await pool.request("GET", f"https://api.test:{port}/")
            assert (answer.status, answer.content) == (200, b"ok")
            with pytest.raises(httpcore.ConnectError, match="Hostname mismatch"):
                await pool.request("GET", f"https://other.test:{port}/")
    assert names == ["api.test", "other.test"]


def certificates(folder: Path, name: str) -> Path:
    """A CA (its PEM returned) and a server certificate for `name` signed by it (server.pem
    and server.key in `folder`)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dreamserve test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return folder / "ca.pem"


@contextmanager
def tls_server(folder: Path, names: list[str | None]) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 (its port) that answers every request `ok` and records
    the name each client asked for (SNI)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.pem", folder / "server.key")

    def record(_tls: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        names.append(name)

    context.sni_callback = record
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            except OSError:  # the client refused the certificate
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()
