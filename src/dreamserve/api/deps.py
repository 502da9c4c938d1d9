"""What every route starts with: the service and the user of the request's token.

A plain function rather than FastAPI dependencies: resolving a dependency tree per request cost
more than the whole database read of GET /images (docs/benchmarks.md). The routes declare the
bearer scheme for the OpenAPI document through `SECURED`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from dreamserve.service import Service

BEARER_SCHEME = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer user:<userId>-<secret>`",
    }
}
SECURED: dict[str, Any] = {"security": [{"bearer": []}]}


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def authenticate(request: Request) -> tuple[Service, int]:
    """The service and the user id of the request's token (401 `Unauthorized` without one)."""
    service = service_of(request)
    return service, await service.authenticate(request.headers.get("authorization"))
