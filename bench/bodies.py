"""Server memory while clients hold request bodies open, one byte short of complete: the real
server (`python -m dreamserve.cli serve`, uvicorn as `serve` runs it) on 127.0.0.1, a fresh data
dir per run, against the same number of idle connections in the same run.

Runs (N = --count):
- `idle`: N connections that send nothing (the baseline);
- `uploads, caps off`: N uploads of --size-mib MiB (default 10, the upload limit) from one
  user, each held one byte short, with the body caps raised past N: every body is read and
  held, which shows what spooling makes of them;
- `uploads, one user`: the same with the default caps: one token holder's bodies;
- `uploads, N/6 users`: the same spread over enough users to fill the server's cap;
- `posts, caps off` and `posts, N/6 users`: POST /images bodies of 1 MiB (the JSON limit) held
  one byte short, which are read into memory (a JSON body is parsed whole).

Each figure is taken once the server has read every byte sent (its `rchar`), or, for idle
connections, once it has accepted them all. Printed per run: the server's RSS before (after
one request) and while the bodies are held, its growth, what the server answered at once (429,
503), the bytes of spooled uploads in unnamed files of the data dir, and the ratio of the RSS
while held to that of the idle run.

    .venv/bin/python bench/bodies.py [--count 150] [--size-mib 10]

`PYTHONPATH=<another checkout>/src` measures another version of the server (settings it does
not know are ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dreamserve.app import open_server
from dreamserve.settings import Settings

UPLOAD = "/v1/dreamina/assets/LOCAL:procedural"
IMAGES = "/v1/dreamina/images"
JSON_LIMIT = 1_048_576
DEFAULT_PER_USER = 6
CAPS_OFF = {"DREAMSERVE_MAX_BODY_READS_PER_USER": "100000", "DREAMSERVE_MAX_BODY_READS": "100000"}


@dataclass
class Run:
    name: str
    kind: str  # idle, upload or post
    users: int = 1
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Figures:
    before: int = 0  # RSS, bytes
    held: int = 0
    peak: int = 0  # VmHWM over the run
    spooled: int = 0  # bytes in unnamed files of the data dir
    answered: dict[int, int] = field(default_factory=dict)  # status -> count


def proc_field(pid: int, name: str, key: str) -> int:
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * (1024 if name == "status" else 1)
    raise RuntimeError(f"no {key} in /proc/{pid}/{name}")


def spooled(pid: int, data_dir: Path) -> int:
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(str(data_dir)) and target.endswith(" (deleted)"):
                total += os.stat(fd).st_size
        except FileNotFoundError:
            pass
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def make_tokens(settings: Settings, users: int) -> list[str]:
    """User 1 and the shared account (the first start), and `users - 1` more users."""
    async with open_server(settings) as server:
        first = await server.service.tokens.bootstrap()
        assert first is not None
        return [first] + [(await server.service.tokens.create())[1] for _ in range(users - 1)]


class Server:
    def __init__(self, data_dir: Path, extra: dict[str, str]) -> None:
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE_")}
        env |= {
            "DREAMSERVE_DATA_DIR": str(data_dir),
            "DREAMSERVE_PORT": str(self.port),
            "DREAMSERVE_ACCESS_LOG": "false",
            # Nothing is cut while the figures are taken.
            "DREAMSERVE_BODY_TIMEOUT_SECONDS": "3600",
            "DREAMSERVE_HEADER_TIMEOUT_SECONDS": "3600",
        } | extra
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dreamserve.cli", "serve"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.ready = threading.Event()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "Uvicorn running on" in line:
                self.ready.set()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def request(port: int, token: str) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"GET /v1/dreamina/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        while sock.recv(65536):
            pass


def head(path: str, token: str, media: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {media}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def wait_until(condition: object, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def measure(run: Run, count: int, size: int) -> Figures:
    with tempfile.TemporaryDirectory(prefix="bench-bodies-") as tmp:
        data_dir = Path(tmp) / "data"
        tokens = asyncio.run(make_tokens(Settings(data_dir=data_dir), run.users))
        server = Server(data_dir, run.env)
        pid = server.process.pid
        socks: list[socket.socket] = []
        try:
            request(server.port, tokens[0])
            figures = Figures(before=proc_field(pid, "status", "VmRSS:"))
            read_before = proc_field(pid, "io", "rchar:")
            fds_before = len(os.listdir(f"/proc/{pid}/fd"))
            body = os.urandom(size if run.kind == "upload" else JSON_LIMIT)
            sent = 0
            for index in range(count):
                sock = socket.create_connection(("127.0.0.1", server.port))
                socks.append(sock)
                if run.kind == "idle":
                    continue
                token = tokens[index % run.users]
                if run.kind == "upload":
                    data = head(UPLOAD, token, "image/png", size) + body[: size - 1]
                else:
                    data = head(IMAGES, token, "application/json", JSON_LIMIT) + body[:-1]
                sock.sendall(data)
                sent += len(data)
            if run.kind == "idle":
                wait_until(
                    lambda: len(os.listdir(f"/proc/{pid}/fd")) >= fds_before + count, "accepts"
                )
            else:
                wait_until(lambda: proc_field(pid, "io", "rchar:") >= read_before + sent, "reads")
            time.sleep(0.5)  # the last spool writes, off the event loop
            figures.held = proc_field(pid, "status", "VmRSS:")
            figures.peak = proc_field(pid, "status", "VmHWM:")
            figures.spooled = spooled(pid, data_dir)
            for sock in socks:
                if select.select([sock], [], [], 0)[0]:
                    found = re.match(rb"HTTP/1.1 (\d+)", sock.recv(65536))
                    status = int(found.group(1)) if found else 0
                    figures.answered[status] = figures.answered.get(status, 0) + 1
            return figures
        finally:
            for sock in socks:
                sock.close()
            server.stop()


def mib(value: int) -> str:
    return f"{value / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--size-mib", type=float, default=10.0)
    args = parser.parse_args()
    count, size = args.count, int(args.size_mib * 2**20)
    spread = math.ceil(count / DEFAULT_PER_USER)
    runs = [
        Run("idle", "idle"),
        Run("uploads, caps off", "upload", env=CAPS_OFF),
        Run("uploads, one user", "upload"),
        Run(f"uploads, {spread} users", "upload", users=spread),
        Run("posts, caps off", "post", env=CAPS_OFF),
        Run(f"posts, {spread} users", "post", users=spread),
    ]
    print(
        f"{count} connections; uploads of {size} bytes, posts of {JSON_LIMIT}, one byte short; "
        "memory and disk in MiB"
    )
    print(
        f"{'run':<22} {'RSS before':>10} {'RSS held':>9} {'growth':>8} {'peak':>8} "
        f"{'spooled':>8} {'x idle':>6}  answered at once"
    )
    idle = 0
    for run in runs:
        figures = measure(run, count, size)
        idle = idle or figures.held
        answered = ", ".join(f"{n} x {status}" for status, n in sorted(figures.answered.items()))
        print(
            f"{run.name:<22} {mib(figures.before):>10} {mib(figures.held):>9} "
            f"{mib(figures.held - figures.before)} {mib(figures.peak)} {mib(figures.spooled)} "
            f"{figures.held / idle:6.2f}  {answered or '-'}",
            flush=True,
        )


if __name__ == "__main__":
    main()
