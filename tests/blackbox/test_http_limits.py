"""Black-box: what a client can hold before its request reaches the app (httplimits.py), against
`make run` with small bounds. Each test opens at most ~15 sockets to 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from servers import Server, rss_bytes, server_pid, serving
from support import Connect, answer, free_port, raw_connections

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(120)]

MAX_HEADER_BYTES = 16_384
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 10
SLACK = 3.0  # the server may be slow to run its timer on a loaded machine


LIMITS = {
    "DREAMSERVE_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "DREAMSERVE_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
    "DREAMSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "DREAMSERVE_ACCESS_LOG": "false",
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("limits") / "data", free_port(), extra=LIMITS) as running:
        yield running


@pytest.fixture
def unshared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own, for a test that counts the server's connections: the module's
    server may still hold connections that an earlier test closed (the server sees the
    closes when its loaded event loop gets to them)."""
    with serving(tmp_path_factory.mktemp("alone") / "data", free_port(), extra=LIMITS) as running:
        yield running


@pytest.fixture
def connect(limited: Server) -> Iterator[Connect]:
    with raw_connections(limited.url) as opening:
        yield opening


def models(server: Server) -> int:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=5
    ) as client:
        return client.get("/v1/dreamina/models").status_code


def test_a_head_past_the_bound_is_431_and_not_held(limited: Server, connect: Connect) -> None:
    pid = server_pid(limited)
    assert models(limited) == 200
    before = rss_bytes(pid)
    sent_each = 24 * 1024 * 1024
    socks = [connect() for _ in range(3)]
    for sock in socks:
        sock.sendall(b"GET /v1/dreamina/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 262_144
        try:
            for _ in range(sent_each // len(chunk)):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-head: what a bound does
    time.sleep(0.5)
    grown = rss_bytes(pid) - before
    # 72 MiB were sent; the server keeps at most the bound plus two reads of each.
    assert grown < 16 * 1024 * 1024, f"RSS grew by {grown} bytes"
    replies = [answer(sock, 3) for sock in socks]
    for reply in replies:
        assert reply == b"" or reply.startswith(b"HTTP/1.1 431 "), reply[:80]
    assert any(reply.startswith(b"HTTP/1.1 431 ") for reply in replies)
    assert models(limited) == 200


def test_a_head_just_under_the_bound_is_served(limited: Server, connect: Connect) -> None:
    sock = connect()
    filler = b"a" * (MAX_HEADER_BYTES - 1024)
    sock.sendall(
        b"GET /v1/dreamina/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: Bearer {limited.token}\r\n".encode()
        + b"X-Filler: "
        + filler
        + b"\r\n\r\n"
    )
    assert answer(sock, 5).startswith(b"HTTP/1.1 200 ")
    sock.close()


def test_stalled_heads_are_closed_in_time_while_requests_go_on(
    limited: Server, connect: Connect
) -> None:
    started = time.monotonic()
    silent = connect()  # sends nothing
    half = connect()  # half a head, then nothing
    half.sendall(b"GET /v1/dreamina/models HTTP/1.1\r\nHost: x\r\nX-Half: ")
    drip = connect()  # a byte at a time: each byte would cancel uvicorn's keep-alive timer
    after_one = connect()  # a full request, then half of the next
    after_one.sendall(
        f"GET /v1/dreamina/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {limited.token}"
        "\r\n\r\n".encode()
    )
    assert after_one.recv(65536).startswith(b"HTTP/1.1 200 ")
    after_one.sendall(b"GET /v1/dreamina/models HTTP/1.1\r\n")
    dripped = b"GET /v1/dreamina/models HTTP/1.1\r\nX-Slow: " + b"a" * 100
    for byte in dripped[: int(HEADER_TIMEOUT / 0.25) + 8]:
        try:
            drip.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            break
        assert models(limited) == 200  # the server serves others meanwhile
        time.sleep(0.25)
    for sock in (silent, half, drip, after_one):
        answer(sock, max(0.1, started + HEADER_TIMEOUT + SLACK - time.monotonic()))
    assert time.monotonic() - started < HEADER_TIMEOUT + SLACK + 1
    assert models(limited) == 200


def test_connections_past_the_bound_are_refused_then_served_again(unshared: Server) -> None:
    with raw_connections(unshared.url) as connect:
        held = [connect() for _ in range(MAX_CONNECTIONS)]
        extra = connect()  # accepted after the held ones: the listening socket's queue is FIFO
        assert answer(extra, 30).startswith(b"HTTP/1.1 503 ")
        for sock in held:
            sock.close()
    # Served again once the server has seen the closes (when, a loaded machine decides).
    deadline = time.monotonic() + 30
    while (status := models(unshared)) == 503:
        assert time.monotonic() < deadline, "still refused after the held connections closed"
        time.sleep(0.1)
    assert status == 200


def test_heads_after_large_bodies_and_pipelined_heads_are_not_refused(
    limited: Server, connect: Connect
) -> None:
    """Only a head's own bytes count: a body many times the bound, then the next request on the
    same connection, and two requests sent at once."""
    sock = connect()
    auth = f"Authorization: Bearer {limited.token}\r\n".encode()
    body = b'{"prompt": "' + b"a" * (20 * MAX_HEADER_BYTES) + b'"}'
    sock.sendall(
        b"POST /v1/dreamina/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + auth
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 400 "), first[:200]
    get = b"GET /v1/dreamina/models HTTP/1.1\r\nHost: x\r\n" + auth
    sock.sendall(get + b"\r\n" + get + b"Connection: close\r\n\r\n")
    replies = answer(sock, 5)
    assert replies.count(b"HTTP/1.1 200 ") == 2, replies[:200]
