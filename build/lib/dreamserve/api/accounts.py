"""POST /accounts (upsert), GET /accounts, GET and DELETE /accounts/<account>."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dreamserve.api.body import read_fields
from dreamserve.api.deps import SECURED, RequestRoute, authenticate
from dreamserve.api.schemas import ACCOUNT_REQUEST_BODY, BODY_ERRORS, ERRORS
from dreamserve.replies import AccountDeleted, AccountSummary

router = APIRouter(tags=["accounts"], route_class=RequestRoute)

ACCOUNT_PARAMETER = {
    "name": "account",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "REGION:name, raw or percent-encoded",
}


@router.post(
    "/accounts",
    response_model=AccountSummary,
    responses=BODY_ERRORS,
    openapi_extra={"requestBody": ACCOUNT_REQUEST_BODY, **SECURED},
    summary="Create or replace an account",
)
async def put_account(request: Request) -> JSONResponse:
    """Creates the account, or replaces the one of the same id (its running jobs go on).
    Secrets in `settings` are stored encrypted and never returned."""
    service, user = await authenticate(request)
    fields = await read_fields(request, user)
    return JSONResponse(await service.accounts.put(user, fields))


@router.get(
    "/accounts",
    response_model=dict[str, AccountSummary],
    responses=ERRORS,
    openapi_extra=SECURED,
    summary="List the accounts you can use",
)
async def list_accounts(request: Request) -> JSONResponse:
    """Your own accounts and the shared ones (`"shared": true`), keyed by account id."""
    service, user = await authenticate(request)
    return JSONResponse(await service.accounts.listing(user))


@router.get(
    "/accounts/{account}",
    response_model=AccountSummary,
    responses=ERRORS,
    openapi_extra={"parameters": [ACCOUNT_PARAMETER], **SECURED},
    summary="Get an account",
)
async def get_account(request: Request) -> JSONResponse:
    service, user = await authenticate(request)
    return JSONResponse(await service.accounts.get(user, request.path_params["account"]))


@router.delete(
    "/accounts/{account}",
    response_model=AccountDeleted,
    responses=ERRORS,
    openapi_extra={"parameters": [ACCOUNT_PARAMETER], **SECURED},
    summary="Delete an account",
)
async def delete_account(request: Request) -> JSONResponse:
    """Deletes one of your accounts; its unfinished jobs end as `Cancelled by user`."""
    service, user = await authenticate(request)
    return JSONResponse(await service.accounts.delete(user, request.path_params["account"]))
