"""Every error leaves the API as `{"error": message}`: never a `detail` list, never HTML."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from dreamserve.errors import DreamserveError
from dreamserve.replies import ErrorBody

log = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DreamserveError, _dreamserve_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
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


async def _unexpected_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "Internal server error")
