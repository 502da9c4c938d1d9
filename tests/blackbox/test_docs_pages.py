"""The documentation pages work without internet: /docs (Swagger UI) and /redoc (ReDoc) of a real
`dreamserve serve`, opened in headless Chromium with every host but 127.0.0.1 unresolvable, render
every operation of the OpenAPI document, and the page asks no other host for anything.

Chromium is Debian's `chromium` package (`.ci/run` installs it); without /usr/bin/chromium the
browser tests are skipped, and the checks of the served HTML still run."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import DREAMSERVE_SERVE, ROOT, Server
from support import free_port

from dreamserve.api.docs import ASSET_DIR, CONTENT_SECURITY_POLICY

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
PAGES = ("/docs", "/redoc")
# Each operation's summary, as the committed document (equal to the app's: test_openapi.py) has it.
SUMMARIES = sorted(
    operation["summary"]
    for path in json.loads((ROOT / "openapi.json").read_text())["paths"].values()
    for operation in path.values()
)
# How each viewer writes an operation's title once its script has run on the document.
RENDERED = {
    "/docs": re.compile(r'<div class="opblock-summary-description">([^<]*)</div>'),
    "/redoc": re.compile(r'<h2 [^>]*><a [^>]*href="#tag/\w+/operation/\w+"[^>]*></a>([^<]*)</h2>'),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`dreamserve serve` on a free port in a fresh data dir."""
    api = Server(tmp_path_factory.mktemp("docs"), free_port(), command=DREAMSERVE_SERVE)
    yield api
    api.stop()


@pytest.mark.parametrize("page", PAGES)
def test_the_page_loads_only_files_of_this_server(served: Server, page: str) -> None:
    reply = httpx.get(served.url + page)
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "//" not in re.sub(r"<!--.*?-->", "", reply.text, flags=re.S)  # no URL with a host
    links = re.findall(r'(?:src|href|spec-url)="([^"]*)"|url: \'([^\']*)\'', reply.text)
    local = sorted("".join(link) for link in links)
    viewer = ["/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"]
    if page == "/redoc":
        viewer = ["/docs/assets/redoc.standalone.js"]
    assert local == sorted(["/docs/assets/favicon.png", "/openapi.json", *viewer])
    for link in local:
        served_file = httpx.get(served.url + link)
        assert served_file.status_code == 200, link
        if link.startswith("/docs/assets/"):  # the package's copy, byte for byte
            assert served_file.content == (ASSET_DIR / link.rsplit("/", 1)[1]).read_bytes()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed")
@pytest.mark.parametrize("page", PAGES)
def test_the_page_renders_every_operation_offline(
    served: Server, page: str, tmp_path: Path
) -> None:
    dom, requested = open_offline(served.url + page, tmp_path)
    assert sorted(title.strip() for title in RENDERED[page].findall(dom)) == SUMMARIES
    assert "Create an image job" in SUMMARIES
    # No image of another host drawn either (ReDoc drops its logo once refused).
    assert [src for src in re.findall(r'<img [^>]*src="([^"]*)"', dom) if "//" in src] == []
    # The page's own requests (Chromium's background ones have no page as initiator): its files,
    # the document, nothing from another host (ReDoc's logo from cdn.redoc.ly is refused).
    assert {url.removeprefix(served.url) for url in requested} == {
        "/docs/assets/favicon.png",
        "/openapi.json",
        *(
            ["/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"]
            if page == "/docs"
            else ["/docs/assets/redoc.standalone.js"]
        ),
    }


def open_offline(url: str, profile: Path) -> tuple[str, list[str]]:
    """The DOM of `url` once its scripts have run (ten seconds of virtual time) in headless
    Chromium that resolves no host but 127.0.0.1, and the URLs that the page requested."""
    net_log = profile / "net-log.json"
    browser = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=10000",
            f"--log-net-log={net_log}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert browser.returncode == 0, browser.stderr
    origin = url.split("/", 3)[:3]
    return browser.stdout, page_requests(json.loads(net_log.read_text()), "/".join(origin))


def page_requests(net_log: dict[str, Any], origin: str) -> list[str]:
    """The URLs of the requests in a Chromium net log that a page of `origin` started."""
    start = net_log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        event["params"]["url"]
        for event in net_log["events"]
        if event["type"] == start and event.get("params", {}).get("initiator") == origin
    ]
