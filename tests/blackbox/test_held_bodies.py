"""Black-box: request bodies against `make run` with a short body deadline. A body not all
there `BODY_TIMEOUT` seconds after its head is answered 408 and its connection closed, however
steadily it trickles; nothing of it is kept and its place among the user's bodies is free
again; held uploads keep their bytes on disk, not in the server's memory. Each test opens at
most ~10 sockets to 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from servers import Server, rss_bytes, server_pid, serving
from support import Connect, answer, free_port, raw_connections

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(120)]

BODY_TIMEOUT = 4.0
PER_USER = 3
SLACK = 6.0  # the server may be slow to run its timer on a loaded machine
UPLOAD = "/v1/dreamina/assets/LOCAL:procedural"
TIMED_OUT = b'{"error":"Request body timed out (limit 4 seconds)"}'


@pytest.fixture(scope="module")
def bodies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    limits = {
        "DREAMSERVE_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        "DREAMSERVE_MAX_BODY_READS_PER_USER": str(PER_USER),
        "DREAMSERVE_ACCESS_LOG": "false",
    }
    with serving(tmp_path_factory.mktemp("bodies") / "data", free_port(), extra=limits) as running:
        yield running


@pytest.fixture
def connect(bodies: Server) -> Iterator[Connect]:
    with raw_connections(bodies.url) as opening:
        yield opening


@pytest.fixture
def roomy(tmp_path: Path) -> Iterator[Server]:
    """A server whose body deadline (60 s) is far beyond the time a loaded machine takes to
    receive a few large bodies: bodies held, not cut, for as long as a test looks at them."""
    limits = {
        "DREAMSERVE_BODY_TIMEOUT_SECONDS": "60",
        "DREAMSERVE_MAX_BODY_READS_PER_USER": str(PER_USER),
        "DREAMSERVE_ACCESS_LOG": "false",
    }
    with serving(tmp_path / "data", free_port(), extra=limits) as running:
        yield running


def head(path: str, token: str, media: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {media}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def trickle(sock: socket.socket, seconds: float) -> int:
    """A byte every 0.25 s until the server answers or closes the connection, or `seconds`
    pass; how many bytes went out."""
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([sock], [], [], 0.25)[0]:
            break  # an answer, or the close: read it before a send could reset the connection
        sock.sendall(b"x")
        sent += 1
    return sent


def places_taken(server: Server) -> None:
    """Wait until the user's bodies in progress are at the cap: a complete but bad JSON body
    is answered 400 until then (nothing stored), and 429 unread once they are."""
    headers = {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=server.url, timeout=10, headers=headers) as client:
        while (status := client.post("/v1/dreamina/images", content=b"}").status_code) != 429:
            assert status == 400
            assert time.monotonic() < deadline, "the held bodies were never counted"
            time.sleep(0.05)


def bytes_read(pid: int) -> int:
    """What the process has read from files and sockets so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def spooled(pid: int, data_dir: Path) -> list[int]:
    """The sizes of the unnamed files in the data dir the server has open (spooled uploads)."""
    sizes = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(str(data_dir)) and target.endswith(" (deleted)"):
                sizes.append(os.stat(fd).st_size)
        except FileNotFoundError:
            pass  # closed meanwhile
    return sorted(sizes)


def uploads(server: Server) -> list[str]:
    root = server.data_dir / "blobs" / "uploads"
    return [str(path) for path in root.rglob("*") if path.is_file()] if root.exists() else []


def png() -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((64, 48)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def post_upload(server: Server, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or server.token}", "Content-Type": "image/png"}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        return client.post(UPLOAD, content=png(), headers=headers)


def test_trickling_bodies_are_cut_at_their_deadline_with_408_and_their_places_freed(
    bodies: Server, connect: Connect
) -> None:
    """As many slow uploads and posts as a user may have at once, each trickling a byte every
    quarter of a second, past the deadline: each is answered 408 and closed, nothing is stored,
    and the user's next upload is served (their places were given back)."""
    token = bodies.token or ""
    stored = uploads(bodies)
    socks = [connect() for _ in range(PER_USER)]
    for index, sock in enumerate(socks):
        if index == 0:
            sock.sendall(head("/v1/dreamina/images", token, "application/json", 1000) + b'{"p')
        else:
            sock.sendall(head(UPLOAD, token, "image/png", 100_000) + png()[:50])
    # The user's places are taken: one more body is refused before it is read.
    places_taken(bodies)
    refused = post_upload(bodies)
    assert (refused.status_code, refused.headers["retry-after"], refused.json()) == (
        429,
        "5",
        {"error": f"Too many request bodies in progress (limit {PER_USER} per user)"},
    )
    sent = [trickle(sock, BODY_TIMEOUT + SLACK) for sock in socks[:1]]
    assert sent[0] > 4  # it kept sending, and was cut all the same
    for sock in socks:
        reply = answer(sock, SLACK)
        status_line, _, rest = reply.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout"
        assert b"content-type: application/json" in headers.split(b"\r\n")
        assert b"connection: close" in headers.split(b"\r\n")
        assert body == TIMED_OUT
        assert json.loads(body) == {"error": "Request body timed out (limit 4 seconds)"}
    assert uploads(bodies) == stored
    assert post_upload(bodies).status_code == 200
    assert any(
        "Refused a request body not complete 4s after its head" in line for line in bodies.lines
    )


def test_a_body_refused_before_it_is_read_does_not_hold_its_connection(
    bodies: Server, connect: Connect
) -> None:
    """A 401 answers at once; the rest of the body is read and dropped, and the connection is
    closed at the body's deadline however steadily the client trickles."""
    sock = connect()
    sock.sendall(head(UPLOAD, "user:1-wrong", "image/png", 100_000) + b"x" * 50)
    first = b""
    while not first.endswith(b'{"error":"Unauthorized"}'):
        part = sock.recv(65536)
        assert part, first
        first += part
    assert first.startswith(b"HTTP/1.1 401 "), first[:100]
    trickle(sock, BODY_TIMEOUT + SLACK)
    assert answer(sock, SLACK) == b""  # closed without another answer


def test_held_uploads_keep_their_bytes_out_of_memory(roomy: Server) -> None:
    """The user's most uploads, each of 8 MiB held one byte short: the server's memory grows by
    a small part of the 24 MiB they hold (each keeps at most 256 KiB in memory, the rest in an
    unnamed file of the data dir). On a server whose body deadline does not cut them while the
    test looks (4 s did, once, on a loaded machine: the files were gone)."""
    with raw_connections(roomy.url) as connect:
        pid = server_pid(roomy)
        assert post_upload(roomy).status_code == 200
        before, read_before = rss_bytes(pid), bytes_read(pid)
        size = 8 * 1024 * 1024
        socks = [connect() for _ in range(PER_USER)]
        for sock in socks:
            sock.sendall(head(UPLOAD, roomy.token or "", "image/png", size) + os.urandom(size - 1))
        deadline = time.monotonic() + 30
        while bytes_read(pid) < read_before + PER_USER * (size - 1):  # all but one byte arrived
            assert time.monotonic() < deadline, "the server did not read the bodies"
            time.sleep(0.05)
        grown = rss_bytes(pid) - before
        assert grown < 8 * 1024 * 1024, f"RSS grew by {grown} bytes"
        while spooled(pid, roomy.data_dir) != [size - 1] * PER_USER:  # the last writes done
            assert time.monotonic() < deadline, spooled(pid, roomy.data_dir)
            time.sleep(0.05)
        for sock in socks:
            sock.close()
