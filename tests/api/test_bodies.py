"""Request bodies arriving at once: at most `DREAMSERVE_MAX_BODY_READS_PER_USER` of one user
(429 past it) and `DREAMSERVE_MAX_BODY_READS` in all (503), refused before any of the body is
read, counted until the body has arrived whatever ends it; and uploads spooled to a temporary
file in the data dir instead of held in memory. The time a body may take is the HTTP
protocol's bound (tests/blackbox/test_held_bodies.py)."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import tempfile
from typing import Any

import numpy as np
import pytest
from PIL import Image
from support import SMALL, Harness, eventually, open_harness, post_scope
from test_assets import picture, stored, upload

from dreamserve.api.body import SPOOL_BYTES, BodyReads
from dreamserve.settings import Settings

pytestmark = pytest.mark.anyio

UPLOAD = "/v1/dreamina/assets/LOCAL:procedural"
IMAGES = "/v1/dreamina/images"
PNG = picture(64, 48)
PER_USER = 2
ALL = 3


class RawRequest:
    """A POST through raw ASGI whose body the test sends a part at a time, as a slow client
    would; the app runs it in a task."""

    def __init__(self, harness: Harness, path: str, token: str, media: str) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reads = 0  # how many times the app asked for the body
        self.sent: list[dict[str, Any]] = []
        scope = post_scope(path, token, media)
        self.task = asyncio.create_task(harness.app(scope, self.receive, self.send))

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        return await self.messages.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def body(self, data: bytes, more: bool = True) -> None:
        self.messages.put_nowait({"type": "http.request", "body": data, "more_body": more})

    def disconnect(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})

    async def reply(self) -> tuple[int, dict[str, str], Any]:
        """Status, headers and JSON body of the app's answer."""
        await asyncio.wait_for(self.task, 30)
        start, body = self.sent[0], self.sent[1]
        headers = {name.decode(): value.decode() for name, value in start["headers"]}
        return start["status"], headers, json.loads(body["body"])


def reads_of(harness: Harness) -> BodyReads:
    reads: BodyReads = harness.app.state.body_reads
    return reads


async def held(harness: Harness, token: str, path: str = UPLOAD) -> RawRequest:
    """A body of the user's that has begun to arrive and is not complete."""
    reads = reads_of(harness)
    before = reads.in_progress()
    request = RawRequest(
        harness, path, token, "image/png" if path == UPLOAD else "application/json"
    )
    request.body(PNG[:100])
    await eventually(lambda: reads.in_progress() == before + 1)
    return request


def retry_later(status: int, message: str) -> tuple[int, str, dict[str, str]]:
    return status, "5", {"error": message}


@pytest.fixture
def capped(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_body_reads_per_user": PER_USER, "max_body_reads": ALL})


async def test_a_users_bodies_past_its_cap_are_429_unread_while_others_are_served(
    capped: Settings,
) -> None:
    async with open_harness(capped) as harness:
        reads = reads_of(harness)
        other = await harness.new_user()
        holding = [await held(harness, harness.token) for _ in range(PER_USER)]
        assert (reads.in_progress(1), reads.in_progress()) == (PER_USER, PER_USER)

        refused = RawRequest(harness, UPLOAD, harness.token, "image/png")
        status, headers, body = await refused.reply()
        too_many = f"Too many request bodies in progress (limit {PER_USER} per user)"
        assert (status, headers["retry-after"], body) == retry_later(429, too_many)
        assert refused.reads == 0  # refused before any of its body was read
        # JSON bodies are bodies too; a request without one is not held back.
        posted = await harness.post(SMALL)
        assert (posted.status_code, posted.headers["retry-after"], posted.json()) == (
            retry_later(429, too_many)
        )
        assert (await harness.call("GET", "/accounts")).status_code == 200

        # Another user's uploads and posts go on.
        assert (await upload(harness, PNG, token=other)).status_code == 200
        assert (await harness.post(SMALL, token=other)).status_code == 200

        for request in holding:
            request.body(PNG[100:], more=False)
        for request in holding:
            assert (await request.reply())[0] == 200
        assert reads.in_progress() == 0
        assert (await upload(harness, PNG)).status_code == 200  # released: served again


async def test_bodies_past_the_servers_cap_are_503_unread_until_one_ends(
    capped: Settings,
) -> None:
    async with open_harness(capped) as harness:
        reads = reads_of(harness)
        second, third = await harness.new_user(), await harness.new_user()
        first_held = [await held(harness, harness.token) for _ in range(PER_USER)]
        second_held = await held(harness, second)
        assert reads.in_progress() == ALL

        refused = RawRequest(harness, UPLOAD, third, "image/png")
        status, headers, body = await refused.reply()
        assert (status, headers["retry-after"], body) == retry_later(
            503, "Too many request bodies in progress on the server, retry later"
        )
        assert refused.reads == 0
        # A user at its own cap still hears about its own cap first.
        posted = await harness.post(SMALL)
        assert posted.status_code == 429

        second_held.disconnect()  # one ends: its place is free
        await second_held.task
        assert reads.in_progress() == ALL - 1
        assert (await upload(harness, PNG, token=third)).status_code == 200
        for request in first_held:
            request.disconnect()
            await request.task
        assert reads.in_progress() == 0


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about 3 bytes a pixel."""
    pixels = np.random.default_rng(7).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


async def ends_by_disconnect(harness: Harness, request: RawRequest) -> None:
    request.disconnect()


async def ends_by_cancel(harness: Harness, request: RawRequest) -> None:
    await asyncio.sleep(0)
    request.task.cancel()  # as a shutdown cancels the requests still running


async def ends_past_the_limit(harness: Harness, request: RawRequest) -> None:
    request.body(b"x" * 4096)  # the upload limit of these tests is 4096 bytes


async def ends_as_a_bad_image(harness: Harness, request: RawRequest) -> None:
    request.body(b"not the rest of a png", more=False)


async def ends_with_a_full_disk(harness: Harness, request: RawRequest) -> None:
    request.body(b"x" * SPOOL_BYTES)  # the spool moves to the disk, which is full


@pytest.mark.parametrize(
    ("end", "status", "message"),
    [
        (ends_by_disconnect, 400, "Request body incomplete: the client disconnected"),
        (ends_by_cancel, None, None),
        (ends_past_the_limit, 400, "Image is too large (limit 4096 bytes)"),
        (ends_as_a_bad_image, 400, "Image data is truncated or corrupt (not a complete "),
        (ends_with_a_full_disk, 507, "Storage full"),
    ],
)
async def test_a_body_is_uncounted_whatever_ends_it(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    end: Any,
    status: int | None,
    message: str | None,
) -> None:
    limit = SPOOL_BYTES * 2 if end is ends_with_a_full_disk else 4096
    async with open_harness(settings.model_copy(update={"max_upload_bytes": limit})) as harness:
        monkeypatch.setattr(tempfile, "TemporaryFile", no_space)
        request = await held(harness, harness.token)
        assert reads_of(harness).in_progress(1) == 1
        await end(harness, request)
        if status is None:
            with pytest.raises(asyncio.CancelledError):
                await request.task
        else:
            got, _, body = await request.reply()
            assert (got, body["error"][: len(message or "")]) == (status, message)
        assert (reads_of(harness).in_progress(1), reads_of(harness).in_progress()) == (0, 0)
        assert await stored(harness, settings) == (0, [])
        monkeypatch.undo()
        assert (await upload(harness, PNG)).status_code == 200


async def test_a_json_body_is_uncounted_when_it_is_not_json(harness: Harness) -> None:
    request = await held(harness, harness.token, IMAGES)
    request.body(b"}", more=False)
    status, _, body = await request.reply()
    assert (status, body) == (400, {"error": "Request body is not valid JSON"})
    assert reads_of(harness).in_progress() == 0


async def test_an_upload_past_the_spool_size_goes_to_a_file_in_the_data_dir(
    harness: Harness, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the first SPOOL_BYTES of an upload are kept in memory: a client holding many large
    uploads open holds disk, bounded by the caps, not the server's memory."""
    real = tempfile.TemporaryFile
    spooled_in: list[str | None] = []

    def temporary_file(*args: Any, **kwargs: Any) -> Any:
        spooled_in.append(kwargs.get("dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    small, large = PNG, noise_png(400)
    assert len(small) < SPOOL_BYTES < len(large)
    assert (await upload(harness, small)).status_code == 200
    assert spooled_in == []
    reply = await upload(harness, large)
    assert (reply.status_code, reply.json()["size"]) == (200, len(large))
    assert spooled_in == [str(settings.data_dir)]
    _, files = await stored(harness, settings)
    assert sorted(path.read_bytes() for path in files) == sorted([small, large])
