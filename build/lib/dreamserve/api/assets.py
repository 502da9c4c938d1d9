"""POST and GET /assets/<account>, DELETE /assets/<assetId>: uploads and generated images."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dreamserve.api.accounts import ACCOUNT_PARAMETER
from dreamserve.api.body import spool_body
from dreamserve.api.deps import SECURED, RequestRoute, authenticate
from dreamserve.api.schemas import BODY_ERRORS, ERRORS, STORAGE_UNAVAILABLE
from dreamserve.assets import ACCEPTED, content_type_of, too_large
from dreamserve.replies import AssetDeleted, AssetPage, AssetUploaded

router = APIRouter(tags=["assets"], route_class=RequestRoute)

UPLOAD_BODY = {
    "required": True,
    "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in ACCEPTED},
}
PAGE_PARAMETERS = [
    {"name": "count", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
]
ASSET_ID_PARAMETER = {
    "name": "assetId",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "<account>:<itemId>, raw or percent-encoded",
}


@router.post(
    "/assets/{account}",
    response_model=AssetUploaded,
    responses=BODY_ERRORS,
    openapi_extra={"parameters": [ACCOUNT_PARAMETER], "requestBody": UPLOAD_BODY, **SECURED},
    summary="Upload a reference image",
)
async def upload_asset(request: Request) -> JSONResponse:
    """The body is the image file itself, with its own Content-Type; its assetRef can then be
    given as `imageRef_N`."""
    service, user = await authenticate(request)
    media = content_type_of(request.headers.get("content-type"))
    # Before the body: no client sends megabytes to an account that is not there.
    account = await service.accounts.usable(user, request.path_params["account"])
    with await spool_body(request, user, service.config.max_upload_bytes, too_large) as data:
        return JSONResponse(await service.assets.upload(user, account, media, data))


@router.get(
    "/assets/{account}",
    response_model=AssetPage,
    responses=ERRORS,
    openapi_extra={"parameters": [ACCOUNT_PARAMETER, *PAGE_PARAMETERS], **SECURED},
    summary="List an account's generated images",
)
async def list_assets(request: Request) -> JSONResponse:
    """Your generated images on the account, newest first (`count` 1-100, default 20)."""
    service, user = await authenticate(request)
    fields = dict(request.query_params)
    return JSONResponse(await service.assets.page(user, request.path_params["account"], fields))


@router.delete(
    "/assets/{assetId}",
    response_model=AssetDeleted,
    responses={**ERRORS, **STORAGE_UNAVAILABLE},
    openapi_extra={"parameters": [ASSET_ID_PARAMETER], **SECURED},
    summary="Delete an image",
)
async def delete_asset(request: Request) -> JSONResponse:
    service, user = await authenticate(request)
    return JSONResponse(await service.assets.delete(user, request.path_params["assetId"]))
