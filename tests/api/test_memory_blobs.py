"""A server whose blob store is `memory://` serves its images through the same signed links as
one on files (tests/api/test_files.py), and keeps nothing on the disk."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from PIL import Image
from support import SMALL, Harness, open_harness

from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    async with open_harness(settings.model_copy(update={"blob_url": "memory://"})) as opened:
        yield opened


async def first_image(harness: Harness) -> dict:
    record = await harness.wait((await harness.post(SMALL)).json()["jobid"])
    return record["response"]["images"][0]


async def test_a_generated_image_downloads_through_its_link(
    harness: Harness, settings: Settings
) -> None:
    image = await first_image(harness)
    reply = await harness.client.get(image["imageUrl"])  # no Authorization header
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "image/jpeg"
    assert reply.headers["cache-control"] == "private, max-age=3600"
    assert int(reply.headers["content-length"]) == len(reply.content)
    assert reply.content == await harness.server.blobs.get(image["imageUri"])
    decoded = Image.open(io.BytesIO(reply.content))
    assert (decoded.format, decoded.size) == ("JPEG", (1024, 1024))
    assert not (settings.data_dir / "blobs").exists()


async def test_head_gives_the_headers_without_the_body(harness: Harness) -> None:
    image = await first_image(harness)
    full = await harness.client.get(image["imageUrl"])
    head = await harness.client.head(image["imageUrl"])
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == full.headers["content-length"]
    assert head.headers["content-type"] == "image/jpeg"
    assert head.headers["cache-control"] == "private, max-age=3600"


async def test_a_tampered_link_is_403_and_a_missing_blob_404(harness: Harness) -> None:
    image = await first_image(harness)
    tampered = await harness.client.get(image["imageUrl"].replace("signature=", "signature=A"))
    assert tampered.status_code == 403
    assert tampered.json() == {"error": "Invalid link signature"}
    await harness.server.blobs.delete(image["imageUri"])
    missing = await harness.client.get(image["imageUrl"])
    assert missing.status_code == 404
    assert missing.json() == {"error": "File not found"}


async def test_an_upload_is_stored_and_read_back_as_a_reference(harness: Harness) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (320, 180), (200, 40, 90)).save(buffer, "PNG")
    uploaded = await harness.client.post(
        "/v1/dreamina/assets/LOCAL:procedural",
        content=buffer.getvalue(),
        headers={**harness.auth, "Content-Type": "image/png"},
    )
    assert uploaded.status_code == 200, uploaded.text
    reply = await harness.post({**SMALL, "imageRef_1": uploaded.json()["assetRef"]})
    assert reply.status_code == 200, reply.text
    record = await harness.wait(reply.json()["jobid"])
    assert record["status"] == "completed", record
