"""The engines that call official model APIs (ark, gemini, openai), against fake upstreams on
127.0.0.1 that check every request the way the vendor does (tests/upstreams.py): the request
shapes of shared/upstreams.md, batching, downloads, and the error mapping."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import gc
import io
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image
from support import eventually, fake_dns
from upstreams import GEMINI_2_5_FLASH, KEY, FakeUpstream, Scripted, fake_upstream

from dreamserve.catalogue import default_catalogue
from dreamserve.engines.ark import ArkEngine
from dreamserve.engines.base import CancelSignal, EngineContext, GenerationRequest, until_cancelled
from dreamserve.engines.gemini import GeminiEngine, image_size
from dreamserve.engines.openai import OpenAIEngine
from dreamserve.engines.registry import EngineRegistry
from dreamserve.engines.upstream import SizeLimit, encode_reference
from dreamserve.errors import AccountError, AccountTrouble, BadRequest, Cancelled, JobFailed
from dreamserve.sealing import SecretBox

pytestmark = pytest.mark.anyio

EXECUTOR = ThreadPoolExecutor(2)
CONTEXT = EngineContext(EXECUTOR, allow_private=True)  # the fakes listen on 127.0.0.1


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


def ark(fake: FakeUpstream, **settings: Any) -> ArkEngine:
    return ArkEngine({"apiKey": KEY, "baseUrl": fake.url, **settings}, CONTEXT)


def gemini(fake: FakeUpstream, **settings: Any) -> GeminiEngine:
    return GeminiEngine({"apiKey": KEY, "baseUrl": fake.url, **settings}, CONTEXT)


def openai(fake: FakeUpstream, **settings: Any) -> OpenAIEngine:
    base = {"apiKey": KEY, "baseUrl": fake.url, "model": "gpt-image-2"}
    return OpenAIEngine({**base, **settings}, CONTEXT)


def request(model: str = "seedream-4.0", **fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "prompt": "a lighthouse at dawn",
        "model": model,
        "width": 2048,
        "height": 2048,
        "count": 1,
        **fields,
    }
    return GenerationRequest(**values)


async def run(engine: Any, job: GenerationRequest, cancel: CancelSignal | None = None) -> Any:
    seen: list[float] = []
    try:
        images = await engine.generate(job, seen.append, cancel or CancelSignal())
    finally:
        await engine.close()
    assert seen
    assert seen[-1] == 1.0
    return images


def picture(width: int = 300, height: int = 200) -> Image.Image:
    return Image.linear_gradient("L").resize((width, height)).convert("RGB")


# -- ark ---------------------------------------------------------------------------------------


async def test_ark_sends_the_catalogue_size_the_model_id_and_no_watermark(
    fake: FakeUpstream,
) -> None:
    images = await run(ark(fake), request(seed=7))
    (call,) = fake.calls("/api/v3/images/generations")
    assert call.headers["authorization"] == f"Bearer {KEY}"
    assert call.body == {
        "model": "seedream-4-0-250828",
        "prompt": "a lighthouse at dawn",
        "size": "2048x2048",
        "response_format": "url",
        "watermark": False,
        "seed": 7,
        "sequential_image_generation": "disabled",
    }
    assert [image.size for image in images] == [(2048, 2048)]


async def test_ark_downloads_its_links_without_the_api_key(fake: FakeUpstream) -> None:
    await run(ark(fake), request())
    (download,) = fake.downloads
    assert "authorization" not in download.headers


async def test_ark_batches_count_through_sequential_generation(fake: FakeUpstream) -> None:
    images = await run(ark(fake), request(count=4))
    (call,) = fake.calls("generations")
    assert call.body["sequential_image_generation"] == "auto"
    assert call.body["sequential_image_generation_options"] == {"max_images": 4}
    assert len(images) == 4
    assert len({image.tobytes() for image in images}) == 4


async def test_ark_asks_again_for_images_a_batch_did_not_return(fake: FakeUpstream) -> None:
    fake.ark_max_images = 2  # "the model may return fewer"
    images = await run(ark(fake), request(count=4))
    calls = fake.calls("generations")
    assert [c.body["sequential_image_generation"] for c in calls] == ["auto", *["disabled"] * 2]
    assert len(images) == 4


async def test_ark_models_that_cannot_batch_get_one_call_per_image(fake: FakeUpstream) -> None:
    images = await run(ark(fake, sequentialModels=[]), request(count=3))
    calls = fake.calls("generations")
    assert len(calls) == 3
    assert all("sequential_image_generation" not in call.body for call in calls)
    assert len(images) == 3


async def test_seedream_3_is_asked_for_sizes_it_takes_one_image_a_call(
    fake: FakeUpstream,
) -> None:
    """3.0 takes sides of 512-2048 and no batching: 2k 16:9 is asked as 2048x1152 and the
    result brought to 2560x1440."""
    job = request("seedream-3.0", width=2560, height=1440, count=2)
    images = await run(ark(fake), job)
    calls = fake.calls("generations")
    assert [call.body["size"] for call in calls] == ["2048x1152"] * 2
    assert all("sequential_image_generation" not in call.body for call in calls)
    assert [image.size for image in images] == [(2560, 1440)] * 2


def test_size_limits_keep_the_aspect_within_bounds() -> None:
    assert SizeLimit(minSide=512, maxSide=2048).fit(3024, 1296) == (2048, 877)
    assert SizeLimit(minSide=512, maxSide=2048).fit(1328, 1328) == (1328, 1328)
    assert SizeLimit(minPixels=3_686_400).fit(1664, 936) == (2560, 1440)
    assert SizeLimit(maxPixels=16_777_216).fit(6197, 2656) == (6197, 2656)
    assert SizeLimit(maxPixels=1_000_000).fit(2000, 2000) == (1000, 1000)


# Each catalogue model a default map serves, each tier and fixed ratio of it: (model, tier,
# ratio, width, height).
CATALOGUE = default_catalogue()


def every_size(*models: str) -> list[tuple[str, str, str, int, int]]:
    return [
        (name, tier, ratio, *CATALOGUE[name].size(tier, ratio))
        for name in models
        for tier in CATALOGUE[name].resolutions
        for ratio in CATALOGUE[name].sizes[tier]
    ]


ARK_DEFAULTS = {
    "seedream-5.0-lite": "seedream-5-0-260128",
    "seedream-4.5": "seedream-4-5-251128",
    "seedream-4.0": "seedream-4-0-250828",
    "seedream-3.0": "seedream-3-0-t2i-250415",
}


@pytest.mark.parametrize(("model", "tier", "ratio", "width", "height"), every_size(*ARK_DEFAULTS))
async def test_ark_default_models_are_sent_what_they_take_at_every_catalogue_size(
    fake: FakeUpstream, model: str, tier: str, ratio: str, width: int, height: int
) -> None:
    """The fake refuses what ModelArk refuses (docs/catalogue.md §3.3): each default id, its
    pixel or side limits, batching only where the model takes it."""
    fake.shrink = 16
    # Two images at the default tier (a batch where the model takes one), one elsewhere: each
    # 4k image is resampled, the cost of these tests.
    count = 2 if tier == CATALOGUE[model].default_resolution else 1
    images = await run(ark(fake), request(model, width=width, height=height, count=count))
    calls = fake.calls("generations")
    upstream = ARK_DEFAULTS[model]
    assert {call.body["model"] for call in calls} == {upstream}
    asked = [tuple(map(int, call.body["size"].split("x"))) for call in calls]
    limit = ark(fake).settings.sizeLimits[upstream]
    assert all(limit.broken(*size) == [] for size in asked)
    if upstream == "seedream-3-0-t2i-250415":
        assert len(calls) == count
        assert all("sequential_image_generation" not in call.body for call in calls)
    elif count == 2:
        (call,) = calls
        assert call.body["sequential_image_generation"] == "auto"
        assert call.body["sequential_image_generation_options"] == {"max_images": 2}
    else:
        (call,) = calls
        assert call.body["sequential_image_generation"] == "disabled"
    assert [image.size for image in images] == [(width, height)] * count


async def test_ark_sizes_outside_a_model_are_fitted_at_their_aspect(fake: FakeUpstream) -> None:
    """5.0 Lite takes at most 10,404,496 pixels: 4k 16:9 is asked as 4300x2419 and the result
    brought to 5404x3040."""
    fake.shrink = 16
    images = await run(ark(fake), request("seedream-5.0-lite", width=5404, height=3040))
    (call,) = fake.calls("generations")
    assert call.body["size"] == "4300x2419"
    assert [image.size for image in images] == [(5404, 3040)]


async def test_ark_fake_refuses_a_size_outside_the_model(fake: FakeUpstream) -> None:
    """What the engine's fitting saves a job from: the vendor's 400."""
    engine = ark(fake, sizeLimits={})
    with pytest.raises(JobFailed) as failure:
        await run(engine, request("seedream-5.0-lite", width=4096, height=4096))
    assert failure.value.details == (
        "ark answered 400: The parameter `size` specified in the request is not valid: "
        "4096x4096 is outside 3686400-10404496 pixels for model seedream-5-0-260128"
    )


async def test_a_size_no_scaling_can_fit_fails_before_any_call(fake: FakeUpstream) -> None:
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake), request("seedream-3.0", width=5000, height=500))
    assert (failure.value.error, failure.value.details) == (
        "Size not possible on ark model seedream-3-0-t2i-250415",
        "5000x500: no size at its aspect within minSide 512, maxSide 2048",
    )
    assert fake.seen == []


@pytest.mark.parametrize(
    ("model", "upstream", "limit"),
    [
        ("seedream-5.0-lite", "seedream-5-0-260128", 14),
        ("seedream-4.5", "seedream-4-5-251128", 10),
        ("seedream-4.0", "seedream-4-0-250828", 10),
    ],
)
async def test_ark_references_up_to_the_models_limit_and_no_more(
    fake: FakeUpstream, model: str, upstream: str, limit: int
) -> None:
    refs = tuple(picture(32, 32) for _ in range(limit))
    job = request(model, width=2560, height=1440, references=refs)
    await run(ark(fake), job)
    (call,) = fake.calls("generations")
    assert len(call.body["image"]) == limit
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake), request(model, references=(*refs, picture(32, 32))))
    assert (failure.value.error, failure.value.details) == (
        f"Too many reference images for ark model {upstream}",
        f"{limit + 1} given; it takes at most {limit}",
    )
    assert len(fake.seen) == 1  # no call for the second job


async def test_seedream_3_takes_no_reference(fake: FakeUpstream) -> None:
    """seedream-3-0-t2i is text to image; the catalogue's seedream-3.0 row allows 1 reference
    (the hosted API's), so a job with one on an ark account fails before any call."""
    with pytest.raises(JobFailed) as failure:
        await run(
            ark(fake), request("seedream-3.0", width=1328, height=1328, references=(picture(),))
        )
    assert (failure.value.error, failure.value.details) == (
        "Too many reference images for ark model seedream-3-0-t2i-250415",
        "1 given; it takes none",
    )
    assert fake.seen == []


async def test_ark_references_and_images_of_a_call_stay_within_15(fake: FakeUpstream) -> None:
    """12 references leave 3 images to a batch: count 5 is one batch of 3 and two single calls
    (12 + 1 each)."""
    fake.shrink = 16
    refs = tuple(picture(32, 32) for _ in range(12))
    job = request("seedream-5.0-lite", width=2560, height=1440, count=5, references=refs)
    images = await run(ark(fake), job)
    calls = fake.calls("generations")
    assert [call.body["sequential_image_generation"] for call in calls] == [
        "auto",
        "disabled",
        "disabled",
    ]
    assert calls[0].body["sequential_image_generation_options"] == {"max_images": 3}
    assert len(images) == 5


async def test_ark_references_for_an_unlisted_model_stop_at_14(fake: FakeUpstream) -> None:
    """An operator's id with no maxReferences entry: references + one image <= 15."""
    engine = ark(fake, models={"seedream-4.0": "ep-20261206-abc"})
    refs = tuple(picture(16, 16) for _ in range(15))
    with pytest.raises(JobFailed) as failure:
        await run(engine, request(references=refs))
    assert (failure.value.error, failure.value.details) == (
        "Too many reference images for ark model ep-20261206-abc",
        "15 given; it takes at most 14",
    )
    assert fake.seen == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"image": ["x"] * 11, "model": "seedream-4-5-251128"},
            "The parameter `image` specified in the request is not valid: model "
            "seedream-4-5-251128 takes at most 10 images",
        ),
        (
            {"sequential_image_generation": "auto", "model": "seedream-3-0-t2i-250415"},
            "The parameter `sequential_image_generation` is not supported by model "
            "seedream-3-0-t2i-250415",
        ),
        (
            {"sequential_image_generation_options": {"max_images": 6}, "image": "refs:10"},
            "The total number of reference images and generated images must not exceed 15",
        ),
    ],
)
def test_the_ark_fake_refuses_what_modelark_refuses(
    fake: FakeUpstream, body: dict[str, Any], message: str
) -> None:
    """The fake's own rules (so the tests above prove something): its 400s, in Ark's shape."""
    import httpx

    reference = (
        "data:image/jpeg;base64," + base64.b64encode(encode_reference(picture(16, 16))).decode()
    )
    sent: dict[str, Any] = {
        "model": "seedream-4-0-250828",
        "prompt": "p",
        "size": "2048x2048",
        "sequential_image_generation": "auto",
        **body,
    }
    if sent.get("image") == "refs:10":
        sent["image"] = [reference] * 10
    elif "image" in sent:
        sent["image"] = [reference] * len(sent["image"])
    answer = httpx.post(
        f"{fake.url}/api/v3/images/generations",
        json=sent,
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert (answer.status_code, answer.json()) == (
        400,
        {"error": {"code": "InvalidParameter", "message": message, "type": "BadRequest"}},
    )


async def test_ark_serves_an_operators_model_id(fake: FakeUpstream) -> None:
    """An account's `models` replaces the defaults: what it names is what is sent."""
    engine = ark(fake, models={"seedream-4.0": "seedream-4-5-251128"})
    assert not engine.serves(CATALOGUE["seedream-5.0-lite"])
    await run(engine, request("seedream-4.0", width=2560, height=1440))
    (call,) = fake.calls("generations")
    assert call.body["model"] == "seedream-4-5-251128"


async def test_ark_sends_references_as_data_urls(fake: FakeUpstream) -> None:
    await run(ark(fake), request(references=(picture(),)))
    await run(ark(fake), request(references=(picture(), picture(120, 90))))
    one, two = fake.calls("generations")
    assert one.body["image"].startswith("data:image/jpeg;base64,")
    assert isinstance(two.body["image"], list)
    assert len(two.body["image"]) == 2


async def test_ark_inline_images_are_decoded(fake: FakeUpstream) -> None:
    images = await run(ark(fake, responseFormat="b64_json"), request(width=1664, height=936))
    assert fake.downloads == []
    assert [image.size for image in images] == [(1664, 936)]


async def test_ark_maps_catalogue_models_through_the_account_settings(
    fake: FakeUpstream,
) -> None:
    catalogue = default_catalogue()
    engine = ark(fake, models={"seedream-4.5": "seedream-4-5-251128"})
    assert [m.name for m in catalogue.models if engine.serves(m)] == ["seedream-4.5"]
    default = ark(fake)
    assert [m.name for m in catalogue.models if default.serves(m)] == [
        "seedream-5.0-lite",
        "seedream-4.5",
        "seedream-4.0",
        "seedream-3.0",
    ]


async def test_ark_seed_is_brought_into_the_range_the_api_takes(fake: FakeUpstream) -> None:
    await run(ark(fake), request(seed=2**40 + 5))
    (call,) = fake.calls("generations")
    assert 0 <= call.body["seed"] <= 2147483647


# -- the error mapping, shared by the three ---------------------------------------------------


async def test_a_refused_key_puts_the_account_in_error(fake: FakeUpstream) -> None:
    engine = ArkEngine({"apiKey": "sk-wrong", "baseUrl": fake.url}, CONTEXT)
    with pytest.raises(AccountError) as failure:
        await run(engine, request())
    assert failure.value.error == "Upstream refused the account's credentials"
    assert failure.value.details == "ark answered 401: Invalid API key"


async def test_a_forbidden_answer_puts_the_account_in_error_too(fake: FakeUpstream) -> None:
    fake.script.append(Scripted(403, {"error": {"code": 403, "message": "API key expired"}}))
    with pytest.raises(AccountError) as failure:
        await run(gemini(fake), request("nano-banana", width=1024, height=1024))
    assert failure.value.details == "gemini answered 403: API key expired"


async def test_a_content_refusal_fails_the_job_with_the_upstream_message(
    fake: FakeUpstream,
) -> None:
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake), request(prompt="something forbidden"))
    assert not isinstance(failure.value, AccountError | AccountTrouble)  # the job's own fault
    assert failure.value.error == "Upstream refused the request"
    assert failure.value.details == (
        "ark answered 400: The request failed because the input text may contain sensitive "
        "information."
    )


async def test_429_and_5xx_are_retried_honouring_retry_after(fake: FakeUpstream) -> None:
    fake.script.extend([Scripted(429, headers={"retry-after": "0"}), Scripted(503)])
    engine = ark(fake)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    engine.upstream.sleep = sleep
    images = await run(engine, request())
    assert len(fake.calls("generations")) == 3
    assert waits == [0.0, 2.0]  # Retry-After, then the backoff of a second retry
    assert len(images) == 1


async def test_retries_are_bounded(fake: FakeUpstream) -> None:
    fake.script.extend([Scripted(500)] * 5)
    engine = openai(fake, retries=2)
    engine.upstream.sleep = lambda seconds: asyncio.sleep(0)
    with pytest.raises(AccountTrouble) as failure:  # the account's: counts towards a cooldown
        await run(engine, request())
    assert failure.value.error == "Upstream unavailable"
    assert failure.value.details == "openai answered 500: fake openai error 500 after 3 tries"
    assert failure.value.cool_for is None  # the upstream asked for nothing
    assert len(fake.calls("generations")) == 3


async def test_a_retry_after_past_the_job_budget_fails_at_once(fake: FakeUpstream) -> None:
    fake.script.append(Scripted(429, headers={"retry-after": "120"}))
    started = time.monotonic()
    with pytest.raises(AccountTrouble) as failure:
        await run(ark(fake, budgetSeconds=30), request())
    assert time.monotonic() - started < 5
    assert failure.value.details == ("ark answered 429: fake ark error 429; the job's time ran out")
    assert failure.value.cool_for == 120  # the account cools for as long as the upstream asked


async def test_a_slow_upstream_fails_the_job_when_its_budget_is_spent(fake: FakeUpstream) -> None:
    fake.delay = 3
    started = time.monotonic()
    with pytest.raises(AccountTrouble) as failure:
        await run(gemini(fake, budgetSeconds=0.5), request("nano-banana", width=1024, height=1024))
    assert time.monotonic() - started < 2.5
    assert failure.value.error == "Upstream did not answer in time"
    assert failure.value.details == "gemini: no answer within the job's 0.5 s"


async def test_a_cancel_stops_a_call_in_flight(fake: FakeUpstream) -> None:
    fake.delay = 3
    cancel = CancelSignal()
    engine = openai(fake)
    started = time.monotonic()
    task = asyncio.ensure_future(engine.generate(request(), lambda f: None, cancel))
    await asyncio.sleep(0.3)
    cancel.set()
    with pytest.raises(Cancelled):
        await task
    await engine.close()
    assert time.monotonic() - started < 2


async def test_expired_links_fail_the_job_with_a_clear_error(fake: FakeUpstream) -> None:
    fake.links_expired = True
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake), request())
    assert failure.value.error == "Upstream image could not be downloaded (link expired?)"
    assert failure.value.details == "the image link answered 403"


async def test_a_private_upstream_is_refused_unless_allowed(fake: FakeUpstream) -> None:
    engine = ArkEngine({"apiKey": KEY, "baseUrl": fake.url}, EngineContext(EXECUTOR))
    with pytest.raises(JobFailed) as failure:
        await run(engine, request())
    assert failure.value.error == "Upstream address refused"
    assert failure.value.details == "127.0.0.1 does not resolve to a public address"
    assert fake.seen == []


async def test_an_answer_that_is_not_an_image_fails_the_job(fake: FakeUpstream) -> None:
    fake.script.append(Scripted(200, {"data": [{"b64_json": "aGVsbG8="}]}))
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake), request())
    assert failure.value.error == "Upstream returned an image that cannot be decoded"


async def test_an_api_redirect_is_not_followed_with_the_key(fake: FakeUpstream) -> None:
    """httpx would strip Authorization on a cross-origin redirect, not x-goog-api-key."""
    fake.script.append(Scripted(307, {}, {"location": f"{fake.url}/v1beta/models/x:collect"}))
    with pytest.raises(JobFailed) as failure:
        await run(gemini(fake), request("nano-banana", width=1024, height=1024))
    assert failure.value.details == "gemini answered 307"
    assert [call.path for call in fake.seen] == [
        "/v1beta/models/gemini-3-pro-image:generateContent"
    ]


async def test_output_links_are_followed_through_their_redirects(fake: FakeUpstream) -> None:
    fake.links_redirect = True
    images = await run(ark(fake), request())
    assert [seen.path.split("/")[1] for seen in fake.downloads] == ["redirect", "files"]
    assert [image.size for image in images] == [(2048, 2048)]


async def test_a_gemini_key_refused_with_a_400_puts_the_account_in_error(
    fake: FakeUpstream,
) -> None:
    engine = GeminiEngine({"apiKey": "AIza-wrong", "baseUrl": fake.url}, CONTEXT)
    with pytest.raises(AccountError) as failure:
        await run(engine, request("nano-banana", width=1024, height=1024))
    assert failure.value.details == (
        "gemini answered 400: API key not valid. Please pass a valid API key."
    )


async def test_the_api_key_never_appears_in_error_details(fake: FakeUpstream) -> None:
    echo = {"error": {"message": f"bad request for key {KEY} (echoed by a proxy)"}}
    fake.script.append(Scripted(400, echo))
    with pytest.raises(JobFailed) as failure:
        await run(openai(fake), request())
    assert (
        failure.value.details == "openai answered 400: bad request for key *** (echoed by a proxy)"
    )


async def test_only_the_images_asked_for_are_downloaded(fake: FakeUpstream) -> None:
    first = await run(ark(fake, responseFormat="url", sequentialModels=[]), request())
    assert len(first) == 1
    link = {"url": f"{fake.url}/files/none.png"}
    fake.script.append(Scripted(200, {"data": [first_link(fake)] + [link] * 40}))
    images = await run(ark(fake), request())
    assert len(images) == 1
    assert len(fake.downloads) == 2  # one per job


def first_link(fake: FakeUpstream) -> dict[str, str]:
    return {"url": f"{fake.url}{fake.downloads[0].path}"}


async def test_an_answer_larger_than_its_bound_fails_the_job(fake: FakeUpstream) -> None:
    fake.script.append(Scripted(200, {"data": [{"b64_json": "A" * (3 << 20)}]}))
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake, maxImageBytes=1024), request())
    assert failure.value.error == "Upstream answer is too large"


async def test_an_image_of_far_more_pixels_than_the_job_is_refused_before_decoding(
    fake: FakeUpstream,
) -> None:
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, "PNG")  # 25 MP in a small file
    data = base64.b64encode(buffer.getvalue()).decode()
    fake.script.append(Scripted(200, {"data": [{"b64_json": data}]}))
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake), request(width=1024, height=1024))
    assert (failure.value.error, failure.value.details) == (
        "Upstream image is too large",
        "5000x5000 pixels",
    )


@pytest.mark.parametrize("link", ["http://[::1/x.png", "file:///etc/passwd", "gopher://a/b"])
async def test_a_link_that_cannot_be_fetched_fails_the_job(fake: FakeUpstream, link: str) -> None:
    fake.script.append(Scripted(200, {"data": [{"url": link}]}))
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake), request())
    assert (failure.value.error, failure.value.details) == (
        "Upstream returned a link that cannot be fetched",
        "ark",
    )


async def test_json_nested_past_what_python_parses_is_not_json(fake: FakeUpstream) -> None:
    fake.script.append(Scripted(200, b"[" * 100_000))
    with pytest.raises(JobFailed) as failure:
        await run(ark(fake), request())
    assert failure.value.error == "Upstream answered with something that is not JSON"


async def test_a_private_host_is_refused_before_any_connection() -> None:
    """Refused by name before connecting, with one message whatever listens there: an
    answer must not tell a user's account which private ports are open."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.3)
        port = listener.getsockname()[1]
        for base in (f"http://localhost:{port}", f"http://localhost:{free_port()}"):
            engine = OpenAIEngine(
                {"apiKey": KEY, "baseUrl": base, "model": "m"}, EngineContext(EXECUTOR)
            )
            with pytest.raises(JobFailed) as failure:
                await run(engine, request())
            assert (failure.value.error, failure.value.details) == (
                "Upstream address refused",
                "localhost does not resolve to a public address",
            )
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["127.0.0.1", "93.184.216.34"]],  # loopback first: see the webhook test
    ids=["loopback", "loopback-and-public"],
)
async def test_a_name_resolving_to_a_private_address_is_never_connected_to(
    addresses: list[str],
) -> None:
    """The API's host is resolved once per connection and every address checked before it:
    refused without a SYN, with the same failure whether its port is open or closed."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.2)
        for port in (listener.getsockname()[1], free_port()):
            engine = OpenAIEngine(
                {"apiKey": KEY, "baseUrl": f"http://api.test:{port}", "model": "m", "retries": 0},
                EngineContext(EXECUTOR),
            )
            engine.upstream.resolver = fake_dns({"api.test": addresses})
            with pytest.raises(JobFailed) as failure:
                await run(engine, request())
            assert (failure.value.error, failure.value.details) == (
                "Upstream address refused",
                "api.test does not resolve to a public address",
            )
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever connected


async def test_an_allowed_upstream_is_reached_at_the_checked_address_by_its_name(
    fake: FakeUpstream,
) -> None:
    """Pinned: the connection goes to the address the resolver gave (no second lookup), and
    the request keeps the host's name in its Host header (and would in TLS)."""
    port = int(fake.url.rsplit(":", 1)[1])
    engine = ark(fake, baseUrl=f"http://upstream.test:{port}", retries=0)
    engine.upstream.resolver = fake_dns({"upstream.test": ["127.0.0.1"]})
    images = await run(engine, request())
    assert len(images) == 1
    [call] = fake.calls("/images/generations")
    assert call.headers["host"] == f"upstream.test:{port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_reference_is_made_to_fit_its_bound() -> None:
    noise = Image.effect_noise((1200, 1200), 90).convert("RGB")
    data = encode_reference(noise, max_bytes=150_000)
    assert len(data) <= 150_000
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "JPEG"


# -- gemini ------------------------------------------------------------------------------------


async def test_gemini_asks_for_the_nearest_aspect_ratio_once_per_image(
    fake: FakeUpstream,
) -> None:
    images = await run(gemini(fake), request("nano-banana", width=1344, height=768, count=3))
    calls = fake.calls(":generateContent")
    assert [call.path for call in calls] == [
        "/v1beta/models/gemini-3-pro-image:generateContent"
    ] * 3
    assert calls[0].headers["x-goog-api-key"] == KEY
    assert "authorization" not in calls[0].headers
    assert calls[0].body == {
        "contents": [{"parts": [{"text": "a lighthouse at dawn"}]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9", "imageSize": "1K"},
        },
    }
    assert [image.size for image in images] == [(1344, 768)] * 3


async def test_gemini_sends_references_as_inline_parts(fake: FakeUpstream) -> None:
    job = request("nano-banana", width=1024, height=1024, references=(picture(), picture()))
    await run(gemini(fake), job)
    (call,) = fake.calls(":generateContent")
    parts = call.body["contents"][0]["parts"]
    assert parts[0] == {"text": "a lighthouse at dawn"}
    assert [part["inline_data"]["mime_type"] for part in parts[1:]] == ["image/jpeg"] * 2


@pytest.mark.parametrize(
    ("upstream_model", "limit"),
    [("gemini-3-pro-image", 14), ("gemini-3.1-flash-image", 14), ("gemini-2.5-flash-image", 3)],
)
async def test_gemini_takes_the_references_its_upstream_model_takes_and_no_more(
    fake: FakeUpstream, upstream_model: str, limit: int
) -> None:
    fake.gemini_models["gemini-2.5-flash-image"] = GEMINI_2_5_FLASH  # as before its shutdown
    settings = {"models": {"nano-banana": upstream_model}}
    job = request("nano-banana", width=1024, height=1024, references=(picture(60, 40),) * limit)
    await run(gemini(fake, **settings), job)
    (call,) = fake.calls(":generateContent")
    assert len(call.body["contents"][0]["parts"]) == 1 + limit  # the fake took them all
    over = request("nano-banana", width=1024, height=1024, references=(picture(),) * (limit + 1))
    with pytest.raises(JobFailed) as failure:
        await run(gemini(fake, **settings), over)
    assert failure.value.error == "Too many reference images for this account"
    assert failure.value.details == f"gemini: {upstream_model} takes at most {limit}"
    assert len(fake.seen) == 1  # the job over the limit made no call


async def test_an_accounts_own_reference_cap_fails_the_job_before_any_call(
    fake: FakeUpstream,
) -> None:
    job = request("nano-banana", width=1024, height=1024, references=(picture(),) * 3)
    with pytest.raises(JobFailed) as failure:
        await run(gemini(fake, maxReferences=2), job)
    assert failure.value.error == "Too many reference images for this account"
    assert failure.value.details == "gemini: this account takes at most 2 (maxReferences)"
    assert fake.seen == []


NANO_BANANA = default_catalogue()["nano-banana"]


@pytest.mark.parametrize("ratio", NANO_BANANA.sizes["1k"])
async def test_gemini_serves_every_nano_banana_ratio_at_1k_and_the_catalogue_size(
    fake: FakeUpstream, ratio: str
) -> None:
    width, height = NANO_BANANA.size("1k", ratio)
    images = await run(gemini(fake), request("nano-banana", width=width, height=height))
    (call,) = fake.calls(":generateContent")
    assert call.path == "/v1beta/models/gemini-3-pro-image:generateContent"
    assert call.body["generationConfig"]["imageConfig"] == {"aspectRatio": ratio, "imageSize": "1K"}
    assert [part for part in call.body["contents"][0]["parts"] if "inline_data" in part] == []
    assert [image.size for image in images] == [(width, height)]


async def test_gemini_makes_count_calls_all_at_once_and_no_more(fake: FakeUpstream) -> None:
    fake.answering.clear()  # the fake holds every call until it is set
    job = asyncio.ensure_future(
        run(gemini(fake), request("nano-banana", width=1024, height=1024, count=3))
    )
    await eventually(lambda: len(fake.seen) == 3)  # three calls in flight, none answered
    assert not job.done()
    fake.answering.set()
    images = await job
    assert len(fake.calls(":generateContent")) == 3
    assert len(images) == 3


@pytest.mark.parametrize(
    ("sizes", "width", "height", "asked"),
    [
        (["1K", "2K", "4K"], 1344, 768, "1K"),
        (["1K", "2K", "4K"], 1536, 672, "1K"),
        (["1K", "2K", "4K"], 1024, 1024, "1K"),
        (["1K", "2K", "4K"], 1376, 768, "1K"),  # a little over 1024x1024 pixels
        (["1K", "2K", "4K"], 1600, 1000, "2K"),
        (["1K", "2K", "4K"], 2048, 2048, "2K"),
        (["1K", "2K", "4K"], 3024, 1296, "2K"),
        (["1K", "2K", "4K"], 4096, 4096, "4K"),
        (["1K", "2K", "4K"], 6197, 2656, "4K"),
        (["1K", "2K", "4K"], 8192, 8192, "4K"),  # past the largest: the largest
        (["512", "1K", "2K", "4K"], 512, 512, "512"),
        (["512", "1K", "2K", "4K"], 1024, 1024, "1K"),
        (["4K", "1K"], 1024, 1024, "1K"),  # listed in any order
        ([], 1024, 1024, None),
        (None, 1024, 1024, None),
    ],
)
def test_the_image_size_asked_is_the_smallest_that_holds_the_job(
    sizes: list[str] | None, width: int, height: int, asked: str | None
) -> None:
    assert image_size(sizes, width, height) == asked


async def test_gemini_asks_2k_for_a_2k_job_and_fits_the_answer(fake: FakeUpstream) -> None:
    images = await run(gemini(fake), request("nano-banana", width=2560, height=1440))
    (call,) = fake.calls(":generateContent")
    assert call.body["generationConfig"]["imageConfig"] == {
        "aspectRatio": "16:9",
        "imageSize": "2K",
    }
    assert [image.size for image in images] == [(2560, 1440)]  # from the fake's 2688x1536


async def test_an_operators_model_id_is_the_one_sent(fake: FakeUpstream) -> None:
    engine = gemini(fake, models={"nano-banana": "gemini-3.1-flash-image"})
    await run(engine, request("nano-banana", width=512, height=512))
    (call,) = fake.calls(":generateContent")
    assert call.path == "/v1beta/models/gemini-3.1-flash-image:generateContent"
    assert call.body["generationConfig"]["imageConfig"] == {
        "aspectRatio": "1:1",
        "imageSize": "512",
    }


async def test_only_3_1_flash_is_asked_for_its_extreme_ratios(fake: FakeUpstream) -> None:
    for model, ratio in (("gemini-3.1-flash-image", "4:1"), ("gemini-3-pro-image", "21:9")):
        engine = gemini(fake, models={"nano-banana": model})
        images = await run(engine, request("nano-banana", width=2048, height=512))
        assert fake.seen[-1].body["generationConfig"]["imageConfig"]["aspectRatio"] == ratio
        assert [image.size for image in images] == [(2048, 512)]


async def test_an_account_saved_with_the_old_settings_still_loads_and_sends_no_image_size(
    fake: FakeUpstream, registry: EngineRegistry
) -> None:
    old = {"apiKey": KEY, "maxReferences": 3, "models": {"nano-banana": "gemini-2.5-flash-image"}}
    plain, _ = registry.check_settings("gemini", old)
    assert plain == {"maxReferences": 3, "models": {"nano-banana": "gemini-2.5-flash-image"}}
    fake.gemini_models["gemini-2.5-flash-image"] = GEMINI_2_5_FLASH  # as before its shutdown
    await run(gemini(fake, **old), request("nano-banana", width=1344, height=768))
    (call,) = fake.calls(":generateContent")
    assert call.path == "/v1beta/models/gemini-2.5-flash-image:generateContent"
    assert call.body["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9"}


async def test_gemini_2_5_flash_image_is_answered_as_a_removed_model(fake: FakeUpstream) -> None:
    engine = gemini(fake, models={"nano-banana": "gemini-2.5-flash-image"})
    with pytest.raises(JobFailed) as failure:
        await run(engine, request("nano-banana", width=1024, height=1024))
    assert failure.value.error == "Upstream refused the request"
    assert failure.value.details == (
        "gemini answered 404: models/gemini-2.5-flash-image is not found for API version "
        "v1beta, or is not supported for generateContent."
    )


@pytest.mark.parametrize(
    ("served", "sizes", "message"),
    [
        ("gemini-3-pro-image", ["512"], "imageSize 512 not supported"),
        ("gemini-2.5-flash-image", ["1K"], "imageSize is not supported by this model"),
    ],
)
async def test_the_gemini_fake_refuses_an_image_size_its_model_does_not_take(
    fake: FakeUpstream, served: str, sizes: list[str], message: str
) -> None:
    """So that a wrong `imageSizes` default would fail the tests above."""
    fake.gemini_models["gemini-2.5-flash-image"] = GEMINI_2_5_FLASH
    engine = gemini(fake, models={"nano-banana": served}, imageSizes={served: sizes})
    with pytest.raises(JobFailed) as failure:
        await run(engine, request("nano-banana", width=512, height=512))
    assert failure.value.details == f"gemini answered 400: {message}"


async def test_a_blocked_gemini_prompt_fails_with_its_reason(fake: FakeUpstream) -> None:
    job = request("nano-banana", width=1024, height=1024, prompt="forbidden")
    with pytest.raises(JobFailed) as failure:
        await run(gemini(fake), job)
    assert failure.value.error == "Upstream refused the prompt"
    assert failure.value.details == "gemini: PROHIBITED_CONTENT"


async def test_a_gemini_answer_without_an_image_fails_with_its_text(fake: FakeUpstream) -> None:
    job = request("nano-banana", width=1024, height=1024, prompt="no picture please")
    with pytest.raises(JobFailed) as failure:
        await run(gemini(fake), job)
    assert failure.value.error == "Upstream returned no image"
    assert failure.value.details == "gemini: I cannot draw that."


async def test_gemini_finish_reasons_fail_the_job(fake: FakeUpstream) -> None:
    blocked = {"candidates": [{"finishReason": "IMAGE_PROHIBITED_CONTENT", "content": {}}]}
    fake.script.append(Scripted(200, blocked))
    with pytest.raises(JobFailed) as failure:
        await run(gemini(fake), request("nano-banana", width=1024, height=1024))
    assert failure.value.details == "gemini: IMAGE_PROHIBITED_CONTENT"


# -- openai ------------------------------------------------------------------------------------


async def test_openai_generates_count_images_in_one_call(fake: FakeUpstream) -> None:
    images = await run(openai(fake), request(count=4, width=1024, height=1024))
    (call,) = fake.calls("/v1/images/generations")
    assert call.headers["authorization"] == f"Bearer {KEY}"
    assert call.body == {
        "model": "gpt-image-2",
        "prompt": "a lighthouse at dawn",
        "n": 4,
        "size": "1024x1024",
    }
    assert [image.size for image in images] == [(1024, 1024)] * 4


async def test_openai_splits_count_by_the_images_one_call_may_make(fake: FakeUpstream) -> None:
    images = await run(openai(fake, maxImagesPerCall=1), request(count=3))
    assert [call.body["n"] for call in fake.calls("generations")] == [1, 1, 1]
    assert len(images) == 3


async def test_openai_asks_for_the_nearest_size_it_makes_and_fits_the_result(
    fake: FakeUpstream,
) -> None:
    sizes = ["1024x1024", "1536x1024", "1024x1536"]
    images = await run(openai(fake, sizes=sizes), request(width=2560, height=1440))
    (call,) = fake.calls("generations")
    assert call.body["size"] == "1536x1024"
    assert [image.size for image in images] == [(2560, 1440)]


async def test_openai_references_go_to_edits_as_multipart(fake: FakeUpstream) -> None:
    job = request(count=2, references=(picture(), picture(64, 64)))
    images = await run(openai(fake, responseFormat="url"), job)
    (call,) = fake.calls("/v1/images/edits")
    assert call.body["fields"] == {
        "model": "gpt-image-2",
        "prompt": "a lighthouse at dawn",
        "n": "2",
        "size": "2048x2048",
        "response_format": "url",
    }
    assert [image.size for image in call.body["images"]] == [(300, 200), (64, 64)]
    assert len(fake.downloads) == 2
    assert len(images) == 2


async def test_openai_content_refusal(fake: FakeUpstream) -> None:
    with pytest.raises(JobFailed) as failure:
        await run(openai(fake), request(prompt="forbidden"))
    assert failure.value.details == (
        "openai answered 400: Your request was rejected as a result of our safety system."
    )


@pytest.mark.parametrize(("model", "tier", "ratio", "width", "height"), every_size("gpt-image-2"))
async def test_openai_default_serves_gpt_image_2_at_every_catalogue_size(
    fake: FakeUpstream, model: str, tier: str, ratio: str, width: int, height: int
) -> None:
    engine = OpenAIEngine({"apiKey": KEY, "baseUrl": fake.url}, CONTEXT)
    assert [m.name for m in CATALOGUE.models if engine.serves(m)] == ["gpt-image-2"]
    images = await run(engine, request(model, width=width, height=height, count=2))
    (call,) = fake.calls("generations")
    assert call.body == {
        "model": "gpt-image-2",
        "prompt": "a lighthouse at dawn",
        "n": 2,
        "size": f"{width}x{height}",
    }
    assert [image.size for image in images] == [(width, height)] * 2


@pytest.mark.parametrize(
    ("width", "height", "asked"),
    [
        (4096, 4096, "2880x2880"),  # 4k 1:1: over 8,294,400 pixels
        (6197, 2656, "3840x1632"),  # 4k 21:9: over 3840 a side
        (4693, 3520, "3312x2480"),  # 4k 4:3
        (512, 512, "816x816"),  # under 655,360 pixels
        (1010, 1010, "1008x1008"),  # not multiples of 16
    ],
)
async def test_openai_sizes_outside_gpt_image_2_are_fitted_and_resampled(
    fake: FakeUpstream, width: int, height: int, asked: str
) -> None:
    """An operator serving seedream-4.0 through gpt-image-2: each size asked within its rule
    (multiples of 16, <= 3840 a side, 655,360-8,294,400 pixels), the result at the catalogue's."""
    fake.shrink = 16
    engine = openai(fake, models={"seedream-4.0": "gpt-image-2"}, model=None)
    images = await run(engine, request(width=width, height=height))
    (call,) = fake.calls("generations")
    assert call.body["size"] == asked
    assert [image.size for image in images] == [(width, height)]


async def test_openai_a_ratio_over_3_to_1_fails_before_any_call(fake: FakeUpstream) -> None:
    with pytest.raises(JobFailed) as failure:
        await run(openai(fake), request(width=4096, height=1024))
    assert (failure.value.error, failure.value.details) == (
        "Size not possible on openai model gpt-image-2",
        "4096x1024: long:short is over 3:1 (maxRatio)",
    )
    assert fake.seen == []


async def test_the_openai_fake_refuses_a_size_gpt_image_2_does_not_make(
    fake: FakeUpstream,
) -> None:
    with pytest.raises(JobFailed) as failure:
        await run(openai(fake, sizeLimits={}), request(width=1000, height=1000))
    assert failure.value.details == (
        "openai answered 400: Invalid size '1000x1000'. Both edges must be multiples of 16."
    )


@pytest.mark.parametrize("removed", ["gpt-image-1", "gpt-image-1.5"])
async def test_a_shut_down_openai_model_fails_with_openais_answer(
    fake: FakeUpstream, removed: str
) -> None:
    """An account saved with a model OpenAI has since shut down still loads; its jobs fail
    with OpenAI's 404 (the job's fault, not the account's)."""
    with pytest.raises(JobFailed) as failure:
        await run(openai(fake, model=removed), request(width=1024, height=1024))
    assert not isinstance(failure.value, AccountError | AccountTrouble)
    assert failure.value.details == (
        f"openai answered 404: The model `{removed}` does not exist or you do not have "
        "access to it."
    )


async def test_openai_settings_of_the_first_shape_still_work(fake: FakeUpstream) -> None:
    """Accounts saved before the map: `model` for every catalogue model `models` lists, or for
    all of them when it is absent."""
    listed = OpenAIEngine(
        {"apiKey": KEY, "baseUrl": fake.url, "model": "local-sd", "models": ["seedream-4.0"]},
        CONTEXT,
    )
    assert [m.name for m in CATALOGUE.models if listed.serves(m)] == ["seedream-4.0"]
    everything = OpenAIEngine({"apiKey": KEY, "baseUrl": fake.url, "model": "local-sd"}, CONTEXT)
    assert all(everything.serves(m) for m in CATALOGUE.models)
    fake.shrink = 16
    await run(listed, request(width=6197, height=2656))
    (call,) = fake.calls("generations")
    assert (call.body["model"], call.body["size"]) == ("local-sd", "6197x2656")  # no limits
    assert everything.describe() == {"kind": "openai", "baseUrl": fake.url, "model": "local-sd"}
    await everything.close()


async def test_openai_serves_an_operators_model_map(fake: FakeUpstream) -> None:
    engine = openai(
        fake,
        model=None,
        models={"gpt-image-2": "gpt-image-2-2026-04-21", "seedream-4.0": "local-sd"},
    )
    assert [m.name for m in CATALOGUE.models if engine.serves(m)] == [
        "seedream-4.0",
        "gpt-image-2",
    ]
    await run(engine, request("gpt-image-2", width=1024, height=1536))
    await run(engine, request("seedream-4.0", width=2048, height=2048))
    assert [call.body["model"] for call in fake.calls("generations")] == [
        "gpt-image-2-2026-04-21",
        "local-sd",
    ]


# -- settings ----------------------------------------------------------------------------------


@pytest.fixture
def registry() -> EngineRegistry:
    return EngineRegistry(CONTEXT, SecretBox(os.urandom(32)))


@pytest.mark.parametrize("engine", ["ark", "gemini", "openai"])
def test_the_api_key_is_required_and_sealed(registry: EngineRegistry, engine: str) -> None:
    with pytest.raises(BadRequest) as missing:
        registry.check_settings(engine, {"model": "m"} if engine == "openai" else {})
    assert missing.value.message == "Parameter settings.apiKey is required"
    extra = {"model": "m"} if engine == "openai" else {}
    plain, sealed = registry.check_settings(engine, {"apiKey": "sk-secret", **extra})
    assert "apiKey" not in plain
    assert sealed is not None
    assert "sk-secret" not in sealed


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com", "must be an http or https URL with a host"),
        ("https://", "must be an http or https URL with a host"),
        ("https://example.com/?a=1", "must not have a query or a fragment"),
    ],
)
def test_a_bad_base_url_is_a_400(registry: EngineRegistry, url: str, message: str) -> None:
    with pytest.raises(BadRequest) as bad:
        registry.check_settings("ark", {"apiKey": "k", "baseUrl": url})
    assert bad.value.message == f"Parameter settings.baseUrl is invalid: Value error, {message}"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"models": ["seedream-4.0"]},
            "Parameter settings.models is invalid: Value error, a list of catalogue models "
            "needs model (the upstream model)",
        ),
        (
            {"model": "gpt-image-2", "models": {"gpt-image-2": "gpt-image-2"}},
            "Parameter settings.models is invalid: Value error, a map of catalogue model to "
            "upstream model takes no model",
        ),
        (
            {"models": {}},
            "Parameter settings.models is invalid: Value error, a map needs at least one "
            "catalogue model and its upstream model",
        ),
    ],
)
def test_openai_models_are_a_map_or_a_list_with_its_upstream_model(
    registry: EngineRegistry, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequest) as bad:
        registry.check_settings("openai", {"apiKey": "k", **settings})
    assert bad.value.message == message


def test_gemini_aspect_ratios_must_be_w_colon_h(registry: EngineRegistry) -> None:
    for ratio in ("16/9", "1:0"):
        with pytest.raises(BadRequest) as bad:
            registry.check_settings("gemini", {"apiKey": "k", "aspectRatios": [ratio]})
        assert bad.value.message == (
            f"Parameter settings.aspectRatios is invalid: Value error, {ratio!r} is not W:H "
            "with whole numbers above 0"
        )


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"gemini-3-pro-image": ["8K"]}, "'8K' is not one of 512, 1K, 2K, 4K"),
        ({"gemini-3-pro-image": []}, "a model's list needs a size (leave the model out for none)"),
    ],
)
def test_gemini_image_sizes_are_the_ones_gemini_names(
    registry: EngineRegistry, sizes: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(BadRequest) as bad:
        registry.check_settings("gemini", {"apiKey": "k", "imageSizes": sizes})
    assert bad.value.message == f"Parameter settings.imageSizes is invalid: Value error, {message}"


def test_a_base_url_may_not_carry_credentials(registry: EngineRegistry) -> None:
    with pytest.raises(BadRequest) as bad:
        registry.check_settings("ark", {"apiKey": "k", "baseUrl": "https://u:p@example.com"})
    assert bad.value.message == (
        "Parameter settings.baseUrl is invalid: Value error, must not carry credentials "
        "(the key goes in apiKey)"
    )


def test_openai_sizes_must_be_width_x_height(registry: EngineRegistry) -> None:
    with pytest.raises(BadRequest) as bad:
        registry.check_settings("openai", {"apiKey": "k", "model": "m", "sizes": ["big"]})
    assert bad.value.message == (
        "Parameter settings.sizes is invalid: Value error, 'big' is not WIDTHxHEIGHT"
    )


# -- the cancel plumbing -----------------------------------------------------------------------


async def test_work_that_fails_after_a_cancel_leaves_no_unretrieved_exception() -> None:
    """A call that fails as it is cancelled (a sibling image's call failed first, or the job
    was cancelled) must not leave 'Task exception was never retrieved' behind: the server's
    loop reported it as an error of its own."""
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: reported.append(context))

    async def work() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ValueError("failed while being cancelled") from None

    cancel = CancelSignal()
    running = asyncio.ensure_future(until_cancelled(work(), cancel))
    await asyncio.sleep(0.05)
    cancel.set()
    with pytest.raises(Cancelled):
        await running
    del running
    gc.collect()
    await asyncio.sleep(0)
    loop.set_exception_handler(None)
    assert reported == []


@pytest.mark.parametrize("zone", ["GMT", "-0000"])
async def test_a_retry_after_date_is_read_as_utc(
    fake: FakeUpstream, zone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP date in Retry-After; "-0000" (no zone given) is UTC too, never local time."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # a local time 9 hours off UTC
    time.tzset()
    moment = datetime.fromtimestamp(time.time() + 20, UTC)
    if zone == "GMT":
        when = email.utils.format_datetime(moment, usegmt=True)
    else:
        when = email.utils.format_datetime(moment.replace(tzinfo=None))
    assert when.endswith(zone)
    fake.script.append(Scripted(429, headers={"retry-after": when}))
    engine = ark(fake)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    engine.upstream.sleep = sleep
    try:
        await run(engine, request())
    finally:
        monkeypatch.undo()
        time.tzset()
    assert len(waits) == 1
    assert 17 <= waits[0] <= 20
