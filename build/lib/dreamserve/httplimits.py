"""Bounds on what a client can hold at the HTTP level: the size of a request head, the time to
send it, the time to send a body, and the number of open connections.

uvicorn (0.54) bounds none of them with httptools, its default parser: its keep-alive timer is
armed only after a response (never on a new connection) and cancelled by any byte received; its
`limit_concurrency` is checked only once a head is complete (and answers 503 then, the socket
still open); httptools has no header size limit; `backlog` is only the kernel's queue of
connections not yet accepted; a body may take forever. `HeadLimits` is uvicorn's httptools
protocol with the four bounds added; `serve` passes it as uvicorn's `http` (cli.py).

The body's deadline lives here rather than in the app's body reading because only the protocol
sees every body: it knows when the head ended (the app learns of a request some time later),
and it keeps receiving the bodies no route reads (a request refused before its body, 401, 413,
429, whose rest uvicorn reads and drops while the connection stays open for the next request).
The app bounds how many bodies arrive at once (api/body.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REFUSED = (
    b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
)
_TEXT = b"text/plain; charset=utf-8"


def _reply(status: int, reason: bytes, message: bytes, content_type: bytes = _TEXT) -> bytes:
    return _REFUSED % (status, reason, content_type, len(message), message)


class HeadLimits(HttpToolsProtocol):
    """A connection whose request head grows past `max_header_bytes` is answered 431 and closed;
    one whose head is not complete `header_timeout` seconds after the connection opened (or the
    previous response ended) is closed; a connection past `max_connections` open ones is answered
    503 and closed at once. A request whose body has not all arrived `body_timeout` seconds after
    its head ended is answered 408 `{"error": "Request body timed out (limit N seconds)"}` and
    its connection closed (closed only, when the app has begun to answer it already): the
    app's request then sees the client disconnect, so whatever it read of the body is dropped.
    A deadline, not an idle timer: a byte every few seconds does not extend it.

    The head is counted by the reads that end inside it (a read that also holds the end of a body
    or of a head is not counted), so a head may pass the bound by at most two reads (256 KiB
    each) before it is refused; httptools keeps no more than that of it."""

    max_header_bytes = 65_536
    header_timeout = 10.0
    max_connections = 1000
    body_timeout = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_head = True
        self._head_ended = 0.0  # the loop's time when the last head was complete
        self._body_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._messages = (
            0  # requests whose body was read; a read that completes one is not a head's
        )
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("Refused a connection: %d open", len(self.connections) - 1)
            self._refuse(503, b"Service Unavailable", b"Too many open connections.")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        messages = self._messages
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not self._awaiting_head:
            # A body is still to come. Armed here, not with every head: most requests (a GET,
            # a small POST) arrive whole in one read and need no timer.
            if self._body_timer is None:
                deadline = self._head_ended + self.body_timeout
                self._body_timer = self.loop.call_at(deadline, self._body_timed_out)
            return
        if self._messages != messages:
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_header_bytes:
            self.logger.warning("Refused a request head past %d bytes", self.max_header_bytes)
            self._refuse(431, b"Request Header Fields Too Large", b"Request head too large.")

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._head_ended = self.loop.time()
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._messages += 1
        self._awaiting_head = True
        self._cancel_body_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next head's time starts now, unless it already came (a pipelined request).
        if self._awaiting_head and not self.transport.is_closing():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self.transport.is_closing():
            self.transport.close()

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        # The 408 only where it is the next thing the client reads: its request's answer has
        # not begun, and no earlier request's answer is still to come (a pipelined request).
        if cycle is not None and not cycle.response_started and not self.pipeline:
            self.logger.warning(
                "Refused a request body not complete %gs after its head", self.body_timeout
            )
            # As the app words its errors: {"error": ...}.
            error = orjson.dumps(
                {"error": f"Request body timed out (limit {self.body_timeout:g} seconds)"}
            )
            self.transport.write(_reply(408, b"Request Timeout", error, b"application/json"))
        self.transport.close()

    def _refuse(self, status: int, reason: bytes, message: bytes) -> None:
        self._cancel_head_timer()
        self.transport.write(_reply(status, reason, message))
        self.transport.close()


def head_limits(
    max_header_bytes: int, header_timeout: float, max_connections: int, body_timeout: float
) -> type[HeadLimits]:
    """`HeadLimits` with these bounds, as a class for uvicorn's `http` option."""
    return type(
        "HeadLimits",
        (HeadLimits,),
        {
            "max_header_bytes": max_header_bytes,
            "header_timeout": header_timeout,
            "max_connections": max_connections,
            "body_timeout": body_timeout,
        },
    )
