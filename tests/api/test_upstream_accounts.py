"""Accounts on the official model APIs, end to end through the API: a job on an `ark`, `gemini`
or `openai` account runs against a fake upstream on 127.0.0.1, and its images are stored and
served by dreamserve, never handed out as upstream links."""

from __future__ import annotations

import io
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Connection, select
from support import FakeClock, Harness, open_harness
from upstreams import KEY, FakeUpstream, Scripted, fake_upstream

from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts

pytestmark = pytest.mark.anyio

ACCOUNT = "US:vendor@example.com"


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture
async def trusting(settings: Settings) -> AsyncIterator[Harness]:
    """A server that lets users' accounts reach private addresses (the fakes' 127.0.0.1)."""
    allowed = settings.model_copy(update={"upstream_allow_private": True})
    async with open_harness(allowed) as opened:
        yield opened


def account(engine: str, fake: FakeUpstream, **settings: Any) -> dict[str, Any]:
    values = {"apiKey": KEY, "baseUrl": fake.url, **settings}
    return {"account": ACCOUNT, "engine": engine, "maxJobs": 4, "settings": values}


@pytest.mark.parametrize(
    ("engine", "extra", "body", "size"),
    [
        ("ark", {}, {"model": "seedream-4.0", "ratio": "16:9", "resolution": "2k"}, (2560, 1440)),
        ("gemini", {}, {"model": "nano-banana", "ratio": "21:9"}, (1536, 672)),
        (
            "openai",
            {"model": "gpt-image-2", "sizes": ["1024x1024", "1536x1024", "1024x1536"]},
            {"model": "seedream-4.0", "ratio": "3:4", "resolution": "2k"},
            (1728, 2304),
        ),
    ],
)
async def test_a_job_on_an_upstream_account_is_stored_and_served_by_us(
    trusting: Harness,
    fake: FakeUpstream,
    engine: str,
    extra: dict[str, Any],
    body: dict[str, Any],
    size: tuple[int, int],
) -> None:
    summary = await trusting.put_account(account(engine, fake, **extra))
    assert "apiKey" not in str(summary)
    posted = await trusting.post({**body, "prompt": "a red kite", "count": 2, "account": ACCOUNT})
    assert posted.status_code == 200, posted.text
    record = await trusting.wait(posted.json()["jobid"])
    assert record["status"] == "completed", record
    images = record["response"]["images"]
    assert [(image["width"], image["height"]) for image in images] == [size] * 2
    for image in images:
        assert image["imageUrl"].startswith("http://testserver/")
        assert fake.url not in image["imageUrl"]
        served = await trusting.client.get(image["imageUrl"])
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/jpeg"
    assert fake.seen


async def test_a_refused_api_key_puts_the_account_in_error(
    trusting: Harness, fake: FakeUpstream
) -> None:
    await trusting.put_account(
        {**account("ark", fake), "settings": {"apiKey": "sk-wrong", "baseUrl": fake.url}}
    )
    posted = await trusting.post(
        {"prompt": "a kite", "model": "seedream-4.0", "count": 1, "account": ACCOUNT}
    )
    record = await trusting.wait(posted.json()["jobid"])
    assert (record["status"], record["error"], record["errorDetails"]) == (
        "failed",
        "Upstream refused the account's credentials",
        "ark answered 401: Invalid API key",
    )
    shown = (await trusting.call("GET", f"/accounts/{ACCOUNT}")).json()
    assert shown["error"] == "Upstream refused the account's credentials"


async def test_a_users_account_may_not_reach_a_private_address(
    harness: Harness, fake: FakeUpstream
) -> None:
    # Refused when saved, naming the setting: not accepted to fail every job later.
    reply = await harness.call("POST", "/accounts", account("gemini", fake))
    assert reply.status_code == 400
    assert reply.json() == {
        "error": "Parameter settings.baseUrl is invalid: 127.0.0.1 is a loopback address"
    }
    shown = await harness.call("GET", f"/accounts/{ACCOUNT}")
    assert shown.status_code == 404
    assert fake.seen == []


async def test_a_shared_account_may_reach_the_operators_own_network(
    harness: Harness, fake: FakeUpstream
) -> None:
    await harness.service.accounts.put(None, account("openai", fake, model="local-model"))
    posted = await harness.post({"prompt": "a kite", "count": 1, "account": ACCOUNT})
    record = await harness.wait(posted.json()["jobid"])
    assert record["status"] == "completed", record
    assert [call.body["model"] for call in fake.calls("generations")] == ["local-model"]


async def test_an_account_lists_the_models_its_upstream_serves(
    trusting: Harness, fake: FakeUpstream
) -> None:
    summary = await trusting.put_account(account("gemini", fake))
    assert summary["models"] == {"image": ["nano-banana"]}
    reply = await trusting.call(
        "POST", "/accounts", {**account("ark", fake), "models": ["nano-banana"]}
    )
    assert (reply.status_code, reply.json()) == (
        400,
        {
            "error": "Parameter models (nano-banana) valid values: seedream-5.0-lite, "
            "seedream-4.5, seedream-4.0, seedream-3.0 (what engine ark serves)"
        },
    )


async def test_an_operators_2k_row_on_gemini_3_pro_image_asks_2k_and_gets_its_size(
    settings: Settings, fake: FakeUpstream, tmp_path: Path
) -> None:
    path = tmp_path / "dreamserve.toml"
    path.write_text(
        '[sizes.banana-2k.2k]\n"16:9" = "2752x1536"\n\n'
        '[[models]]\nname = "banana-2k"\nresolutions = ["2k"]\nsizes = "banana-2k"\n'
    )
    configured = settings.model_copy(update={"config": path, "upstream_allow_private": True})
    async with open_harness(configured) as harness:
        mapped = account("gemini", fake, models={"banana-2k": "gemini-3-pro-image"})
        assert (await harness.put_account(mapped))["models"] == {"image": ["banana-2k"]}
        body = {"model": "banana-2k", "ratio": "16:9", "prompt": "a red kite", "count": 1}
        posted = await harness.post({**body, "account": ACCOUNT})
        record = await harness.wait(posted.json()["jobid"])
    assert record["status"] == "completed", record
    (image,) = record["response"]["images"]
    assert (image["width"], image["height"]) == (2752, 1536)  # the fake's 2688x1536, fitted
    (call,) = fake.calls(":generateContent")
    assert call.path == "/v1beta/models/gemini-3-pro-image:generateContent"
    assert call.body["generationConfig"]["imageConfig"] == {
        "aspectRatio": "16:9",
        "imageSize": "2K",
    }


async def test_a_gemini_account_saved_with_the_old_settings_loads_and_reports_the_404(
    trusting: Harness, fake: FakeUpstream
) -> None:
    old = {"maxReferences": 3, "models": {"nano-banana": "gemini-2.5-flash-image"}}
    summary = await trusting.put_account(account("gemini", fake, **old))
    assert summary["models"] == {"image": ["nano-banana"]}
    posted = await trusting.post(
        {"prompt": "a kite", "model": "nano-banana", "count": 1, "account": ACCOUNT}
    )
    record = await trusting.wait(posted.json()["jobid"])
    assert (record["status"], record["error"], record["errorDetails"]) == (
        "failed",
        "Upstream refused the request",
        "gemini answered 404: models/gemini-2.5-flash-image is not found for API version "
        "v1beta, or is not supported for generateContent.",
    )


async def test_an_openai_account_of_only_a_key_serves_gpt_image_2(
    trusting: Harness, fake: FakeUpstream
) -> None:
    """The default map: gpt-image-2 (a CA-only model) as `gpt-image-2`, at each of its sizes."""
    body = {**account("openai", fake), "account": "CA:vendor@example.com"}
    summary = await trusting.put_account(body)
    assert summary["models"] == {"image": ["gpt-image-2"]}
    sizes = {"1:1": (1024, 1024), "2:3": (1024, 1536), "3:2": (1536, 1024)}
    pinned = {"account": body["account"]}
    for ratio, size in sizes.items():
        posted = await trusting.post(
            {"model": "gpt-image-2", "ratio": ratio, "prompt": "a kite", "count": 1, **pinned}
        )
        assert posted.status_code == 200, posted.text
        record = await trusting.wait(posted.json()["jobid"])
        assert record["status"] == "completed", record
        (image,) = record["response"]["images"]
        assert (image["width"], image["height"]) == size
    sent = [(call.body["model"], call.body["size"]) for call in fake.calls("generations")]
    assert sent == [("gpt-image-2", f"{w}x{h}") for w, h in sizes.values()]


async def test_an_openai_account_saved_in_the_first_shape_keeps_working(
    trusting: Harness, fake: FakeUpstream
) -> None:
    """`model` with a list of catalogue models, as accounts were saved before the map: stored
    as given, and its jobs go to that model."""
    old = {"baseUrl": fake.url, "model": "local-sd", "models": ["seedream-4.0"]}
    summary = await trusting.put_account(account("openai", fake, **old))
    assert summary["models"] == {"image": ["seedream-4.0"]}

    def stored(conn: Connection) -> Any:
        query = select(accounts.c.settings).where(accounts.c.engine == "openai")
        return conn.execute(query).scalar_one()

    assert await trusting.server.db.read(stored) == old
    posted = await trusting.post(
        {"model": "seedream-4.0", "prompt": "a kite", "count": 1, "account": ACCOUNT}
    )
    record = await trusting.wait(posted.json()["jobid"])
    assert record["status"] == "completed", record
    assert [call.body["model"] for call in fake.calls("generations")] == ["local-sd"]


async def test_an_accounts_models_setting_replaces_the_default_ids(
    trusting: Harness, fake: FakeUpstream
) -> None:
    """Every default model id is a setting: a newer revision needs no release."""
    models = {"seedream-4.0": "seedream-4-5-251128"}
    summary = await trusting.put_account(account("ark", fake, models=models))
    assert (summary["settings"]["models"], summary["models"]) == (
        models,
        {"image": ["seedream-4.0"]},
    )
    posted = await trusting.post(
        {"model": "seedream-4.0", "prompt": "a kite", "count": 1, "account": ACCOUNT}
    )
    record = await trusting.wait(posted.json()["jobid"])
    assert record["status"] == "completed", record
    assert [call.body["model"] for call in fake.calls("generations")] == ["seedream-4-5-251128"]


async def test_an_ark_job_with_a_reference_its_model_cannot_take_fails_before_any_call(
    trusting: Harness, fake: FakeUpstream
) -> None:
    """The catalogue lets seedream-3.0 take one reference (the hosted API's row); ModelArk's
    seedream-3-0-t2i takes none: the job fails with that limit, never with a 400 upstream."""
    await trusting.put_account(account("ark", fake))
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(buffer, "PNG")
    uploaded = await trusting.client.post(
        f"/v1/dreamina/assets/{ACCOUNT}",
        content=buffer.getvalue(),
        headers={**trusting.auth, "Content-Type": "image/png"},
    )
    assert uploaded.status_code == 200, uploaded.text
    posted = await trusting.post(
        {
            "model": "seedream-3.0",
            "prompt": "a kite",
            "imageRef_1": uploaded.json()["assetRef"],
            "count": 1,
            "account": ACCOUNT,
        }
    )
    record = await trusting.wait(posted.json()["jobid"])
    assert (record["status"], record["error"], record["errorDetails"]) == (
        "failed",
        "Too many reference images for ark model seedream-3-0-t2i-250415",
        "1 given; it takes none",
    )
    assert fake.seen == []
    shown = (await trusting.call("GET", f"/accounts/{ACCOUNT}")).json()
    assert shown.get("error") is None  # the job's fault, not the account's


async def test_choosing_diffusers_without_torch_is_a_400_naming_what_to_install(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # diffusers initialised first, with torch: hidden at its first import, it would remember
    # torch as missing for the rest of the run
    pytest.importorskip("diffusers")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    monkeypatch.delitem(sys.modules, "dreamserve.engines.diffusers", raising=False)
    body = {
        "account": "LOCAL:gpu",
        "engine": "diffusers",
        "settings": {"model": "stabilityai/sdxl-turbo", "models": ["seedream-4.0"]},
    }
    reply = await harness.call("POST", "/accounts", body)
    assert (reply.status_code, reply.json()) == (
        400,
        {
            "error": "Engine diffusers needs torch, which is not installed on this server: "
            "pip install 'dreamserve[diffusers]'"
        },
    )
    assert (await harness.call("GET", "/accounts/LOCAL:gpu")).status_code == 404


async def test_a_users_own_account_may_not_use_the_diffusers_engine(harness: Harness) -> None:
    """It would let a user choose what the server downloads and reads from its disk, and take
    its GPUs: diffusers accounts are the operator's (shared)."""
    pytest.importorskip("diffusers")
    body = {
        "account": "LOCAL:mine",
        "engine": "diffusers",
        "settings": {"model": "/etc", "models": ["seedream-4.0"]},
    }
    reply = await harness.call("POST", "/accounts", body)
    assert (reply.status_code, reply.json()) == (
        403,
        {
            "error": "Engine diffusers runs on the server's own hardware: only the operator "
            "declares its accounts (the config file, or dreamserve accounts add --shared)"
        },
    )
    shared = await harness.service.accounts.put(None, body)
    assert shared["engine"] == "diffusers"


@pytest.mark.parametrize(
    ("base_url", "reason"),
    [
        ("http://localhost:9", "localhost resolves to 127.0.0.1, a loopback address"),
        ("https://10.1.2.3", "10.1.2.3 is a private address"),
        ("http://169.254.169.254", "169.254.169.254 is a cloud metadata address"),
        ("http://[::1]:8080", "::1 is a loopback address"),
    ],
)
async def test_a_users_account_on_a_refused_address_is_a_400_at_save(
    harness: Harness, base_url: str, reason: str
) -> None:
    body = {
        "account": ACCOUNT,
        "engine": "gemini",
        "maxJobs": 1,
        "settings": {"apiKey": "sk-test", "baseUrl": base_url},
    }
    reply = await harness.call("POST", "/accounts", body)
    assert reply.status_code == 400
    assert reply.json() == {"error": f"Parameter settings.baseUrl is invalid: {reason}"}
    # The operator's shared account may reach the operator's own network.
    saved = await harness.service.accounts.put(None, body)
    assert saved["settings"]["baseUrl"] == base_url


async def test_a_host_that_does_not_resolve_now_is_saved(harness: Harness) -> None:
    # Not resolving may pass (DNS down, a name not published yet): each call checks again.
    body = {
        "account": ACCOUNT,
        "engine": "ark",
        "maxJobs": 1,
        "settings": {"apiKey": "sk-test", "baseUrl": "https://api.example.invalid"},
    }
    saved = await harness.put_account(body)
    assert saved["settings"]["baseUrl"] == "https://api.example.invalid"


async def test_an_upstream_that_fails_then_recovers_is_cooled_down_then_back(
    settings: Settings, fake: FakeUpstream
) -> None:
    """Routing with a real engine: an ark account whose upstream answers 503 three times in a
    row is cooled down (jobs that name no account go to the other account meanwhile), and its
    first success ends that."""
    clock = FakeClock()
    allowed = settings.model_copy(update={"upstream_allow_private": True})
    async with open_harness(allowed, clock=clock) as harness:
        upstream = account("ark", fake, retries=0)
        await harness.put_account({**upstream, "priority": 1})
        fake.script.extend([Scripted(503)] * 3)
        for _ in range(3):  # the top tier: every unnamed job goes there while it is healthy
            record = await harness.wait((await harness.post(SMALL_ARK)).json()["jobid"])
            assert (record["error"], record["errorDetails"]) == (
                "Upstream unavailable",
                "ark answered 503: fake ark error 503 after 1 tries",
            )
            assert f"-{ACCOUNT}-" in record["jobid"]
        shown = (await harness.call("GET", f"/accounts/{ACCOUNT}")).json()
        assert shown["lastError"] == "Upstream unavailable"
        assert shown["lastHour"] == {"completed": 0, "failed": 3}
        assert "cooldownUntil" in shown
        # Cooling: the lower tier (the shared procedural account) takes the jobs.
        for _ in range(5):
            record = await harness.wait((await harness.post(SMALL_ARK)).json()["jobid"])
            assert "-LOCAL:procedural-" in record["jobid"]
            assert record["status"] == "completed"
        assert len(fake.calls("generations")) == 3
        clock.advance(31)  # the first cooldown is over: back on top, and it works now
        harness.server.admission.forget()
        record = await harness.wait((await harness.post(SMALL_ARK)).json()["jobid"])
        assert f"-{ACCOUNT}-" in record["jobid"]
        assert record["status"] == "completed", record
        shown = (await harness.call("GET", f"/accounts/{ACCOUNT}")).json()
        assert "cooldownUntil" not in shown
        assert shown["lastHour"] == {"completed": 1, "failed": 3}


SMALL_ARK = {"prompt": "a kite", "model": "seedream-4.0", "count": 1}
