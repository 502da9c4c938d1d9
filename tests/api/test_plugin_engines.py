"""An engine installed as its own distribution (entry-point group dreamserve.engines), end to end:
usable by name in the operator's accounts and config file with no edit to dreamserve, refused to
users' own accounts unless it says otherwise, and a broken one never stops the server."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from plugin_site import FLAT_ENGINE, PluginSite
from support import SMALL, Harness, open_harness

from dreamserve.app import apply_config
from dreamserve.config import ConfigError, load_config
from dreamserve.errors import BadRequest
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

FLAT = {"flat": "flat_engine:FlatEngine", "users-flat": "flat_engine:UsersFlatEngine"}


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginSite]:
    installed = PluginSite(tmp_path / "site", monkeypatch)
    yield installed
    installed.forget()


async def run_on(harness: Harness, account: str) -> Image.Image:
    """The image of a small job on `account`, which must complete."""
    posted = await harness.post({**SMALL, "account": account})
    assert posted.status_code == 200, posted.text
    record = await harness.wait(posted.json()["jobid"])
    assert record["status"] == "completed", record
    [image] = record["response"]["images"]
    served = await harness.client.get(image["imageUrl"])
    assert served.status_code == 200
    return Image.open(io.BytesIO(served.content)).convert("RGB")


def near(pixel: Any, colour: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 4 for a, b in zip(pixel, colour, strict=True))  # JPEG's error


async def test_a_shared_account_on_a_plugin_engine_runs_jobs(
    site: PluginSite, settings: Settings
) -> None:
    site.install("dreamserve-flat", FLAT, {"flat_engine": FLAT_ENGINE})
    async with open_harness(settings) as harness:
        body = {"account": "LOCAL:flat", "engine": "flat", "settings": {"colour": "#c83214"}}
        summary = await harness.service.accounts.put(None, body)
        assert (summary["engine"], summary["settings"]) == ("flat", {"colour": "#c83214"})
        image = await run_on(harness, "LOCAL:flat")
    assert image.size == (1024, 1024)
    assert near(image.getpixel((512, 512)), (200, 50, 20))


async def test_the_config_file_may_name_a_plugin_engine(
    site: PluginSite, settings: Settings, tmp_path: Path
) -> None:
    site.install("dreamserve-flat", FLAT, {"flat_engine": FLAT_ENGINE})
    path = tmp_path / "dreamserve.toml"
    path.write_text(
        '[[accounts]]\naccount = "LOCAL:flat"\nengine = "flat"\nmaxJobs = 2\n'
        'settings = { colour = "#1478c8" }\n'
    )
    configured = settings.model_copy(update={"config": path})
    async with open_harness(configured) as harness:
        await apply_config(harness.service, load_config(path))  # what `dreamserve serve` does
        image = await run_on(harness, "LOCAL:flat")
    assert near(image.getpixel((10, 10)), (20, 120, 200))


async def test_a_users_own_account_may_use_a_plugin_engine_only_when_it_says_so(
    site: PluginSite, settings: Settings
) -> None:
    site.install("dreamserve-flat", FLAT, {"flat_engine": FLAT_ENGINE})
    async with open_harness(settings) as harness:
        reply = await harness.call("POST", "/accounts", {"account": "US:mine", "engine": "flat"})
        assert (reply.status_code, reply.json()) == (
            403,
            {
                "error": "Engine flat runs on the server's own hardware: only the operator "
                "declares its accounts (the config file, or dreamserve accounts add --shared)"
            },
        )
        await harness.put_account({"account": "US:mine", "engine": "users-flat"})
        image = await run_on(harness, "US:mine")
    assert near(image.getpixel((0, 0)), (0, 128, 128))  # teal, the engine's default


async def test_a_broken_plugin_does_not_stop_the_server_and_choosing_it_is_a_400(
    site: PluginSite, settings: Settings, tmp_path: Path
) -> None:
    site.install(
        "dreamserve-broken",
        {"broken": "broken_engine:Engine"},
        {"broken_engine": "import dreamserve_broken_needs_this\n"},
    )
    async with open_harness(settings) as harness:
        await run_on(harness, "LOCAL:procedural")  # the server starts and serves
        reply = await harness.call("POST", "/accounts", {"account": "US:b", "engine": "broken"})
        assert (reply.status_code, reply.json()) == (
            400,
            {
                "error": "Engine broken needs dreamserve_broken_needs_this, which is not "
                "installed on this server: pip install dreamserve_broken_needs_this"
            },
        )
        with pytest.raises(BadRequest) as raised:
            await harness.service.accounts.put(None, {"account": "LOCAL:b", "engine": "broken"})
        # A config file that names it stops `dreamserve serve` with the same words, as for a
        # built-in engine whose dependency is missing.
        path = tmp_path / "broken.toml"
        path.write_text('[[accounts]]\naccount = "LOCAL:b"\nengine = "broken"\n')
        with pytest.raises(ConfigError) as stopped:
            await apply_config(harness.service, load_config(path))
    assert str(stopped.value) == f"account LOCAL:b: {raised.value.message}"
