"""A webhook receiver for tests: a real HTTP server on 127.0.0.1, in a thread of its own.

Each request is recorded whole (headers, body, time) and answered with the next planned
`Answer`, or the default one when the plan ran out: a status, a body, a delay before answering
(longer than the deliverer's timeout: a hang), an event to hold the answer until (a receiver
that has the request while the server is killed), a Location (a redirect). While `gate` is
clear, requests are held before any answer (as by a receiver that accepts and never answers),
and `active` / `peak` count the requests being handled at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b"ok"
    delay: float = 0.0
    location: str | None = None
    trickle: float = 0.0  # seconds between the body's bytes, sent one at a time
    until: threading.Event | None = None  # answer only once it is set (at most 60 s)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    def __init__(self, default: Answer | None = None) -> None:
        self.default = default or Answer()
        self.plan: list[Answer] = []
        self.received: list[Received] = []
        self.gate = threading.Event()
        self.gate.set()
        self.active = 0  # requests being handled now
        self.peak = 0  # the most at once
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with receiver._lock:
                    receiver.active += 1
                    receiver.peak = max(receiver.peak, receiver.active)
                try:
                    self._answer()
                finally:
                    with receiver._lock:
                        receiver.active -= 1

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    answer = receiver.plan.pop(0) if receiver.plan else receiver.default
                receiver.gate.wait(60)
                if answer.delay:
                    time.sleep(answer.delay)
                if answer.until is not None:
                    answer.until.wait(60)
                try:
                    self.send_response(answer.status)
                    if answer.location:
                        self.send_header("location", answer.location)
                    self.send_header("content-length", str(len(answer.body)))
                    self.end_headers()
                    if answer.trickle:
                        for byte in answer.body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(answer.trickle)
                    else:
                        self.wfile.write(answer.body)
                except OSError:  # the deliverer gave up waiting and closed the connection
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, path: str | None = None) -> int:
        with self._lock:
            return sum(1 for each in self.received if path is None or each.path == path)


@contextmanager
def receiving(default: Answer | None = None) -> Iterator[Receiver]:
    receiver = Receiver(default)
    receiver.thread.start()
    try:
        yield receiver
    finally:
        receiver.gate.set()  # held requests end
        receiver.server.shutdown()
        receiver.server.server_close()
