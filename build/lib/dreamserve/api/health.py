"""GET /healthz (the process answers) and GET /readyz (it can do its work): root paths, like
/docs, for load balancers and orchestrators. Neither needs a token; uvicorn's access log leaves
both out (cli.QuietProbes). The checks are service/readiness.py's.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from dreamserve import __version__
from dreamserve.api.deps import RequestRoute
from dreamserve.replies import Health, NotReady, Ready, ReadyChecks
from dreamserve.service.readiness import Readiness, failing

router = APIRouter(tags=["health"], route_class=RequestRoute)

NO_STORE = {"Cache-Control": "no-store"}
_HEALTH: Health = {"status": "ok", "version": __version__}


@router.get(
    "/healthz",
    response_model=Health,
    summary="Liveness: the process answers",
    description="No token. Always 200 while the process serves HTTP, with its version.",
)
async def healthz(request: Request) -> Response:
    return JSONResponse(_HEALTH, headers=NO_STORE)


@router.get(
    "/readyz",
    response_model=Ready,
    responses={
        503: {
            "model": NotReady,
            "description": "A check failed: `error` names each failing check and why",
        }
    },
    summary="Readiness: database, blob store and job runners",
    description=(
        "No token. Checks, each within 2 s: the database answers and is migrated to this "
        "version's newest migration; the blob store takes a probe write and delete (under "
        "`readiness/`); the job runners run, where this process runs jobs (`not run here` "
        "otherwise). 503 names each failing check."
    ),
)
async def readyz(request: Request) -> Response:
    readiness: Readiness | None = getattr(request.app.state, "readiness", None)
    if readiness is None:  # before the lifespan opened the server, or after it closed it
        results = {"database": "not open", "blobs": "not open", "runners": "not open"}
    else:
        results = await readiness.check()
    checks: ReadyChecks = {
        "database": results["database"],
        "blobs": results["blobs"],
        "runners": results["runners"],
    }
    failed = failing(results)
    if not failed:
        ready: Ready = {"status": "ready", "checks": checks}
        return JSONResponse(ready, headers=NO_STORE)
    reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
    body: NotReady = {"error": f"Not ready: {reasons}", "checks": checks}
    return JSONResponse(body, status_code=503, headers=NO_STORE)
