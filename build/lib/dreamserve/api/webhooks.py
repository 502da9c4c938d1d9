"""GET and POST /webhooks/secret: the key that signs the user's webhook deliveries."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dreamserve.api.deps import SECURED, RequestRoute, authenticate
from dreamserve.api.schemas import ERRORS
from dreamserve.replies import WebhookSecret

router = APIRouter(tags=["webhooks"], route_class=RequestRoute)


@router.get(
    "/webhooks/secret",
    response_model=WebhookSecret,
    responses=ERRORS,
    openapi_extra=SECURED,
    summary="Get your webhook signing secret",
)
async def get_secret(request: Request) -> JSONResponse:
    """The `whsec_…` secret that signs your deliveries (`webhook-signature`, Standard
    Webhooks); made on the first ask."""
    service, user = await authenticate(request)
    return JSONResponse(await service.webhooks.secret(user))


@router.post(
    "/webhooks/secret",
    response_model=WebhookSecret,
    responses=ERRORS,
    openapi_extra=SECURED,
    summary="Rotate your webhook signing secret",
)
async def rotate_secret(request: Request) -> JSONResponse:
    """A new secret. For 24 hours deliveries carry two signatures, by the new secret and by
    the previous one, so receivers can switch without missing one."""
    service, user = await authenticate(request)
    return JSONResponse(await service.webhooks.rotate(user))
