"""What every route starts with: the service and the user of the request's token.

A plain function rather than FastAPI dependencies: resolving a dependency tree per request cost
more than the whole database read of GET /images (docs/benchmarks.md). The routes declare the
bearer scheme for the OpenAPI document through `SECURED`, and are `RequestRoute`s.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from dreamserve.service import Service

BEARER_SCHEME = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer user:<userId>-<secret>`",
    }
}
SECURED: dict[str, Any] = {"security": [{"bearer": []}]}
USER = "dreamserve.user"  # the request's user id, in its scope once authenticated (for logs)


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def authenticate(request: Request) -> tuple[Service, int]:
    """The service and the user id of the request's token (401 `Unauthorized` without one)."""
    service = service_of(request)
    user = request.scope[USER] = await service.tokens.authenticate(
        request.headers.get("authorization")
    )
    return service, user


class RequestRoute(APIRoute):
    """A route whose endpoint takes the request alone and returns a Response is called as it
    is: FastAPI's per-request work (solving the parameters, reading the body, telemetry) finds
    nothing to do for it, and costs about as much as a submission's validation
    (docs/benchmarks.md). Any other endpoint gets FastAPI's handler."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        request_only = dependant.request_param_name is not None and not (
            dependant.path_params
            or dependant.query_params
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
            or dependant.dependencies
        )
        returned = inspect.signature(self.endpoint, eval_str=True).return_annotation
        if request_only and isinstance(returned, type) and issubclass(returned, Response):
            endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
            return endpoint
        return super().get_route_handler()
