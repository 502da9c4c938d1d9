"""GET /models: the catalogue, with each model's capabilities and pixel sizes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from dreamserve.api.deps import ServiceDep, UserDep
from dreamserve.api.schemas import ERRORS

router = APIRouter(tags=["models"])


@router.get("/models", responses=ERRORS, summary="List the model catalogue")
async def list_models(_user: UserDep, service: ServiceDep) -> dict[str, Any]:
    return {"models": service.models()}
