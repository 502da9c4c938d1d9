"""GET/HEAD /files/<key>: image files behind signed, expiring links; no token needed."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.responses import MalformedRangeHeader
from starlette.responses import RangeNotSatisfiable as UnsatisfiableRange

from dreamserve.api.deps import service_of
from dreamserve.api.schemas import ERRORS, RANGE_NOT_SATISFIABLE
from dreamserve.encoding import CONTENT_TYPES, content_type
from dreamserve.errors import InvalidRange, RangeNotSatisfiable

router = APIRouter(tags=["files"])


class RangedFileResponse(FileResponse):
    """Starlette's FileResponse (ranges: 206, one or several), whose answers to a bad Range
    header are the API's `{"error"}` bodies: Starlette's own are plain text (400) or empty (416).
    Its parser raises before anything is sent, so the errors raised here reach the app's error
    handlers as the route's own do. The parser is a private method: a Starlette that renames it
    fails the range tests (tests/api/test_files.py)."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            raise InvalidRange(http_range) from None
        except UnsatisfiableRange:
            raise RangeNotSatisfiable(http_range, file_size) from None


@router.head("/files/{key:path}", include_in_schema=False)
@router.get(
    "/files/{key:path}",
    response_class=FileResponse,
    responses={
        200: {"content": {t: {} for t in CONTENT_TYPES.values()}},
        **ERRORS,
        **RANGE_NOT_SATISFIABLE,
    },
    summary="Download an image through a signed link",
)
async def get_file(
    key: str,
    request: Request,
    expires: str | None = Query(default=None),
    signature: str | None = Query(default=None),
) -> Response:
    """The image an `imageUrl` points at. 403 when the link was altered or has expired. A
    `Range` header gets its bytes (206); 400 when it is malformed, 416 past the file's end."""
    blob = await service_of(request).assets.open_link(key, expires, signature)
    headers = {"Cache-Control": "private, max-age=3600"}
    if isinstance(blob, Path):  # a file on this disk: streamed, never read whole
        return RangedFileResponse(blob, media_type=content_type(key), headers=headers)
    # Bytes held in memory; to HEAD, the server (uvicorn) sends these headers only.
    return Response(blob, media_type=content_type(key), headers=headers)
