"""Image files behind signed, expiring links: no token, right headers, 403 when tampered."""

from __future__ import annotations

import io
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image
from support import SMALL, FakeClock, Harness, open_harness

from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

FORMATS = {
    "jpeg": ("image/jpeg", "JPEG"),
    "png": ("image/png", "PNG"),
    "webp": ("image/webp", "WEBP"),
}


async def first_image(harness: Harness) -> dict:
    record = await harness.wait((await harness.post(SMALL)).json()["jobid"])
    return record["response"]["images"][0]


@pytest.mark.parametrize("image_format", ["jpeg", "png", "webp"])
async def test_images_download_without_a_token_in_the_configured_format(
    settings: Settings, image_format: str
) -> None:
    configured = settings.model_copy(update={"image_format": image_format})
    async with open_harness(configured) as harness:
        image = await first_image(harness)
        reply = await harness.client.get(image["imageUrl"])  # no Authorization header
    content_type, pillow_format = FORMATS[image_format]
    assert reply.status_code == 200
    assert reply.headers["content-type"] == content_type
    assert int(reply.headers["content-length"]) == len(reply.content)
    assert image["format"] == image_format
    assert f":s{len(reply.content)}-uri:" in image["assetRef"]
    decoded = Image.open(io.BytesIO(reply.content))
    decoded.load()
    assert (decoded.format, decoded.size) == (pillow_format, (1024, 1024))


@pytest.mark.parametrize(
    ("setting", "smaller", "larger"),
    [("jpeg_quality", 30, 95), ("png_compress_level", 9, 0), ("webp_quality", 10, 95)],
)
async def test_the_encoding_settings_shape_the_stored_files(
    settings: Settings, setting: str, smaller: int, larger: int
) -> None:
    """The same picture (same seed) stored at each end of a setting: the files differ in size
    and both decode to the picture's size."""
    image_format = setting.partition("_")[0]
    files = []
    for value in (smaller, larger):
        configured = settings.model_copy(update={"image_format": image_format, setting: value})
        async with open_harness(configured) as harness:
            record = await harness.wait((await harness.post({**SMALL, "seed": 7})).json()["jobid"])
            reply = await harness.client.get(record["response"]["images"][0]["imageUrl"])
        assert reply.headers["content-type"] == FORMATS[image_format][0]
        decoded = Image.open(io.BytesIO(reply.content))
        decoded.load()
        assert decoded.size == (1024, 1024)
        files.append(reply.content)
    assert len(files[0]) < len(files[1])


async def test_head_gives_the_headers_without_the_body(harness: Harness) -> None:
    image = await first_image(harness)
    full = await harness.client.get(image["imageUrl"])
    head = await harness.client.head(image["imageUrl"])
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == full.headers["content-length"]
    assert head.headers["content-type"] == "image/jpeg"


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {key: values[0] for key, values in parse_qs(parts.query).items()} | changes
    return parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()


async def test_a_tampered_link_is_403(harness: Harness) -> None:
    url = (await first_image(harness))["imageUrl"]
    expires = parse_qs(urlsplit(url).query)["expires"][0]
    other = (await first_image(harness))["imageUri"]
    parts = urlsplit(url)
    for bad in (
        with_query(url, signature="A" * 43),
        with_query(url, expires=str(int(expires) + 3600)),
        with_query(url, expires="soon"),
        parts._replace(path=f"/v1/dreamina/files/{other}").geturl(),  # another file, same query
        url.split("?")[0],
    ):
        reply = await harness.client.get(bad)
        assert reply.status_code == 403, bad
        assert reply.json() == {"error": "Invalid link signature"}


async def test_an_expired_link_is_403(settings: Settings) -> None:
    clock = FakeClock()
    async with open_harness(settings, clock=clock) as harness:
        url = (await first_image(harness))["imageUrl"]
        ttl = settings.link_ttl_seconds
        clock.advance(ttl - 5)
        assert (await harness.client.get(url)).status_code == 200  # lives at least the ttl
        clock.advance(ttl / 8 + 10)  # and at most 9/8 of it
        reply = await harness.client.get(url)
        assert reply.status_code == 403
        assert reply.json() == {"error": "Link expired"}


async def test_a_later_get_hands_out_a_fresh_link(settings: Settings) -> None:
    clock = FakeClock()
    async with open_harness(settings, clock=clock) as harness:
        jobid = (await harness.post(SMALL)).json()["jobid"]
        old = (await harness.wait(jobid))["response"]["images"][0]["imageUrl"]
        clock.advance(settings.link_ttl_seconds * 2)
        assert (await harness.client.get(old)).status_code == 403
        new = (await harness.get(jobid)).json()["response"]["images"][0]["imageUrl"]
        assert new != old
        assert (await harness.client.get(new)).status_code == 200


async def test_a_valid_link_to_a_missing_file_is_404(harness: Harness) -> None:
    image = await first_image(harness)
    (harness.server.blobs.root / image["imageUri"]).unlink()  # type: ignore[attr-defined]
    reply = await harness.client.get(image["imageUrl"])
    assert reply.status_code == 404
    assert reply.json() == {"error": "File not found"}


async def test_a_signed_key_that_leaves_the_store_is_404(harness: Harness) -> None:
    """Even a correctly signed link cannot reach outside the blob directory."""
    signer = harness.server.blobs.signer  # type: ignore[attr-defined]
    key = "../secret.key"
    expires = 4_000_000_000
    query = f"expires={expires}&signature={signer.sign(key, expires)}"
    url = f"/v1/dreamina/files/%2E%2E/secret.key?{query}"
    reply = await harness.client.get(url)
    assert reply.status_code == 404
    assert reply.json() == {"error": "File not found"}


@pytest.mark.parametrize(
    ("expires", "signature"),
    [("²", "x" * 43), ("9" * 4400, "x" * 43), ("4000000000", "é" * 43), ("-1", "x"), ("", "")],
)
async def test_malformed_link_parameters_are_403(
    harness: Harness, expires: str, signature: str
) -> None:
    image = await first_image(harness)
    url = f"/v1/dreamina/files/{image['imageUri']}"
    reply = await harness.client.get(url, params={"expires": expires, "signature": signature})
    assert reply.status_code == 403
    assert reply.json() == {"error": "Invalid link signature"}


INVALID_RANGE = (
    "Header Range ({}) valid values: bytes=<first>-<last>, bytes=<first>- or bytes=-<length>, "
    "with first <= last"
)


async def test_a_valid_range_is_206_with_those_bytes(harness: Harness) -> None:
    url = (await first_image(harness))["imageUrl"]
    whole = (await harness.client.get(url)).content
    size = len(whole)
    for header, first, last in (("bytes=0-9", 0, 9), ("bytes=-5", size - 5, size - 1)):
        reply = await harness.client.get(url, headers={"Range": header})
        assert reply.status_code == 206, header
        assert reply.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert reply.content == whole[first : last + 1]


@pytest.mark.parametrize("header", ["bytes=abc", "bytes=5-2", "items=0-5", "bytes", "bytes=-"])
async def test_a_malformed_range_is_400_json(harness: Harness, header: str) -> None:
    reply = await harness.client.get(
        (await first_image(harness))["imageUrl"], headers={"Range": header}
    )
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"error": INVALID_RANGE.format(header)}


async def test_a_range_past_the_end_is_416_json_with_the_size(harness: Harness) -> None:
    url = (await first_image(harness))["imageUrl"]
    size = len((await harness.client.get(url)).content)
    reply = await harness.client.get(url, headers={"Range": "bytes=999999999-"})
    assert reply.status_code == 416
    assert reply.headers["content-range"] == f"bytes */{size}"
    assert reply.json() == {
        "error": f"Header Range (bytes=999999999-) not satisfiable: the file has {size} bytes"
    }
