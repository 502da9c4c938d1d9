"""Every error leaves the API as `{"error": message}`: never a `detail` list, never HTML."""

from __future__ import annotations

import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

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


async def _dreamserve_error(_request: Request, exc: DreamserveError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers)


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))


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
