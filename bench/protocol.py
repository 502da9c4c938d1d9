"""Server CPU per request of uvicorn's HTTP protocols: httptools as uvicorn runs it, httptools
with dreamserve's bounds on request heads and connections (`HeadLimits`, what `serve` runs),
and h11 (the other way to bound a head's size).

Each server is a subprocess running a no-op ASGI app on uvloop; four keep-alive connections
send 5,000 requests each, one at a time, after 500 to warm up. The figure is the server's CPU
(user + system, startup included) over the requests, the median of `--rounds` rounds, the
three protocols alternating round by round. CPU, not throughput: on a shared machine the
client's own scheduling dominates the wall clock.

    .venv/bin/python bench/protocol.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

KINDS = ("httptools", "limits", "h11")
REQUEST = (
    b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: bench\r\nAccept: */*\r\n"
    b"Authorization: Bearer abcdefghijklmnopqrstuvwxyz\r\n\r\n"
)
CONNECTIONS, EACH, WARM = 4, 5000, 500


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


def serve(kind: str, port: int) -> None:
    import uvicorn

    from dreamserve.httplimits import head_limits

    http: Any = head_limits(65_536, 10.0, 1000, 60.0) if kind == "limits" else kind
    uvicorn.run(app, host="127.0.0.1", port=port, http=http, log_level="warning", loop="uvloop")


def client(port: int, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(count):
            sock.sendall(REQUEST)
            received = b""
            while not received.endswith(b"ok"):
                received += sock.recv(4096)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_round(kind: str) -> float:
    """Server CPU microseconds per request."""
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client(port, WARM)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        threads = [threading.Thread(target=client, args=(port, EACH)) for _ in range(CONNECTIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK") / (WARM + CONNECTIONS * EACH) * 1e6
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    figures: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            figures[kind].append(one_round(kind))
    for kind in KINDS:
        rounds = " ".join(f"{figure:.0f}" for figure in figures[kind])
        median = statistics.median(figures[kind])
        print(f"{kind:10} {median:6.1f} µs CPU per request (rounds: {rounds})")


if __name__ == "__main__":
    main()
