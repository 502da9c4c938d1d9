"""GET /metrics: this process's metrics and the database's per-account gauges, in Prometheus's
text format (metrics.py). Open, or behind `DREAMSERVE_METRICS_TOKEN` (`Authorization: Bearer
<token>`). Not in the OpenAPI document: it is the operator's, not the Dreamina API's.

And `HttpMetrics`, the middleware that counts and times every request."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dreamserve import metrics
from dreamserve.errors import Unauthorized

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def get_metrics(request: Request) -> Response:
    token: str | None = request.app.state.metrics_token
    if token is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthorized
    server = getattr(request.app.state, "server", None)
    body = await metrics.exposition(server.db if server is not None else None)
    return Response(body, media_type=metrics.CONTENT_TYPE)


class HttpMetrics:
    """Counts and times every HTTP request by its route's template
    (`/v1/dreamina/images/{jobid}`), method and status; a path no route matches is `unmatched`.
    Pure ASGI: a few dict lookups and two metric updates per request. `prefix`: where the API's
    routers are included (their routes know their path without it)."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.prefix = prefix
        # Each series' children, found once: `labels()` takes a lock and builds a key each time.
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes the app: the server answers 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            count, seconds = self._series_of(scope, status)
            count.inc()
            seconds.observe(time.perf_counter() - started)

    def _series_of(self, scope: Scope, status: int) -> tuple[Any, Any]:
        route = self._template(scope)
        key = (scope["method"], route, status)
        series = self._series.get(key)
        if series is None:
            series = (
                metrics.HTTP_REQUESTS.labels(key[0], route, str(status)),
                metrics.HTTP_SECONDS.labels(key[0], route),
            )
            self._series[key] = series
        return series

    def _template(self, scope: Scope) -> str:
        path = getattr(scope.get("route"), "path", None)
        if not isinstance(path, str):
            return "unmatched"
        if scope["path"].startswith(self.prefix + "/") and not path.startswith(self.prefix + "/"):
            return self.prefix + path
        return path
