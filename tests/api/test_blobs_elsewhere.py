"""A server whose blob store is not its disk (`memory://`, or an S3 bucket) serves its images
through the same signed links as one on files (tests/api/test_files.py), and keeps nothing on
the disk; with presigned links, clients fetch the images from the bucket itself."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import ExitStack

import httpx
import pytest
from objectstore import moto_store, new_bucket, store_environment
from PIL import Image
from support import SMALL, Harness, open_harness

from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "s3"])
async def harness(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Harness]:
    url = "memory://"
    if request.param == "s3":
        url = f"s3://{new_bucket(request.getfixturevalue('s3'))}/dreamserve"
    async with open_harness(settings.model_copy(update={"blob_url": url})) as opened:
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


async def test_presigned_links_fetch_images_from_the_bucket(settings: Settings, s3: str) -> None:
    url = f"s3://{new_bucket(s3)}/dreamserve"
    presigned = settings.model_copy(update={"blob_url": url, "blob_links": "presigned"})
    async with open_harness(presigned) as harness, httpx.AsyncClient() as client:
        image = await first_image(harness)
        assert image["imageUrl"].startswith(f"{s3}/")
        reply = await client.get(image["imageUrl"])  # from the store, not the API
        assert reply.status_code == 200
        assert reply.content == await harness.server.blobs.get(image["imageUri"])
        decoded = Image.open(io.BytesIO(reply.content))
        assert (decoded.format, decoded.size) == ("JPEG", (1024, 1024))
        link = f"/v1/dreamina/files/{image['imageUri']}?expires=1&signature=x"
        served = await harness.client.get(link)  # the API serves no file of its own
        assert (served.status_code, served.json()) == (404, {"error": "Not Found"})


async def test_a_job_whose_store_is_down_fails_saying_so(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An object store that stops answering: the job ends failed with a message a user can act
    on after the store's bounded retries, the log says why, and its slot is free."""
    with ExitStack() as store:
        endpoint = store.enter_context(moto_store())
        for name, value in store_environment(endpoint).items():
            monkeypatch.setenv(name, value)
        url = f"s3://{new_bucket(endpoint)}/dreamserve"
        async with open_harness(settings.model_copy(update={"blob_url": url})) as harness:
            await first_image(harness)  # the store works
            store.close()  # and now it is gone
            record = await harness.wait((await harness.post(SMALL)).json()["jobid"])
            assert (record["status"], record["error"], record["errorDetails"]) == (
                "failed",
                "Storage unavailable",
                "the server's image store cannot be reached; try again later",
            )
            assert await harness.slots() == {"LOCAL:procedural": 0}
    logged = [r.getMessage() for r in caplog.records if r.name == "dreamserve.worker"]
    assert any("its images cannot be stored: object store: cannot store" in m for m in logged)
