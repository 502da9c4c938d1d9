"""Assets: uploads (checked before anything is stored), the generated-image list, deletion, and
uploads as references."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Connection, func, select
from support import SMALL, Harness, open_harness, post_scope

from dreamserve.settings import Settings
from dreamserve.storage.tables import assets

pytestmark = pytest.mark.anyio

ACCOUNT = "LOCAL:procedural"
UNSUPPORTED = "Content-Type ({}) not supported. Valid values: image/jpeg, image/png, image/webp"


def picture(width: int, height: int, image_format: str = "PNG") -> bytes:
    """A real, non-flat picture: gradients in each channel."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, np.newaxis]
    pixels = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, image_format)
    return buffer.getvalue()


async def upload(
    harness: Harness,
    data: bytes,
    media: str | None = "image/png",
    account: str = ACCOUNT,
    token: str | None = None,
) -> Any:
    headers = {"Authorization": f"Bearer {token or harness.token}"}
    if media is not None:
        headers["Content-Type"] = media
    return await harness.client.post(
        f"/v1/dreamina/assets/{account}", content=data, headers=headers
    )


async def stored(harness: Harness, settings: Settings) -> tuple[int, list[Any]]:
    """(asset rows, upload files) as they are now."""

    def count(conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(assets)).scalar_one())

    files = [path for path in (settings.data_dir / "blobs").rglob("*") if path.is_file()]
    return await harness.server.db.read(count), files


# POST /assets/<account>


@pytest.mark.parametrize(
    ("media", "image_format", "extension"),
    [("image/png", "PNG", "png"), ("image/jpeg", "JPEG", "jpg"), ("image/webp", "WEBP", "webp")],
)
async def test_an_upload_replies_with_its_asset_ref(
    harness: Harness, media: str, image_format: str, extension: str
) -> None:
    data = picture(160, 90, image_format)
    reply = await upload(harness, data, media)
    assert reply.status_code == 200
    body = reply.json()
    assert body == {
        "assetRef": body["assetRef"],
        "imageRef": body["assetRef"],  # the hosted API's first name, for older clients
        "account": ACCOUNT,
        "width": 160,
        "height": 90,
        "size": len(data),
    }
    assert re.fullmatch(
        rf"LOCAL:procedural-image:w160:h90:s{len(data)}-uri:uploads/\d{{4}}/\d\d/\d\d/\d{{19}}\.{extension}",
        body["assetRef"],
    )


async def test_a_jpeg_with_more_pictures_mpo_is_a_jpeg(harness: Harness) -> None:
    """Cameras and phones write JPEGs with extra pictures after the first (MPO)."""
    first = Image.open(io.BytesIO(picture(64, 48, "JPEG")))
    buffer = io.BytesIO()
    first.save(buffer, "MPO", save_all=True, append_images=[first.copy()])
    reply = await upload(harness, buffer.getvalue(), "image/jpeg")
    assert reply.status_code == 200, reply.text
    assert (reply.json()["width"], reply.json()["height"]) == (64, 48)


async def test_an_upload_is_measured_as_shown_after_its_exif_rotation(harness: Harness) -> None:
    image = Image.open(io.BytesIO(picture(160, 90, "JPEG")))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: portrait
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    body = (await upload(harness, buffer.getvalue(), "image/jpeg")).json()
    assert (body["width"], body["height"]) == (90, 160)
    reply = await harness.post(
        {"model": "seedream-4.0", "imageRef_1": body["assetRef"], "count": 1}
    )
    image_out = (await harness.wait(reply.json()["jobid"]))["response"]["images"][0]
    assert (image_out["width"], image_out["height"]) == (1440, 2560)  # auto: nearest 9:16


async def raw_upload(harness: Harness, account: str, length: int) -> tuple[list[Any], bool]:
    """POST through raw ASGI with a declared Content-Length (no client lies about it): the
    messages the app sent, and whether it read any of the body."""
    received: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append("body")
        return {"type": "http.request", "body": b"x", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = post_scope(f"/v1/dreamina/assets/{account}", harness.token, "image/png", length)
    await harness.app(scope, receive, send)
    return sent, bool(received)


@pytest.mark.parametrize(
    ("path", "media"),
    [
        ("/v1/dreamina/assets/LOCAL:procedural", "image/png"),
        ("/v1/dreamina/images", "application/json"),
        ("/v1/dreamina/accounts", "multipart/form-data; boundary=x"),
    ],
)
async def test_a_client_that_disconnects_mid_body_is_one_quiet_line(
    harness: Harness, caplog: pytest.LogCaptureFixture, path: str, media: str
) -> None:
    """No traceback, nothing at ERROR: a client going away is not the server's fault."""
    messages = iter(
        [
            {"type": "http.request", "body": b"x" * 1000, "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        pass

    scope = post_scope(path, harness.token, media, 100000)
    caplog.set_level(logging.DEBUG)
    await harness.app(scope, receive, send)
    assert [(r.name, r.levelname, r.getMessage(), r.exc_info) for r in caplog.records] == [
        (
            "dreamserve.api.errors",
            "INFO",
            f"POST {quote(path)}: the client disconnected before sending the whole body",
            None,
        )
    ]


async def test_a_declared_length_over_the_limit_is_refused_before_reading(
    harness: Harness,
) -> None:
    sent, read = await raw_upload(harness, ACCOUNT, 200 * 1024 * 1024)
    assert sent[0]["status"] == 400
    assert sent[1]["body"] == b'{"error":"Image is too large (limit 10485760 bytes)"}'
    assert not read


async def test_an_unknown_account_is_404_before_the_body_is_read(harness: Harness) -> None:
    sent, read = await raw_upload(harness, "US:nobody@example.com", 5 * 1024 * 1024)
    assert sent[0]["status"] == 404
    assert sent[1]["body"] == (
        b'{"error":"Unable to find configuration for account US:nobody@example.com"}'
    )
    assert not read


async def test_an_upload_is_a_reference_that_shapes_the_job(harness: Harness) -> None:
    ref = (await upload(harness, picture(1600, 900))).json()["assetRef"]
    reply = await harness.post({"model": "seedream-4.0", "imageRef_1": ref, "count": 1})
    assert reply.status_code == 200, reply.text
    request = reply.json()["request"]
    assert (request["inputMode"], request["imageRef_1"], request["imageStrength"]) == (
        "reference",
        ref,
        0.5,
    )
    record = await harness.wait(reply.json()["jobid"])
    image = record["response"]["images"][0]
    assert (image["width"], image["height"]) == (2560, 1440)  # auto: nearest to 16:9


async def test_an_upload_to_an_account_the_user_cannot_use_is_404(harness: Harness) -> None:
    await harness.put_account({"account": "US:mine@example.com", "engine": "procedural"})
    other = await harness.new_user()
    for account, token in (("US:nobody@example.com", None), ("US:mine@example.com", other)):
        reply = await upload(harness, picture(8, 8), account=account, token=token)
        assert (reply.status_code, reply.json()) == (
            404,
            {"error": f"Unable to find configuration for account {account}"},
        )


@pytest.mark.parametrize(
    ("data", "media", "message"),
    [
        (picture(8, 8), "text/plain", UNSUPPORTED.format("text/plain")),
        (picture(8, 8), None, UNSUPPORTED.format("")),
        (picture(8, 8), "image/gif", UNSUPPORTED.format("image/gif")),
        (b"", "image/png", "Image is empty"),
        (b"hello, not an image", "image/png", "Image data is not a valid image/png image"),
        (picture(8, 8, "JPEG"), "image/png", "Image data is image/jpeg, not image/png"),
        (picture(8, 8, "PNG"), "image/webp", "Image data is image/png, not image/webp"),
        (
            picture(64, 64, "PNG")[:300],
            "image/png",
            "Image data is truncated or corrupt (not a complete image/png image)",
        ),
        (
            picture(64, 64, "JPEG")[:400],
            "image/jpeg",
            "Image data is truncated or corrupt (not a complete image/jpeg image)",
        ),
    ],
)
async def test_a_bad_upload_is_400_saying_why_and_stores_nothing(
    harness: Harness, settings: Settings, data: bytes, media: str | None, message: str
) -> None:
    reply = await upload(harness, data, media)
    assert (reply.status_code, reply.json()) == (400, {"error": message})
    assert await stored(harness, settings) == (0, [])


async def test_too_many_pixels_is_400(settings: Settings) -> None:
    small = settings.model_copy(update={"max_upload_pixels": 1000})
    async with open_harness(small) as harness:
        reply = await upload(harness, picture(40, 30))
        assert (reply.status_code, reply.json()) == (
            400,
            {"error": "Image has too many pixels: 40x30 pixels (limit 1000 pixels)"},
        )
        assert (await upload(harness, picture(40, 25))).status_code == 200


async def test_a_body_over_the_limit_is_400_declared_or_streamed(settings: Settings) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 4096})
    message = {"error": "Image is too large (limit 4096 bytes)"}
    async with open_harness(small) as harness:
        buffer = io.BytesIO()
        noise = np.random.default_rng(1).integers(0, 255, (100, 100, 3), dtype=np.uint8)
        Image.fromarray(noise, "RGB").save(buffer, "PNG")
        big = buffer.getvalue()
        assert len(big) > 4096
        reply = await upload(harness, big)
        assert (reply.status_code, reply.json()) == (400, message)

        async def chunks():  # no Content-Length: refused once 4096 bytes have arrived
            for start in range(0, len(big), 1000):
                yield big[start : start + 1000]

        headers = {**harness.auth, "Content-Type": "image/png"}
        reply = await harness.client.post(
            f"/v1/dreamina/assets/{ACCOUNT}", content=chunks(), headers=headers
        )
        assert (reply.status_code, reply.json()) == (400, message)
        assert await stored(harness, small) == (0, [])


# GET /assets/<account>


@pytest.mark.both_databases
async def test_the_list_has_generated_images_newest_first(harness: Harness) -> None:
    await upload(harness, picture(16, 16))  # uploads are not listed
    first = await harness.wait((await harness.post({**SMALL, "count": 2})).json()["jobid"])
    second = await harness.wait((await harness.post({**SMALL, "prompt": "later"})).json()["jobid"])
    reply = await harness.call("GET", f"/assets/{ACCOUNT}")
    assert reply.status_code == 200
    page = reply.json()
    assert (page["hasMore"], page["nextOffset"], page["account"]) == (False, None, ACCOUNT)
    images = second["response"]["images"] + first["response"]["images"][::-1]
    listed = page["assets"]
    assert [item["itemId"] for item in listed] == [image["itemId"] for image in images]
    top, image = listed[0], images[0]
    assert top == {
        "assetId": image["assetId"],
        "itemId": image["itemId"],
        "type": "image",
        "description": "later",
        "assetRef": image["assetRef"],
        "imageUrl": top["imageUrl"],
        "width": 1024,
        "height": 1024,
        "format": "jpeg",
        "createdAt": second["updated"],
    }
    assert (await harness.client.get(top["imageUrl"])).status_code == 200


@pytest.mark.both_databases
async def test_the_list_pages_with_count_and_offset(harness: Harness) -> None:
    await harness.wait((await harness.post({**SMALL, "count": 3})).json()["jobid"])
    page = (await harness.call("GET", f"/assets/{ACCOUNT}?count=2")).json()
    assert (len(page["assets"]), page["hasMore"], page["nextOffset"]) == (2, True, 2)
    rest = (await harness.call("GET", f"/assets/{ACCOUNT}?count=2&offset=2")).json()
    assert (len(rest["assets"]), rest["hasMore"], rest["nextOffset"]) == (1, False, None)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("count=0", "Parameter count (0) valid values: integer 1-100"),
        ("count=101", "Parameter count (101) valid values: integer 1-100"),
        ("count=x", "Parameter count (x) valid values: integer 1-100"),
        ("offset=-1", "Parameter offset (-1) valid values: integer 0-2147483647"),
    ],
)
async def test_bad_paging_is_400(harness: Harness, query: str, message: str) -> None:
    reply = await harness.call("GET", f"/assets/{ACCOUNT}?{query}")
    assert (reply.status_code, reply.json()) == (400, {"error": message})


async def test_another_users_images_are_not_listed(harness: Harness) -> None:
    await harness.wait((await harness.post(SMALL)).json()["jobid"])
    other = await harness.new_user()
    page = (await harness.call("GET", f"/assets/{ACCOUNT}", token=other)).json()
    assert page == {"assets": [], "hasMore": False, "nextOffset": None, "account": ACCOUNT}


# DELETE /assets/<assetId>


@pytest.mark.both_databases
async def test_delete_removes_the_image_and_a_later_job_naming_it_is_400(
    harness: Harness, settings: Settings
) -> None:
    record = await harness.wait((await harness.post(SMALL)).json()["jobid"])
    image = record["response"]["images"][0]
    other = await harness.new_user()
    foreign = await harness.call("DELETE", f"/assets/{image['assetId']}", token=other)
    assert (foreign.status_code, foreign.json()) == (
        404,
        {"error": f"Asset {image['assetId']} not found"},
    )
    reply = await harness.call("DELETE", f"/assets/{image['assetId']}")
    assert reply.status_code == 200
    assert reply.json() == {"deleted": True, "assetId": image["assetId"], "account": ACCOUNT}
    assert not (settings.data_dir / "blobs" / image["imageUri"]).exists()
    again = await harness.call("DELETE", f"/assets/{image['assetId']}")
    assert again.status_code == 404
    reply = await harness.post({**SMALL, "imageRef_1": image["assetRef"]})
    assert (reply.status_code, reply.json()) == (
        400,
        {
            "error": f"Parameter imageRef_1 ({image['assetRef']}) valid values: an assetRef of "
            "an existing image of yours"
        },
    )


async def test_deleting_an_upload_removes_its_file(harness: Harness, settings: Settings) -> None:
    body = (await upload(harness, picture(10, 10))).json()
    key = body["assetRef"].partition("-uri:")[2]
    item = key.rpartition("/")[2].partition(".")[0]
    reply = await harness.call("DELETE", f"/assets/{ACCOUNT}:{item}")
    assert reply.json() == {"deleted": True, "assetId": f"{ACCOUNT}:{item}", "account": ACCOUNT}
    assert await stored(harness, settings) == (0, [])


@pytest.mark.parametrize("asset", ["nothing", "LOCAL:procedural:123", "a:b:1234567890123456789"])
async def test_unknown_asset_ids_are_404(harness: Harness, asset: str) -> None:
    reply = await harness.call("DELETE", f"/assets/{asset}")
    assert (reply.status_code, reply.json()) == (404, {"error": f"Asset {asset} not found"})


async def test_a_file_the_store_cannot_remove_keeps_its_asset_until_a_retry(
    harness: Harness, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file and the row go together or not at all: a blob store that fails leaves the
    asset listed and usable, answers 503, and the same DELETE succeeds once it works again."""
    record = await harness.wait((await harness.post(SMALL)).json()["jobid"])
    image = record["response"]["images"][0]
    blobs = harness.server.blobs
    working = blobs.delete

    async def failing(key: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blobs, "delete", failing)
    reply = await harness.call("DELETE", f"/assets/{image['assetId']}")
    assert (reply.status_code, reply.json()) == (503, {"error": "Storage unavailable, retry later"})
    listed = (await harness.call("GET", f"/assets/{ACCOUNT}")).json()["assets"]
    assert [asset["assetId"] for asset in listed] == [image["assetId"]]
    assert (await harness.client.get(listed[0]["imageUrl"])).status_code == 200
    reference = await harness.post({**SMALL, "imageRef_1": image["assetRef"]})
    assert reference.status_code == 200, reference.text
    made = (await harness.wait(reference.json()["jobid"]))["response"]["images"][0]

    monkeypatch.setattr(blobs, "delete", working)
    reply = await harness.call("DELETE", f"/assets/{image['assetId']}")
    assert reply.json() == {"deleted": True, "assetId": image["assetId"], "account": ACCOUNT}
    assert not (settings.data_dir / "blobs" / image["imageUri"]).exists()
    listed = (await harness.call("GET", f"/assets/{ACCOUNT}")).json()["assets"]
    assert [asset["assetId"] for asset in listed] == [made["assetId"]]


async def test_two_deletes_at_once_delete_once(harness: Harness) -> None:
    record = await harness.wait((await harness.post(SMALL)).json()["jobid"])
    asset = record["response"]["images"][0]["assetId"]
    first, second = await asyncio.gather(
        harness.call("DELETE", f"/assets/{asset}"), harness.call("DELETE", f"/assets/{asset}")
    )
    assert sorted([first.status_code, second.status_code]) == [200, 404]
