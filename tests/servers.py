"""A real dreamserve server in a subprocess, as the README starts it, for the black-box tests and
the fault suite: its own process group, its output collected line by line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
MAKE_RUN = ("make", "--no-print-directory", "run")
# `dreamserve serve` itself, from the environment that runs the tests: signals reach the server
# process, not `make`, and the PYTHONPATH given reaches it (the fault suite's plugin engine).
DREAMSERVE_SERVE = (str(Path(sys.executable).with_name("dreamserve")), "serve")
DREAMSERVE_WORKER = (str(Path(sys.executable).with_name("dreamserve")), "worker")


class Server:
    """`make run` (or `command`) in its own process group, its output collected line by line;
    ready once uvicorn listens."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        database_url: str | None = None,
        extra: Mapping[str, str] | None = None,
        command: Sequence[str] = MAKE_RUN,
        ready_line: str = "Uvicorn running on",  # after startup: the socket is listening
    ) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE_")}
        env |= {"DREAMSERVE_DATA_DIR": str(data_dir), "DREAMSERVE_PORT": str(port)}
        # At SIGTERM the running jobs stop at once, as they did before the grace: the tests of
        # the grace (tests/faults/test_graceful_stop.py) set their own.
        env["DREAMSERVE_STOP_GRACE_SECONDS"] = "0"
        env |= extra or {}
        if database_url is not None:
            env["DREAMSERVE_DATABASE_URL"] = database_url
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir = data_dir
        self.lines: list[str] = []
        self.ready_line = ready_line
        self.ready = threading.Event()
        self.process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(120):
            self.stop(signal.SIGKILL)
            raise AssertionError("server did not start:\n" + self.output)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if self.ready_line in line:
                self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def token(self) -> str | None:
        found = re.search(r"API token for user 1 \(shown only now; keep it\): (\S+)", self.output)
        return found.group(1) if found else None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        os.killpg(self.process.pid, sig)
        self.process.wait(30)
        self.reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@contextmanager
def serving(data_dir: Path, port: int, **options: Any) -> Iterator[Server]:
    """A Server (`options` as Server takes them) for the block; stopped at its end unless the
    test stopped it already."""
    running = Server(data_dir, port, **options)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.stop()


def server_pid(server: Server) -> int:
    """The dreamserve process of a server started by `make run`: the child of `make`."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    return int(children.read_text().split()[0])


def rss_bytes(pid: int) -> int:
    """The resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_completed(client: httpx.Client, jobid: str, seconds: float = 180) -> dict[str, Any]:
    """Poll the job until it ends; its record."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reply = client.get(f"/v1/dreamina/images/{jobid}")
        assert reply.status_code == 200, reply.text
        if reply.json()["status"] != "created":
            return dict(reply.json())
        time.sleep(0.5)
    raise AssertionError(f"job {jobid} not finished after {seconds}s")
