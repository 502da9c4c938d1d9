"""Dependencies every router shares: the service and the authenticated user."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from dreamserve.service import Service

_bearer = HTTPBearer(auto_error=False, description="`Bearer user:<userId>-<secret>`")


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def current_user(
    request: Request,
    service: ServiceDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> int:
    """The user id of the request's token (401 `Unauthorized` without a valid one)."""
    return await service.authenticate(request.headers.get("authorization"))


UserDep = Annotated[int, Depends(current_user)]
