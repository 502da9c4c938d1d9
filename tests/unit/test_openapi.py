"""The committed openapi.json is the app's own document (regenerate with `make openapi`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args, get_origin

from fastapi.routing import APIRoute

from dreamserve.api import accounts, assets, files, health, images, models, scheduler, webhooks
from dreamserve.app import create_app
from dreamserve.settings import Settings

COMMITTED = Path(__file__).resolve().parents[2] / "openapi.json"


def test_the_committed_openapi_document_matches_the_app(tmp_path: Path) -> None:
    document = create_app(Settings(data_dir=tmp_path)).openapi()
    assert json.loads(COMMITTED.read_text()) == document, "run `make openapi` and commit the result"


def test_the_document_describes_the_image_endpoints(tmp_path: Path) -> None:
    paths = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    assert set(paths["/v1/dreamina/images"]) == {"get", "post"}  # GET: the user's jobs
    listing = paths["/v1/dreamina/images"]["get"]["parameters"]
    names = [parameter["name"] for parameter in listing]
    assert names == ["status", "model", "account", "since", "limit", "cursor"]
    assert set(paths["/v1/dreamina/images/{jobid}"]) == {"get"}
    body = paths["/v1/dreamina/images"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "prompt" in body["application/json"]["schema"]["properties"]


def test_endpoints_of_the_request_alone_are_called_directly() -> None:
    """FastAPI's per-request handler is skipped where it has nothing to solve; the files and
    models endpoints (query parameters, a dict to serialize) keep it."""
    modules = (accounts, assets, files, images, models, scheduler, webhooks)
    routes = [route for module in modules for route in module.router.routes]
    assert all(isinstance(route, APIRoute) for route in routes)
    direct = {
        (method, route.path)
        for route in routes
        if isinstance(route, APIRoute) and route.get_route_handler() is route.endpoint
        for method in route.methods
    }
    assert ("POST", "/images") in direct
    assert ("GET", "/images/{jobid}") in direct
    assert ("DELETE", "/accounts/{account}") in direct
    called_by_fastapi = {
        (method, route.path)
        for route in routes
        if isinstance(route, APIRoute)
        for method in route.methods
    } - direct
    assert called_by_fastapi == {
        ("GET", "/models"),
        ("GET", "/files/{key:path}"),
        ("HEAD", "/files/{key:path}"),
    }


def test_the_document_describes_the_health_probes_without_a_token(tmp_path: Path) -> None:
    paths = create_app(Settings(data_dir=tmp_path)).openapi()["paths"]
    assert set(paths["/healthz"]) == {"get"}
    assert set(paths["/readyz"]) == {"get"}
    assert "security" not in paths["/healthz"]["get"]
    assert "security" not in paths["/readyz"]["get"]
    not_ready = paths["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]
    assert not_ready["schema"] == {"$ref": "#/components/schemas/NotReady"}


def test_every_reply_shape_is_one_of_replies() -> None:
    """The document's reply shapes are those the service builds its replies as (replies.py),
    not a second set of models written for the document."""
    modules = (accounts, assets, files, health, images, models, scheduler, webhooks)
    routes = [route for module in modules for route in module.router.routes]
    shapes = {
        (method, route.path): route.response_model
        for route in routes
        if isinstance(route, APIRoute) and route.response_model is not None
        for method in route.methods
    }
    elsewhere = {
        route
        for route, shape in shapes.items()
        # GET /accounts: a map of AccountSummary by account id
        if (get_args(shape)[1] if get_origin(shape) is dict else shape).__module__
        != "dreamserve.replies"
    }
    assert elsewhere == {("GET", "/models")}  # `dict[str, Any]`: the catalogue as it is kept
