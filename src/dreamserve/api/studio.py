"""The studio at `/`: a single-page web app (src/dreamserve/studio: HTML, ES modules, CSS; no
build step, nothing loaded from another host) that calls this API with the user's token. The
files need no token; the page asks for one and sends it as the API wants it."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

ASSETS = "/studio"
STUDIO_DIR = Path(str(files("dreamserve") / "studio"))


def content_security_policy(base_url: str, presigned: bool) -> str:
    """The page's policy: its scripts, styles and requests from this server only, no inline code.
    Images may also come from `base_url` (the links in job records point there, which may be
    another origin than the page's behind a proxy) and, with presigned blob links, from the
    object store, whose host the page cannot know."""
    parts = urlsplit(base_url)
    images = ["'self'", "data:", "blob:", f"{parts.scheme}://{parts.netloc}"]
    if presigned:
        images += ["https:", "http:"]
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            f"img-src {' '.join(images)}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class Assets(StaticFiles):
    """The page's scripts and styles, asked again (a 304 while unchanged) on each load: a new
    version of the server must not run its new page with the old modules a browser kept."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def install_studio(app: FastAPI, base_url: str, presigned: bool) -> None:
    """GET / (the page) and its files under /studio, out of the OpenAPI document."""
    headers = {
        "Content-Security-Policy": content_security_policy(base_url, presigned),
        "Cache-Control": "no-cache",  # a new version of the server serves its new page
    }

    async def page() -> FileResponse:
        return FileResponse(STUDIO_DIR / "index.html", headers=headers)

    app.mount(ASSETS, Assets(directory=STUDIO_DIR), name="studio")
    # HEAD too: uptime checks and `curl -I` ask for the page that way.
    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
