"""The documentation pages, /docs (Swagger UI) and /redoc (ReDoc), with their scripts, style sheet
and icon served from the copies that the fastapi-offline package installs: FastAPI's own pages
load them from a CDN, and are blank without internet."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"
# swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png, as the package ships
# them (fastapi-offline keeps them up to date with Swagger UI 5 and ReDoc 2).
ASSET_DIR = Path(str(files("fastapi_offline") / "static"))

# The pages load nothing from another host, online too: ReDoc's side menu draws its vendor's logo
# from cdn.redoc.ly (hidden when the browser refuses it). Inline scripts and styles stay allowed:
# FastAPI's pages start the viewers with an inline script, and both viewers style inline.
CONTENT_SECURITY_POLICY = "default-src 'self' 'unsafe-inline' data: blob:"
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY}


def install_docs(app: FastAPI) -> None:
    """GET /docs and GET /redoc on `app`, and their assets under /docs/assets; out of the OpenAPI
    document. `app` is made with docs_url=None and redoc_url=None (FastAPI's CDN pages)."""
    app.mount(ASSETS, StaticFiles(directory=ASSET_DIR), name="docs-assets")
    app.add_api_route("/docs", swagger_ui, include_in_schema=False)
    app.add_api_route("/redoc", redoc, include_in_schema=False)


async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
    )
    page.headers.update(HEADERS)
    return page


async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
        with_google_fonts=False,
    )
    page.headers.update(HEADERS)
    return page
