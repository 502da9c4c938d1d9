"""GET/HEAD /files/<key>: image files behind signed, expiring links; no token needed."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from dreamserve.api.deps import service_of
from dreamserve.api.schemas import ERRORS
from dreamserve.encoding import CONTENT_TYPES, content_type

router = APIRouter(tags=["files"])


@router.head("/files/{key:path}", include_in_schema=False)
@router.get(
    "/files/{key:path}",
    response_class=FileResponse,
    responses={200: {"content": {t: {} for t in CONTENT_TYPES.values()}}, **ERRORS},
    summary="Download an image through a signed link",
)
async def get_file(
    key: str,
    request: Request,
    expires: str | None = Query(default=None),
    signature: str | None = Query(default=None),
) -> Response:
    """The image an `imageUrl` points at. 403 when the link was altered or has expired."""
    blob = await service_of(request).assets.open_link(key, expires, signature)
    headers = {"Cache-Control": "private, max-age=3600"}
    if isinstance(blob, Path):  # a file on this disk: streamed, never read whole
        return FileResponse(blob, media_type=content_type(key), headers=headers)
    # Bytes held in memory; to HEAD, the server (uvicorn) sends these headers only.
    return Response(blob, media_type=content_type(key), headers=headers)
