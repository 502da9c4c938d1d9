"""Every error leaves the API as `{"error": message}`: never a `detail` list, never HTML."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route, compile_path

from dreamserve import observe
from dreamserve.api.deps import USER
from dreamserve.errors import DreamserveError
from dreamserve.replies import ErrorBody

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DreamserveError, _dreamserve_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _client_disconnected)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: ErrorBody = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


async def _dreamserve_error(request: Request, exc: DreamserveError) -> JSONResponse:
    if exc.status == 429:
        observe.too_many(exc, request.scope.get(USER), request.scope["path"])
    return error_response(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return error_response(exc.status_code, str(exc.detail), headers)


def _allowed_methods(request: Request) -> str:
    """Every method some operation serves at this path. Starlette's own 405 names only the
    methods of the first route whose path matched, and each of our operations is a route of its
    own, so `OPTIONS /v1/dreamina/accounts` would say `Allow: POST` where GET is served too."""
    path = request.scope["path"]
    table: list[tuple[re.Pattern[str], set[str]]] = request.app.state.route_methods
    methods = {method for pattern, served in table if pattern.match(path) for method in served}
    return ", ".join(sorted(methods, key=lambda method: (_METHOD_ORDER.get(method, 9), method)))


def route_methods(
    prefix: str, routers: Iterable[APIRouter]
) -> list[tuple[re.Pattern[str], set[str]]]:
    """Each operation's path pattern (under `prefix`) and its methods, for `Allow` headers."""
    return [
        (compile_path(prefix + route.path)[0], route.methods or set())
        for router in routers
        for route in router.routes
        if isinstance(route, Route)
    ]


_METHOD_ORDER = {"GET": 0, "HEAD": 1, "POST": 2, "PUT": 3, "PATCH": 4, "DELETE": 5}


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "path"))
    return error_response(400, f"Parameter {where}: {first.get('msg', 'invalid')}")


async def _client_disconnected(request: Request, _exc: ClientDisconnect) -> JSONResponse:
    # A client that goes away in the middle of its body (a cancelled upload) is routine, not an
    # error of the server: one line, without a traceback (it was two tracebacks, ~8 KB: ours
    # and uvicorn's "Exception in ASGI application"). The path as the access log quotes it.
    # uvicorn drops the answer: nobody is there to read it.
    log.info(
        "%s %s: the client disconnected before sending the whole body",
        request.method,
        quote(request.scope["path"]),
    )
    return error_response(400, "Request body incomplete: the client disconnected")


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "Internal server error")
