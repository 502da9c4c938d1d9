"""GET /models: the catalogue, with each model's capabilities and pixel sizes, and the default."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dreamserve.api.deps import SECURED, authenticate
from dreamserve.api.schemas import ERRORS

router = APIRouter(tags=["models"])


@router.get("/models", responses=ERRORS, openapi_extra=SECURED, summary="List the model catalogue")
async def list_models(request: Request) -> dict[str, Any]:
    service, _ = await authenticate(request)
    return service.submissions.catalogue_listing()
