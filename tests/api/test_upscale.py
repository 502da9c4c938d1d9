"""POST /images/upscale: validation and messages, the job it makes, and the image it produces."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support import SMALL, CancellableEngine, Harness, open_harness, wait_started

from dreamserve.engines.base import EngineContext
from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.engines.registry import BUILTIN
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

SQUARE = {"prompt": "upscale me", "model": "seedream-3.0", "ratio": "1:1", "count": 2}


async def completed(harness: Harness, body: dict[str, Any] = SQUARE) -> dict[str, Any]:
    return await harness.wait((await harness.post(body)).json()["jobid"])


async def upscale(harness: Harness, body: dict[str, Any], token: str | None = None) -> Any:
    return await harness.call("POST", "/images/upscale", body, token)


async def download(harness: Harness, url: str) -> Image.Image:
    image = Image.open(io.BytesIO((await harness.client.get(url)).content))
    image.load()
    return image


@pytest.mark.both_databases
async def test_an_upscale_job_runs_on_the_source_account_at_the_tier_size(
    harness: Harness,
) -> None:
    source = await completed(harness)
    reply = await upscale(harness, {"jobid": source["jobid"], "imageIndex": 1})
    assert reply.status_code == 200
    record = reply.json()
    assert re.fullmatch(r"j\d{19}I-u1-LOCAL:procedural-bot:dreamina", record["jobid"]), record[
        "jobid"
    ]
    assert (record["type"], record["status"], record["model"]) == (
        "upscale",
        "created",
        "seedream-3.0",
    )
    assert record["request"] == {"jobid": source["jobid"], "imageIndex": 1, "resolution": "4k"}
    done = await harness.wait(record["jobid"])
    assert done["status"] == "completed"
    [image] = done["response"]["images"]
    assert (image["width"], image["height"], image["format"]) == (4096, 4096, "jpeg")
    assert "seed" not in image  # an upscale has none
    assert "seed" in source["response"]["images"][1]
    listed = (await harness.call("GET", "/assets/LOCAL:procedural?count=1")).json()["assets"]
    assert (listed[0]["itemId"], listed[0]["description"]) == (image["itemId"], "upscale me")
    assert (await download(harness, image["imageUrl"])).size == (4096, 4096)


@pytest.mark.parametrize(
    ("ratio", "tier", "size"),
    [("16:9", "2k", (2560, 1440)), ("21:9", "4k", (6197, 2656)), ("3:4", "8k", (7040, 9386))],
)
async def test_the_target_is_the_tier_size_of_the_source_ratio(
    harness: Harness, ratio: str, tier: str, size: tuple[int, int]
) -> None:
    source = await completed(harness, {**SMALL, "ratio": ratio})  # nano-banana's own sizes
    body = {"jobid": source["jobid"], "upscaleResolution": tier}
    done = await harness.wait((await upscale(harness, body)).json()["jobid"])
    image = done["response"]["images"][0]
    assert (image["width"], image["height"]) == size


async def test_detail_sharpens_and_original_strength_blends_in_a_plain_resample(
    harness: Harness,
) -> None:
    # A fixed seed: the procedural composition is smooth, and how much an unsharp mask adds
    # depends on the picture (1.04 to 1.19 times the contrast over seeds 0-23; 1.19 on seed 23).
    source = await completed(harness, {**SMALL, "count": 1, "seed": 23})

    async def result(detail: float, original: float) -> Any:
        body = {
            "jobid": source["jobid"],
            "upscaleResolution": "2k",
            "detailStrength": detail,
            "originalImageStrength": original,
        }
        done = await harness.wait((await upscale(harness, body)).json()["jobid"])
        image = await download(harness, done["response"]["images"][0]["imageUrl"])
        return np.asarray(image.convert("L"), dtype=np.float32)

    def contrast(pixels: Any) -> float:
        return float(np.abs(np.diff(pixels, axis=1)).mean())

    soft, sharp = await result(0.0, 0.0), await result(1.0, 0.0)
    assert contrast(sharp) > contrast(soft) * 1.1  # detail sharpens
    plain, plain_too = await result(0.0, 1.0), await result(1.0, 1.0)
    assert np.abs(plain - plain_too).mean() < 1.0  # all original: the detail is blended away
    assert np.abs(plain - soft).mean() > 0.05  # the plain resample is another filter


async def test_an_upscaled_image_is_usable_as_a_reference(harness: Harness) -> None:
    source = await completed(harness, {**SMALL, "count": 1})
    body = {"jobid": source["jobid"], "upscaleResolution": "2k"}
    done = await harness.wait((await upscale(harness, body)).json()["jobid"])
    ref = done["response"]["images"][0]["assetRef"]
    reply = await harness.post({"model": "seedream-4.0", "imageRef_1": ref, "count": 1})
    assert reply.status_code == 200, reply.text
    assert (await harness.wait(reply.json()["jobid"]))["status"] == "completed"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "Parameter jobid is required"),
        ({"jobid": ""}, "Parameter jobid is required"),
        ({"jobid": 12}, "Parameter jobid (12) valid values: the jobid of a completed image job"),
        ({"imageIndex": 4}, "Parameter imageIndex (4) valid values: integer 0-3"),
        (
            {"upscaleResolution": "16k"},
            "Parameter upscaleResolution (16k) valid values: 2k, 4k, 8k",
        ),
        (
            {"originalImageStrength": 2},
            "Parameter originalImageStrength (2) valid values: number 0-1",
        ),
        ({"detailStrength": -0.1}, "Parameter detailStrength (-0.1) valid values: number 0-1"),
    ],
)
async def test_bad_upscale_requests_are_400(
    harness: Harness, body: dict[str, Any], message: str
) -> None:
    fields = {"jobid": "j1125120000000000001i-u1-LOCAL:procedural-bot:dreamina", **body}
    if body == {}:
        fields = {}
    reply = await upscale(harness, fields)
    assert (reply.status_code, reply.json()) == (400, {"error": message})


async def test_an_image_index_beyond_the_source_images_is_400(harness: Harness) -> None:
    source = await completed(harness)  # two images
    reply = await upscale(harness, {"jobid": source["jobid"], "imageIndex": 2})
    assert (reply.status_code, reply.json()) == (
        400,
        {
            "error": f"Parameter imageIndex (2) valid values: integer 0-1, the images of job "
            f"{source['jobid']}"
        },
    )


async def test_an_unknown_or_foreign_source_is_404(harness: Harness) -> None:
    source = await completed(harness)
    other = await harness.new_user()
    for jobid, token in ((source["jobid"], other), ("nothing-like-a-job", None)):
        reply = await upscale(harness, {"jobid": jobid}, token)
        assert (reply.status_code, reply.json()) == (
            404,
            {"error": "Source image job not found"},
        )


async def test_an_upscale_job_is_no_source(harness: Harness) -> None:
    source = await completed(harness)
    first = await harness.wait((await upscale(harness, {"jobid": source["jobid"]})).json()["jobid"])
    reply = await upscale(harness, {"jobid": first["jobid"]})
    assert (reply.status_code, reply.json()) == (404, {"error": "Source image job not found"})


async def test_a_source_not_completed_is_400(settings: Settings) -> None:
    engine = CancellableEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        await wait_started(engine, 1)
        reply = await upscale(harness, {"jobid": jobid})
        assert (reply.status_code, reply.json()) == (
            400,
            {"error": "Source image job is created, must be completed"},
        )
        await harness.call("DELETE", f"/scheduler/{jobid}")
        reply = await upscale(harness, {"jobid": jobid})
        assert reply.json() == {"error": "Source image job is failed, must be completed"}


async def test_an_upscale_takes_a_slot_of_the_source_account(harness: Harness) -> None:
    source = await completed(harness)
    body = {"jobid": source["jobid"], "maxJobs": 1, "upscaleResolution": "4k"}
    first = await upscale(harness, body)
    assert first.status_code == 200
    second = await upscale(harness, body)
    assert (second.status_code, second.json()) == (
        429,
        {"error": "Account LOCAL:procedural at capacity"},
    )
    assert second.headers["Retry-After"] == "5"
    await harness.wait(first.json()["jobid"])


async def test_a_target_over_the_pixel_limit_is_400(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_image_pixels": 20_000_000})
    async with open_harness(limited) as harness:
        source = await completed(harness, {**SMALL, "count": 1})
        reply = await upscale(harness, {"jobid": source["jobid"], "upscaleResolution": "8k"})
        assert (reply.status_code, reply.json()) == (
            400,
            {
                "error": "Parameter upscaleResolution (8k) valid values: 2k, 4k (8k is "
                "8192x8192, over the limit of 20000000 pixels)"
            },
        )


async def test_an_image_deleted_from_the_source_is_400(harness: Harness) -> None:
    source = await completed(harness)  # two images
    first = source["response"]["images"][0]
    assert (await harness.call("DELETE", f"/assets/{first['assetId']}")).status_code == 200
    listed = (await harness.get(source["jobid"])).json()["response"]["images"]
    assert listed == source["response"]["images"]  # imageIndex keeps its meaning
    assert (await harness.client.get(first["imageUrl"])).status_code == 404
    reply = await upscale(harness, {"jobid": source["jobid"], "imageIndex": 0})
    assert (reply.status_code, reply.json()) == (
        400,
        {
            "error": f"Parameter imageIndex (0) valid values: an image of job {source['jobid']} "
            "that was not deleted"
        },
    )


async def test_the_echo_holds_the_jobid_decoded(harness: Harness) -> None:
    source = await completed(harness, {**SMALL, "count": 1})
    encoded = source["jobid"].replace(":", "%3A")
    reply = await upscale(harness, {"jobid": encoded, "upscaleResolution": "2k"})
    assert reply.json()["request"]["jobid"] == source["jobid"]
    await harness.wait(reply.json()["jobid"])


class GenerateOnly:
    """An engine without `upscale`: the procedural engine's generation alone."""

    def __init__(self, settings: Any, context: EngineContext) -> None:
        self.inner = ProceduralEngine(settings, context)

    def serves(self, model: Any) -> bool:
        return True

    async def generate(self, request: Any, progress: Any, cancel: Any) -> list[Image.Image]:
        return await self.inner.generate(request, progress, cancel)

    async def close(self) -> None:
        return None


async def test_an_account_whose_engine_cannot_upscale_is_400(settings: Settings) -> None:
    async with open_harness(settings, engines={**BUILTIN, "plain": GenerateOnly}) as harness:
        await harness.put_account({"account": "LOCAL:plain", "engine": "plain"})
        source = await completed(harness, {**SMALL, "account": "LOCAL:plain"})
        reply = await upscale(harness, {"jobid": source["jobid"]})
        assert (reply.status_code, reply.json()) == (
            400,
            {"error": "Account LOCAL:plain cannot upscale: engine plain does not"},
        )
        assert await harness.slots() == {"LOCAL:procedural": 0, "LOCAL:plain": 0}
