"""The studio page's Content-Security-Policy: its own scripts, styles and requests only; images
also from where the job records' links point."""

from __future__ import annotations

from dreamserve.api.studio import STUDIO_DIR, content_security_policy


def directives(policy: str) -> dict[str, list[str]]:
    return {name: rest for name, *rest in (part.split() for part in policy.split("; "))}


def test_the_page_loads_code_from_this_server_only() -> None:
    policy = directives(content_security_policy("http://127.0.0.1:8000", presigned=False))
    assert policy == {
        "default-src": ["'none'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "connect-src": ["'self'"],
        "img-src": ["'self'", "data:", "blob:", "http://127.0.0.1:8000"],
        "base-uri": ["'none'"],
        "form-action": ["'none'"],
        "frame-ancestors": ["'none'"],
    }


def test_images_come_from_the_public_url_and_with_presigned_links_from_the_store() -> None:
    behind_proxy = directives(content_security_policy("https://img.example.com/base", False))
    assert behind_proxy["img-src"][-1] == "https://img.example.com"
    presigned = directives(content_security_policy("https://img.example.com", presigned=True))
    assert presigned["img-src"][-2:] == ["https:", "http:"]
    assert presigned["connect-src"] == ["'self'"]  # the API calls stay on this server


def test_the_package_holds_the_page_and_its_modules() -> None:
    names = {path.name for path in STUDIO_DIR.iterdir()}
    assert {"index.html", "studio.js", "api.js", "studio.css"} <= names
