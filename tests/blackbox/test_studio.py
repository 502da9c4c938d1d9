"""The studio at `/`, end to end: a real `dreamserve serve` and headless Chromium (Debian's, driven
by Playwright) that resolves no host but 127.0.0.1. Sign in, generate with live progress, the
images, references uploaded and dropped and picked, upscale, cancel, history, accounts, webhooks,
and the server's error messages shown as they are; the page asks no other host for anything.

The server has a shared account `LOCAL:studio` for the model `studio` (512 px images), whose
plugin engine holds a job at 40 % when the file `<gates>/<prompt>.hold` exists, until the test
creates `<gates>/<prompt>.run` (or the job is cancelled), then paints it as the procedural engine
does. A screenshot of each screen goes to `$DREAMSERVE_SCREENSHOTS` (else a folder of the run).

Without /usr/bin/chromium or the playwright package the module is skipped, saying which."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from plugin_site import PluginSite
from receiver import Receiver, receiving
from servers import DREAMSERVE_SERVE, Server
from support import free_port

from dreamserve.api.studio import STUDIO_DIR

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("chromium is not installed (/usr/bin/chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = playwright.expect
Page = playwright.Page
Route = playwright.Route

API = "/v1/dreamina"
WAIT_MS = 60_000  # the outer bound of every wait for the page (a loaded machine is slow)
expect.set_options(timeout=WAIT_MS)
TIMES = "\N{MULTIPLICATION SIGN}"  # as the page writes sizes

ENGINE = """
import asyncio
from pathlib import Path

from dreamserve.engines.base import EngineSettings
from dreamserve.engines.procedural import ProceduralEngine


class StudioEngine:
    seeded = True  # the procedural engine paints image i from seed + i

    class Settings(EngineSettings):
        gates: str

    def __init__(self, settings, context):
        self.gates = Path(settings["gates"])
        self.painter = ProceduralEngine({}, context)

    def serves(self, model):
        return True

    async def generate(self, request, progress, cancel):
        if (self.gates / f"{request.prompt}.hold").exists():
            progress(0.4)
            while not (self.gates / f"{request.prompt}.run").exists():
                cancel.raise_if_set()
                await asyncio.sleep(0.05)
        return await self.painter.generate(request, lambda fraction: None, cancel)

    async def upscale(self, request, progress, cancel):
        return await self.painter.upscale(request, progress, cancel)

    async def close(self):
        await self.painter.close()
"""

CONFIG = """
[sizes.studio.1k]
"1:1" = "512x512"
"16:9" = "640x360"

[[models]]
name = "studio"
resolutions = ["1k"]
sizes = "studio"
max_refs = 2
prompt_required = false
auto_ratio = true

[[accounts]]
account = "LOCAL:studio"
engine = "studio"
maxJobs = 10
models = ["studio"]
settings = {{ gates = "{gates}" }}
"""


@dataclass
class Studio:
    server: Server
    gates: Path
    shots: Path
    receiver: Receiver

    @property
    def token(self) -> str:
        assert self.server.token
        return self.server.token

    def client(self) -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.server.url + API, headers=auth, timeout=30)

    def hold(self, prompt: str) -> None:
        """The jobs of `prompt` wait at 40 % until `release`d (or cancelled)."""
        (self.gates / f"{prompt}.hold").touch()

    def release(self, prompt: str) -> None:
        (self.gates / f"{prompt}.run").touch()


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studio]:
    root = tmp_path_factory.mktemp("studio")
    gates = root / "gates"
    gates.mkdir()
    (root / "dreamserve.toml").write_text(CONFIG.format(gates=gates))
    shots = Path(os.environ.get("DREAMSERVE_SCREENSHOTS") or root / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch, receiving() as receiver:
        site = PluginSite(root / "site", patch)
        site.install(
            "dreamserve-studio-engine",
            {"studio": "studio_engine:StudioEngine"},
            {"studio_engine": ENGINE},
        )
        path = os.pathsep.join(filter(None, [str(site.root), os.environ.get("PYTHONPATH")]))
        extra = {
            "DREAMSERVE_CONFIG": str(root / "dreamserve.toml"),
            "DREAMSERVE_WEBHOOK_ALLOW_PRIVATE": "true",
            "DREAMSERVE_ACCESS_LOG": "false",
            "PYTHONPATH": path,
        }
        server = Server(root / "data", free_port(), extra=extra, command=DREAMSERVE_SERVE)
        try:
            yield Studio(server, gates, shots, receiver)
        finally:
            server.stop()
            site.forget()


@pytest.fixture(scope="module")
def studio_browser(studio: Studio) -> Iterator[Any]:
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            ],
        )
        yield launched
        launched.close()


@dataclass
class Tab:
    """A page of the studio in a fresh browser context, and every URL it requested."""

    page: Page
    studio: Studio
    requested: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)  # the page's errors and warnings

    def shot(self, name: str, full_page: bool = True) -> None:
        self.page.screenshot(path=self.studio.shots / f"{name}.png", full_page=full_page)

    def sign_in(self) -> None:
        self.page.goto(self.studio.server.url + "/")
        self.page.get_by_label("API token").fill(self.studio.token)
        self.page.get_by_label("API token").press("Enter")  # the keyboard's way
        expect(self.page.get_by_role("link", name="Generate")).to_be_visible()

    def generate(self, prompt: str, model: str = "studio") -> Any:
        """Submit the form with `prompt` on `model`: the new job's card."""
        self.page.locator("#g-model").select_option(model)
        self.page.get_by_label("Prompt").fill(prompt)
        self.page.get_by_role("button", name="Generate", exact=True).click()
        card = self.page.locator("#results .job").first
        expect(card.locator(".job-title")).to_have_text(prompt or "(references only)")
        return card


def new_tab(browser: Any, studio: Studio, width: int = 1280, height: int = 900) -> Tab:
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # confirm(): yes
    tab = Tab(page, studio)
    page.on("request", lambda request: tab.requested.append(request.url))
    page.on("console", lambda message: tab.console.append(message.text))
    page.on("pageerror", lambda error: tab.console.append(f"uncaught: {error}"))
    return tab


@pytest.fixture
def tab(studio_browser: Any, studio: Studio) -> Iterator[Tab]:
    opened = new_tab(studio_browser, studio)
    yield opened
    opened.page.context.close()
    assert_only_this_server(opened)


def assert_only_this_server(tab: Tab) -> None:
    # data: and blob: (a chosen file's thumbnail) are the page's own, no request to a host.
    local = ("data:", "blob:")
    hosts = {urlsplit(url).hostname for url in tab.requested if not url.startswith(local)}
    assert hosts == {"127.0.0.1"}, tab.requested
    # Nothing refused by the page's own policy, no script error.
    refused = [text for text in tab.console if "Content Security Policy" in text]
    assert refused == []
    assert [text for text in tab.console if text.startswith("uncaught")] == []


def images_loaded(card: Any, count: int) -> None:
    """`count` images in the card, each drawn (a signed link: no Authorization header)."""
    images = card.locator(".images img")
    expect(images).to_have_count(count)
    for index in range(count):
        images.nth(index).scroll_into_view_if_needed()
        expect(images.nth(index)).to_have_js_property("complete", True)
        assert images.nth(index).evaluate("image => image.naturalWidth") > 0


def png(colour: str = "orange", size: tuple[int, int] = (96, 64)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def test_the_page_and_its_files_are_served_from_the_package_under_a_strict_policy(
    studio: Studio,
) -> None:
    page = httpx.get(studio.server.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self';" in policy
    assert "unsafe-inline" not in policy
    assert "//" not in re.sub(r"<!--.*?-->", "", page.text, flags=re.S)  # no URL with a host
    assert page.content == (STUDIO_DIR / "index.html").read_bytes()
    head = httpx.head(studio.server.url + "/")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-security-policy"] == policy
    for name in ("studio.js", "api.js", "studio.css"):
        served = httpx.get(f"{studio.server.url}/studio/{name}")
        assert served.status_code == 200
        assert served.content == (STUDIO_DIR / name).read_bytes()
        # Revalidated on each load: an upgraded server's page never runs a kept old module.
        assert served.headers["cache-control"] == "no-cache"
        etag = {"If-None-Match": served.headers["etag"]}
        assert httpx.get(f"{studio.server.url}/studio/{name}", headers=etag).status_code == 304
    for script in STUDIO_DIR.glob("*.js"):  # nothing fetched from another host at run time
        assert "http://" not in script.read_text()
        assert "https://" not in script.read_text()
    assert "/" not in httpx.get(studio.server.url + "/openapi.json").json()["paths"]


def test_a_bad_token_shows_the_servers_message(tab: Tab) -> None:
    tab.page.goto(tab.studio.server.url + "/")
    tab.page.get_by_label("API token").fill("user:1-" + "x" * 30)
    tab.page.get_by_role("button", name="Sign in").click()
    expect(tab.page.locator("#signin-error")).to_have_text("Unauthorized")
    expect(tab.page.get_by_role("link", name="Generate")).to_be_hidden()
    tab.shot("signin")


def test_sign_in_keeps_the_token_until_sign_out(tab: Tab) -> None:
    with tab.studio.client() as client:  # a job in the history
        made = client.post("/images", json={"prompt": "signed out", "model": "studio", "count": 1})
    assert made.status_code == 200, made.text
    tab.sign_in()
    tab.page.reload()
    expect(tab.page.get_by_label("Prompt")).to_be_visible()  # still signed in
    # What this user saw (the signing secret, the jobs) leaves the page with the token.
    tab.page.get_by_role("link", name="Webhooks").click()
    expect(tab.page.locator("#w-secret")).to_have_text(re.compile(r"^whsec_"))
    tab.page.get_by_role("link", name="History").click()
    expect(tab.page.locator("#history-list .job").first).to_be_visible()
    tab.page.get_by_role("button", name="Sign out").click()
    expect(tab.page.get_by_label("API token")).to_be_visible()
    assert tab.page.evaluate("() => localStorage.getItem('dreamserve.token')") is None
    assert "whsec_" not in tab.page.content()
    expect(tab.page.locator("#history-list .job")).to_have_count(0)
    tab.page.reload()
    expect(tab.page.get_by_label("API token")).to_be_visible()


def test_the_servers_default_model_is_chosen_first_where_an_account_serves_it(tab: Tab) -> None:
    # Replies rewritten on their way to the page: LOCAL:studio said to serve seedream-5.0-lite
    # too (first in the catalogue), and `studio` said to be the server's default. A new browser
    # (nothing chosen before) gets the default, not the first model served.
    def models(route: Route) -> None:
        reply = route.fetch()
        route.fulfill(response=reply, json=reply.json() | {"default": "studio"})

    def accounts(route: Route) -> None:
        reply = route.fetch()
        listed = reply.json()
        listed["LOCAL:studio"]["models"]["image"].insert(0, "seedream-5.0-lite")
        route.fulfill(response=reply, json=listed)

    tab.page.route("**/v1/dreamina/models", models)
    tab.page.route("**/v1/dreamina/accounts", accounts)
    tab.sign_in()
    expect(tab.page.locator("#g-model")).to_have_value("studio")
    offered = tab.page.locator("#g-model option").all_inner_texts()
    assert offered.index("seedream-5.0-lite") < offered.index("studio")  # served, and first


def test_generate_shows_progress_then_four_images(tab: Tab) -> None:
    tab.sign_in()
    page = tab.page
    page.locator("#g-model").select_option("studio")
    # What the model takes: its ratios (auto, as it has auto_ratio), its one resolution.
    ratios = page.get_by_label("Ratio", exact=True).locator("option").all_inner_texts()
    assert ratios == ["auto", f"1:1 (512{TIMES}512)", f"16:9 (640{TIMES}360)"]
    assert page.get_by_label("Resolution", exact=True).locator("option").all_inner_texts() == ["1k"]
    page.get_by_label("Seed").fill("7")
    tab.studio.hold("a lighthouse at dawn")
    card = tab.generate("a lighthouse at dawn")
    expect(card.locator(".status")).to_have_text("Running 40%")
    expect(card.locator("progress")).to_have_js_property("value", 40)
    tab.shot("generate-progress")
    tab.studio.release("a lighthouse at dawn")
    expect(card.locator(".status")).to_have_text("Completed")
    images_loaded(card, 4)
    assert "LOCAL:studio" in card.locator(".meta").inner_text()
    page.evaluate("() => window.scrollTo(0, 0)")
    tab.shot("generate", full_page=False)

    opener = card.get_by_role("button", name="Open Image 2 of a lighthouse at dawn")
    opener.focus()
    page.keyboard.press("Enter")  # from the keyboard: a button, the large view a dialog
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(viewer.locator("#viewer-image")).to_have_js_property("complete", True)
    expect(viewer.locator("#viewer-info")).to_contain_text(f"512{TIMES}512 jpeg · seed 8")
    tab.shot("image-large", full_page=False)
    page.keyboard.press("Escape")
    expect(viewer).to_be_hidden()
    expect(opener).to_be_focused()  # back where the keyboard was

    download = card.get_by_role("link", name="Download Image 1 of a lighthouse at dawn")
    href = download.get_attribute("href")
    assert href is not None
    image = httpx.get(href)  # the link as the browser follows it: no token
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"

    card.get_by_role("button", name="Record").click()
    record = json.loads(page.locator("#record-json").inner_text())
    assert record["status"] == "completed"
    assert record["request"]["prompt"] == "a lighthouse at dawn"
    assert record["request"]["model"] == "studio"
    assert [image["seed"] for image in record["response"]["images"]] == [7, 8, 9, 10]
    tab.shot("record", full_page=False)
    page.locator("#record").get_by_role("button", name="Close").click()
    expect(page.locator("#record")).to_be_hidden()


def test_references_uploaded_dropped_and_picked_are_used(tab: Tab) -> None:
    tab.sign_in()
    page = tab.page
    page.locator("#g-model").select_option("studio")
    expect(page.locator("#g-refs-note")).to_have_text("up to 2")
    # A type the API refuses: its message as it is.
    page.locator("#g-files").set_input_files(
        {"name": "anim.gif", "mimeType": "image/gif", "buffer": b"GIF89a"}
    )
    expect(page.locator("#generate-error")).to_have_text(
        "Content-Type (image/gif) not supported. Valid values: image/jpeg, image/png, image/webp"
    )
    page.locator("#g-files").set_input_files(
        {"name": "orange.png", "mimeType": "image/png", "buffer": png()}
    )
    thumbs = page.locator("#g-thumbs li")
    expect(thumbs).to_have_count(1)
    # Dropped on the drop zone, as a file from the desktop would be.
    page.evaluate(
        """async (data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "blue.png", { type: "image/png" }));
            const zone = document.getElementById("g-drop");
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        }""",
        base64.b64encode(png("blue")).decode(),
    )
    expect(thumbs).to_have_count(2)
    refs = [thumbs.nth(i).get_attribute("data-asset-ref") for i in range(2)]
    assert all(ref and ref.startswith("LOCAL:studio-image:w96:h64:") for ref in refs)
    expect(page.locator("#g-prompt-note")).to_have_text("(optional with references)")
    tab.shot("generate-references", full_page=False)
    card = tab.generate("")  # the model takes references without a prompt
    expect(card.locator(".status")).to_have_text("Completed")
    images_loaded(card, 4)
    expect(card.locator(".meta")).to_contain_text("2 references")
    record = json.loads(card.evaluate("card => JSON.stringify(card.record)"))
    assert record["request"]["imageRef_1"] == refs[0]
    assert record["request"]["imageRef_2"] == refs[1]
    assert record["request"]["inputMode"] == "reference"

    # One removed, and one of the earlier images picked in its place.
    page.get_by_role("button", name="Remove reference 2").click()
    expect(thumbs).to_have_count(1)
    page.get_by_role("button", name="Pick from earlier images…").click()
    picker = page.locator("#picker")
    expect(picker.locator("img").first).to_be_visible()
    tab.shot("pick-reference", full_page=False)
    picker.locator("button.pick").first.click()
    expect(picker).to_be_hidden()
    expect(thumbs).to_have_count(2)
    picked = thumbs.nth(1).get_attribute("data-asset-ref")
    assert picked in [image["assetRef"] for image in record["response"]["images"]]
    # A third is more than the model takes: said, not sent.
    card.get_by_role("button", name="Use Image 1 of (references only) as reference").click()
    expect(page.locator("#generate-error")).to_have_text("studio takes at most 2 references")
    expect(thumbs).to_have_count(2)


def test_an_upload_goes_to_the_account_of_the_references_already_chosen(tab: Tab) -> None:
    # Two accounts serve the model; an image picked from a job on the one listed second binds
    # the next job to that account, so a file uploaded next must go there too.
    second = {"engine": "procedural", "account": "US:second", "models": ["studio"]}
    with tab.studio.client() as client:
        made = client.post("/accounts", json=second)
        assert made.status_code == 200, made.text
        try:
            serving = [
                account
                for account, summary in client.get("/accounts").json().items()
                if "studio" in summary["models"]["image"]
            ]
            assert len(serving) == 2
            later = serving[1]
            body = {"prompt": "on the later account", "model": "studio", "account": later}
            job = client.post("/images", json=body | {"count": 1}).json()
            done = client.get(f"/images/{job['jobid']}", params={"wait": 60}).json()
            assert done["status"] == "completed"

            tab.sign_in()
            page = tab.page
            page.locator("#g-model").select_option("studio")
            page.get_by_role("button", name="Pick from earlier images…").click()
            page.locator("#picker").get_by_role("button", name="on the later account (1)").click()
            thumbs = page.locator("#g-thumbs li")
            expect(thumbs).to_have_count(1)
            page.locator("#g-files").set_input_files(
                {"name": "green.png", "mimeType": "image/png", "buffer": png("green")}
            )
            expect(thumbs).to_have_count(2)
            refs = [thumbs.nth(i).get_attribute("data-asset-ref") for i in range(2)]
            assert refs[0] == done["response"]["images"][0]["assetRef"]
            assert str(refs[1]).startswith(f"{later}-image:w96:h64:")
            card = tab.generate("with both references")
            expect(card.locator(".status")).to_have_text("Completed")
            expect(card.locator(".meta")).to_contain_text(later)
        finally:
            assert client.delete("/accounts/US:second").status_code == 200


def test_a_reference_for_a_model_no_account_serves_is_refused_as_the_api_does(tab: Tab) -> None:
    tab.sign_in()
    page = tab.page
    page.locator("#g-model").select_option("seedream-4.0")  # no account here serves it
    expect(page.locator("#g-model option:checked")).to_have_text("seedream-4.0 (no account)")
    page.locator("#g-files").set_input_files(
        {"name": "orange.png", "mimeType": "image/png", "buffer": png()}
    )
    expect(page.locator("#generate-error")).to_have_text("No account serves model seedream-4.0")
    expect(page.locator("#g-thumbs li")).to_have_count(0)
    assert [url for url in tab.requested if "/assets/" in url] == []
    # The same message the API gives the job itself.
    page.get_by_label("Prompt").fill("no account")
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator("#generate-error")).to_have_text("No account serves model seedream-4.0")


def test_text_from_users_and_the_server_is_shown_as_text_never_as_markup(tab: Tab) -> None:
    # A prompt (the job's title, the history, the large view, the record) and a message that
    # echoes the user's input: shown as written, no element made of them, no script run.
    markup = '<img src="x:" onerror="window.injected = 1"><b>bold</b>'
    tab.sign_in()
    page = tab.page
    card = tab.generate(markup)  # its title checked as text
    expect(card.locator(".status")).to_have_text("Completed")
    expect(card.locator(".job-title b")).to_have_count(0)
    card.locator(".images button.thumb").first.click()
    expect(page.locator("#viewer-title")).to_have_text(f"Image 1 of {markup}")
    page.keyboard.press("Escape")
    page.get_by_role("link", name="History").click()
    expect(page.locator("#history-list .job-title").first).to_have_text(markup)
    page.get_by_role("link", name="Accounts").click()
    page.get_by_label("Engine", exact=True).fill(markup)
    page.get_by_label("Account id").fill("US:x")
    page.get_by_role("button", name="Save account").click()
    expect(page.locator("#account-error")).to_contain_text(markup)
    assert page.locator("main img[src='x:'], main b").count() == 0
    assert page.evaluate("() => window.injected") is None


def test_upscale_makes_a_job_of_its_own(tab: Tab) -> None:
    tab.sign_in()
    card = tab.generate("a harbour")
    expect(card.locator(".status")).to_have_text("Completed")
    images_loaded(card, 4)
    card.get_by_label("Upscale resolution of Image 3 of a harbour").select_option("2k")
    card.get_by_role("button", name="Upscale Image 3 of a harbour").click()
    upscaled = tab.page.locator("#results .job").first
    expect(upscaled.locator(".job-title")).to_have_text("Upscale 2k of image 3")
    expect(upscaled.locator(".status")).to_have_text("Completed")
    images_loaded(upscaled, 1)
    record = json.loads(upscaled.evaluate("card => JSON.stringify(card.record)"))
    assert record["type"] == "upscale"
    assert record["request"]["imageIndex"] == 2
    assert record["request"]["resolution"] == "2k"
    assert record["response"]["images"][0]["width"] == 2048
    tab.shot("upscale", full_page=False)


def test_cancel_a_running_job_from_the_history(tab: Tab) -> None:
    tab.sign_in()
    page = tab.page
    tab.studio.hold("a job to cancel")
    card = tab.generate("a job to cancel")
    expect(card.locator(".status")).to_have_text("Running 40%")
    page.get_by_role("link", name="History").click()
    page.get_by_label("Status", exact=True).select_option("created")
    running = page.locator("#history-list .job")
    expect(running).to_have_count(1)
    expect(running.locator(".job-title")).to_have_text("a job to cancel")
    tab.shot("history-running")
    running.get_by_role("button", name="Cancel").click()
    expect(running.locator(".status")).to_have_text("Failed")
    expect(running.locator(".failure")).to_have_text("Cancelled by user")
    # The Generate screen's card followed the same job to its end.
    page.get_by_role("link", name="Generate").click()
    expect(card.locator(".failure")).to_have_text("Cancelled by user")
    # Filters: the failed one among the failed, none running; every job of a model.
    page.get_by_role("link", name="History").click()
    page.get_by_label("Status", exact=True).select_option("failed")
    expect(page.locator("#history-list .job-title")).to_contain_text(["a job to cancel"])
    page.get_by_label("Status", exact=True).select_option("created")
    expect(page.locator("#history-empty")).to_be_visible()
    page.get_by_label("Status", exact=True).select_option("")
    page.locator("#h-model").select_option("studio")
    with tab.studio.client() as client:
        jobs = client.get("/images", params={"model": "studio", "limit": 100}).json()["jobs"]
    assert jobs
    expect(page.locator("#history-list .job")).to_have_count(min(len(jobs), 20))
    tab.shot("history")


def test_many_running_jobs_leave_the_page_room_to_call_the_server(tab: Tab) -> None:
    # A browser opens 6 connections to a server at most; 8 followed jobs must not take them all,
    # or the page's next call (this cancel) would wait for one of them to end.
    prompt = "one of many running"
    tab.studio.hold(prompt)
    with tab.studio.client() as client:
        made = [
            client.post("/images", json={"prompt": prompt, "model": "studio", "count": 1})
            for _ in range(8)
        ]
    assert [reply.status_code for reply in made] == [200] * 8
    try:
        tab.sign_in()
        page = tab.page
        page.get_by_role("link", name="History").click()
        page.get_by_label("Status", exact=True).select_option("created")
        running = page.locator("#history-list .job").filter(has_text=prompt)
        expect(running).to_have_count(8)
        first = running.first
        expect(first.locator(".status")).to_have_text("Running 40%")
        first.get_by_role("button", name="Cancel").click()
        expect(first.locator(".failure")).to_have_text("Cancelled by user")
    finally:
        tab.studio.release(prompt)


def test_accounts_added_edited_removed_with_the_apis_messages(tab: Tab) -> None:
    tab.sign_in()
    page = tab.page
    page.get_by_role("link", name="Accounts").click()
    shared = page.locator('tr[data-account="LOCAL:studio"]')
    expect(shared).to_contain_text("shared")
    expect(shared.get_by_role("button")).to_have_count(0)  # the operator's
    page.get_by_label("Engine", exact=True).fill("procedural")
    page.get_by_label("Region").fill("US")
    page.get_by_label("Email or name").fill("me@example.com")
    page.get_by_label("Capacity (maxJobs)").fill("99")
    page.get_by_role("button", name="Save account").click()
    expect(page.locator("#account-error")).to_have_text(
        "Parameter maxJobs (99) valid values: integer 1-50"
    )
    page.get_by_label("Capacity (maxJobs)").fill("3")
    page.get_by_label("Engine settings").fill("{not json")
    page.get_by_role("button", name="Save account").click()
    expect(page.locator("#account-error")).to_contain_text("Engine settings are not JSON")
    page.get_by_label("Engine settings").fill("")
    page.get_by_role("button", name="Save account").click()
    mine = page.locator('tr[data-account="US:me@example.com"]')
    expect(mine).to_contain_text("0 / 3")
    expect(page.locator("#account-error")).to_be_hidden()
    tab.shot("accounts")

    mine.get_by_role("button", name="Edit US:me@example.com").click()
    expect(page.get_by_label("Account id")).to_have_value("US:me@example.com")
    page.get_by_label("Capacity (maxJobs)").fill("5")
    page.get_by_role("button", name="Save account").click()
    expect(mine).to_contain_text("0 / 5")
    # The new account serves the built-in models: the generate form offers it.
    page.get_by_role("link", name="Generate").click()
    page.locator("#g-model").select_option("seedream-4.0")
    expect(page.get_by_label("Account", exact=True).locator("option")).to_contain_text(
        ["US:me@example.com"]
    )
    page.get_by_role("link", name="Accounts").click()
    mine.get_by_role("button", name="Remove US:me@example.com").click()
    expect(mine).to_have_count(0)
    with tab.studio.client() as client:
        assert "US:me@example.com" not in client.get("/accounts").json()


def test_the_scheduler_lists_running_jobs(tab: Tab) -> None:
    tab.sign_in()
    page = tab.page
    tab.studio.hold("a long job")
    card = tab.generate("a long job")
    expect(card.locator(".status")).to_have_text("Running 40%")
    page.get_by_role("link", name="Accounts").click()
    scheduler = page.locator("#scheduler")
    expect(scheduler.locator("h3")).to_have_text(["LOCAL:studio"])
    expect(scheduler.locator("li")).to_contain_text(["studio"])
    tab.shot("scheduler")
    tab.studio.release("a long job")
    page.get_by_role("link", name="Generate").click()
    expect(card.locator(".status")).to_have_text("Completed")


def test_webhooks_secret_rotated_and_a_jobs_deliveries_redelivered(tab: Tab) -> None:
    tab.sign_in()
    page = tab.page
    page.locator("summary", has_text="More options").click()
    hook = tab.studio.receiver.url + "/studio"
    page.get_by_label("Webhook URL (replyUrl)").fill(hook)
    page.get_by_label("Webhook reference (replyRef)").fill("ref-1")
    card = tab.generate("with a webhook")
    expect(card.locator(".status")).to_have_text("Completed")
    jobid = card.get_attribute("data-jobid")
    with tab.studio.client() as client:  # delivered before the page looks
        for _ in range(600):
            log = client.get(f"/images/{jobid}/webhooks").json()["deliveries"]
            if log and log[0]["status"] == "delivered":
                break
            time.sleep(0.1)
    card.get_by_role("button", name="Webhooks").click()
    expect(page.locator("#w-jobid")).to_have_value(re.compile(r"^j\d+i-u1-LOCAL:studio-"))
    secret = page.locator("#w-secret")
    expect(secret).to_have_text(re.compile(r"^whsec_"))
    before = secret.inner_text()
    deliveries = page.locator("#deliveries .delivery")
    expect(deliveries).to_have_count(1)
    expect(deliveries).to_contain_text(f"delivered to {hook}")
    expect(deliveries.locator(".tries li")).to_contain_text(["HTTP 200"])
    page.get_by_role("button", name="Redeliver now").click()
    expect(deliveries).to_have_count(2)  # the same event again, a delivery of its own
    # Read again while pending: delivered, with the same webhook-id.
    expect(deliveries.nth(1)).to_contain_text(f"delivered to {hook}")
    first_id = deliveries.nth(0).locator(".note").inner_text().split(" · ")[0]
    expect(deliveries.nth(1).locator(".note")).to_contain_text(first_id)
    page.get_by_role("button", name="Rotate secret").click()
    expect(secret).not_to_have_text(before)
    expect(page.locator("#w-previous")).to_contain_text("The previous secret still signs until")
    tab.shot("webhooks")
    # A job without replyUrl: the API's message as it is.
    with tab.studio.client() as client:
        plain = client.post("/images", json={"prompt": "no webhook", "model": "studio"}).json()
        while plain["status"] == "created":
            plain = client.get(f"/images/{plain['jobid']}", params={"wait": 30}).json()
    page.get_by_label("Job id").fill(plain["jobid"])
    page.get_by_role("button", name="Redeliver now").click()
    with tab.studio.client() as client:
        reply = client.post(f"/images/{plain['jobid']}/webhooks")
    assert reply.status_code == 400
    expect(page.locator("#deliveries-error")).to_have_text(reply.json()["error"])


def test_a_phone_width_screen(studio_browser: Any, studio: Studio) -> None:
    tab = new_tab(studio_browser, studio, width=390, height=844)
    try:
        tab.sign_in()
        card = tab.generate("a phone")
        expect(card.locator(".status")).to_have_text("Completed")
        images_loaded(card, 4)
        # Nothing wider than the screen: no sideways scrolling.
        assert tab.page.evaluate("() => document.documentElement.scrollWidth") <= 390
        tab.shot("phone-generate")
        tab.page.get_by_role("link", name="Accounts").click()
        expect(tab.page.locator("#accounts-table tbody tr").first).to_be_visible()
        assert tab.page.evaluate("() => document.documentElement.scrollWidth") <= 390
        tab.shot("phone-accounts")
    finally:
        tab.page.context.close()
    assert_only_this_server(tab)


def test_history_pages_through_every_job(tab: Tab) -> None:
    with tab.studio.client() as client:
        for index in range(21):  # more than a page of 20
            body = {"prompt": f"page {index}", "model": "studio", "count": 1, "queueSeconds": 600}
            job = client.post("/images", json=body).json()
        while job["status"] == "created":
            job = client.get(f"/images/{job['jobid']}", params={"wait": 30}).json()
        listed = client.get("/images", params={"model": "studio", "limit": 100}).json()["jobs"]
    assert len(listed) > 20
    tab.sign_in()
    page = tab.page
    page.get_by_role("link", name="History").click()
    page.locator("#h-model").select_option("studio")
    cards = page.locator("#history-list .job")
    expect(cards).to_have_count(20)
    page.get_by_role("button", name="Load more").click()
    expect(cards).to_have_count(min(len(listed), 40))
    shown = [cards.nth(i).get_attribute("data-jobid") for i in range(cards.count())]
    assert shown == [job["jobid"] for job in listed][: len(shown)]  # newest first, none twice


def test_the_page_works_behind_a_proxy_that_serves_it_under_a_path(tab: Tab) -> None:
    """A proxy that serves the server under `/dreamserve/` (requests routed in the browser, the
    prefix taken off on their way to the server): the page, its files and every API call go
    through the prefix; only the images come from the records' links (DREAMSERVE_PUBLIC_URL's
    work, the server's own address here)."""
    root = tab.studio.server.url
    prefix = f"{root}/dreamserve"

    def through_the_proxy(route: Route) -> None:
        route.fulfill(response=route.fetch(url=root + route.request.url[len(prefix) :]))

    tab.page.route(f"{prefix}/**", through_the_proxy)
    tab.page.goto(f"{prefix}/")
    tab.page.get_by_label("API token").fill(tab.studio.token)
    tab.page.get_by_role("button", name="Sign in").click()
    expect(tab.page.get_by_role("link", name="Generate")).to_be_visible()
    card = tab.generate("under a path")
    expect(card.locator(".status")).to_have_text("Completed")
    images_loaded(card, 4)
    shown = card.locator(".images img").evaluate_all("images => images.map(image => image.src)")
    through = [url[len(prefix) :] for url in tab.requested if url.startswith(prefix + "/")]
    assert {"/", "/studio/studio.js", "/studio/api.js", "/studio/studio.css"} <= set(through)
    assert f"{API}/images" in through  # the submission
    elsewhere = [url for url in tab.requested if url.startswith(root + "/")]
    elsewhere = [url for url in elsewhere if not url.startswith(prefix + "/")]
    assert set(elsewhere) == set(shown), elsewhere
