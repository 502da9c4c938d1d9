"""The client's rules that need no server: when a call is sent again and after how long, how an
error reply becomes an exception, what a call sends, and `wait` against a server that does not
hold requests (the hosted API), through httpx's MockTransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from dreamserve.client import (
    ApiError,
    AsyncClient,
    Client,
    ClientError,
    ConnectionFailed,
    JobFailed,
    RateLimited,
    Retries,
    ServerError,
    calls,
)
from dreamserve.client.errors import error_from, retry_after

GET = calls.get("j1")
UPLOAD = calls.upload("LOCAL:a", b"\x89PNG\r\n\x1a\n...", None)
REQUEST = httpx.Request("GET", "http://127.0.0.1/")


def reply(status: int, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers, request=REQUEST)


def test_a_connection_never_opened_is_retried_for_every_call() -> None:
    refused = httpx.ConnectError("refused", request=REQUEST)
    policy = Retries(attempts=2, backoff=1.0, max_wait=10.0)
    assert 0.5 <= (policy.delay(UPLOAD, 0, error=refused) or 0) <= 1.0
    assert 1.0 <= (policy.delay(UPLOAD, 1, error=refused) or 0) <= 2.0
    assert policy.delay(UPLOAD, 2, error=refused) is None  # attempts spent


def test_a_connection_lost_after_sending_is_retried_only_for_safe_calls() -> None:
    dropped = httpx.ReadError("dropped", request=REQUEST)
    policy = Retries()
    assert policy.delay(GET, 0, error=dropped) is not None
    assert policy.delay(UPLOAD, 0, error=dropped) is None
    submit = calls.submit(
        "p", model=None, ratio=None, resolution=None, refs=(), image_strength=None,
        account=None, count=None, seed=None, queue_seconds=None, reply_url=None,
        reply_ref=None, max_jobs=None, idempotency_key=None, extra={},
    )  # fmt: skip
    assert policy.delay(submit, 0, error=dropped) is not None


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_busy_replies_are_retried_after_their_retry_after(status: int) -> None:
    policy = Retries(max_wait=10.0)
    assert policy.delay(GET, 0, reply(status, {"Retry-After": "3"})) == 3.0
    assert policy.delay(GET, 0, reply(status, {"Retry-After": "11"})) is None  # the caller's
    assert policy.delay(UPLOAD, 0, reply(status, {"Retry-After": "1"})) is None
    assert 0 < (policy.delay(GET, 0, reply(status)) or 0) <= policy.backoff


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500, 507])
def test_other_errors_are_never_retried(status: int) -> None:
    assert Retries().delay(GET, 0, reply(status)) is None


def test_backoff_is_bounded() -> None:
    policy = Retries(attempts=20, backoff=0.5, max_wait=4.0)
    assert all((policy.delay(GET, n, reply(503)) or 0) <= 4.0 for n in range(20))


def test_retry_after_as_seconds_or_a_date() -> None:
    assert retry_after(httpx.Headers({"Retry-After": "7"})) == 7.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < (retry_after(httpx.Headers({"Retry-After": later})) or 0) <= 120
    assert retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert retry_after(httpx.Headers()) is None


def test_error_replies_become_typed_exceptions() -> None:
    full = error_from(reply(429, {"Retry-After": "5"}, error="All accounts at capacity"))
    assert isinstance(full, RateLimited)
    assert (full.status, full.message, full.retry_after) == (429, "All accounts at capacity", 5)
    assert full.body == {"error": "All accounts at capacity"}
    page = httpx.Response(502, text="<html>Bad Gateway</html>", request=REQUEST)
    proxy = error_from(page)
    assert isinstance(proxy, ServerError)
    assert (proxy.status, proxy.message) == (502, "<html>Bad Gateway</html>")
    empty = error_from(httpx.Response(418, request=REQUEST))
    assert type(empty) is ApiError
    assert empty.message == "418 I'm a teapot"


def test_a_submission_sends_contract_names_and_one_key_per_call() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) == 1:
            return httpx.Response(503, json={"error": "Server is stopping"})
        return httpx.Response(200, json={"jobid": "j1", "status": "created"})

    transport = httpx.MockTransport(answer)
    with Client("http://dream.test", "user:1-" + "s" * 20, transport=transport) as client:
        client.retries = Retries(backoff=0.001)
        client.submit(
            "p",
            model="seedream-4.0",
            refs=["a-ref", "b-ref"],
            queue_seconds=30,
            reply_url="https://hooks.test/x",
            max_jobs=2,
            extra_field=True,
        )
        client.submit("p")
    first, retry, other = sent
    assert str(first.url) == "http://dream.test/v1/dreamina/images"
    assert first.headers["authorization"] == "Bearer user:1-" + "s" * 20
    assert json.loads(first.content) == {
        "prompt": "p",
        "model": "seedream-4.0",
        "queueSeconds": 30,
        "replyUrl": "https://hooks.test/x",
        "maxJobs": 2,
        "imageRef_1": "a-ref",
        "imageRef_2": "b-ref",
        "extra_field": True,
    }
    assert first.headers["idempotency-key"] == retry.headers["idempotency-key"]
    assert other.headers["idempotency-key"] != first.headers["idempotency-key"]


def test_wait_polls_a_server_that_does_not_hold_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(calls, "POLL_SECONDS", 0.01)
    statuses = iter(["created", "created", "failed"])
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        status = next(statuses)
        body: dict[str, Any] = {"jobid": "j:1/x", "status": status}
        if status == "failed":
            body |= {"error": "Cancelled by user", "errorDetails": "by you"}
        return httpx.Response(200, json=body)

    client = Client("http://dream.test", "t", transport=httpx.MockTransport(answer))
    with client, pytest.raises(JobFailed) as failed:
        client.wait("j:1/x")
    assert (failed.value.error, failed.value.details) == ("Cancelled by user", "by you")
    assert asked == ["http://dream.test/v1/dreamina/images/j%3A1%2Fx?wait=60"] * 3


def test_download_sends_no_token(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"bytes")

    with Client("http://dream.test", "secret-token", transport=httpx.MockTransport(answer)) as c:
        path = c.download("/v1/dreamina/files/a/b.png?expires=1&signature=s", tmp_path)
    assert path == tmp_path / "b.png"
    assert path.read_bytes() == b"bytes"
    assert "authorization" not in seen[0].headers
    assert str(seen[0].url) == "http://dream.test/v1/dreamina/files/a/b.png?expires=1&signature=s"


def test_a_dropped_download_leaves_no_file(tmp_path: Path) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = Client("http://dream.test", retries=0, transport=httpx.MockTransport(answer))
    with client, pytest.raises(ConnectionFailed) as failed:
        client.download("http://files.test/x.jpg?signature=secret", tmp_path / "x.jpg")
    assert str(failed.value) == "Cannot reach http://files.test/x.jpg: refused"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_an_interrupted_download_leaves_no_file(tmp_path: Path) -> None:
    class Interrupted(BaseException):
        """As KeyboardInterrupt, which the test runner would take for itself."""

    def chunks() -> Iterator[bytes]:
        yield b"half"
        raise Interrupted

    async def async_chunks() -> AsyncIterator[bytes]:
        yield b"half"
        raise Interrupted

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    def async_answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=async_chunks())

    client = Client("http://dream.test", transport=httpx.MockTransport(answer))
    with client, pytest.raises(Interrupted):
        client.download("http://files.test/x.jpg", tmp_path / "x.jpg")
    transport = httpx.MockTransport(async_answer)
    async with AsyncClient("http://dream.test", transport=transport) as async_client:
        with pytest.raises(Interrupted):
            await async_client.download("http://files.test/y.jpg", tmp_path / "y.jpg")
    assert files(tmp_path) == []


def files(directory: Path) -> list[Path]:
    return list(directory.iterdir())


@pytest.mark.parametrize(
    ("item", "form", "saved"),
    [
        ("../../escaped", "png", "escaped.png"),
        ("1", "png/../../../escaped", "escaped"),
        ("..\\..\\escaped", "jpeg", "escaped.jpg"),
        ("x", "/..", "image"),
    ],
)
def test_a_download_never_leaves_its_directory(
    tmp_path: Path, item: str, form: str, saved: str
) -> None:
    # A server's itemId and format name the file: whatever they hold, it lands in the directory.
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"bytes")

    inside = tmp_path / "a" / "b"
    inside.mkdir(parents=True)
    image: Any = {"imageUrl": "http://files.test/f", "itemId": item, "format": form}
    with Client("http://dream.test", transport=httpx.MockTransport(answer)) as client:
        path = client.download(image, inside)
    assert path == inside / saved
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [saved]


@pytest.mark.anyio
async def test_a_path_ending_with_a_slash_is_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/client.md's quick start: `client.download(image, "out/")` for each image of a job.
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=request.url.path.encode())

    monkeypatch.chdir(tmp_path)
    images: list[Any] = [
        {"imageUrl": f"http://files.test/{n}", "itemId": str(n) * 19, "format": "jpeg"}
        for n in (1, 2)
    ]
    with Client("http://dream.test", transport=httpx.MockTransport(answer)) as client:
        paths = [client.download(image, "out/") for image in images]
    transport = httpx.MockTransport(answer)
    async with AsyncClient("http://dream.test", transport=transport) as async_client:
        paths.append(await async_client.download(images[1], f"{tmp_path}/async/y/"))
    assert paths == [
        Path("out") / f"{'1' * 19}.jpg",
        Path("out") / f"{'2' * 19}.jpg",
        tmp_path / "async" / "y" / f"{'2' * 19}.jpg",
    ]
    assert [path.read_bytes() for path in paths] == [b"/1", b"/2", b"/2"]


@pytest.mark.anyio
async def test_an_event_that_is_not_a_record_is_a_client_error() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        stream = b"event: progress\ndata: <html>\n\n"
        return httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    said = "Not a job record in the event stream: Expecting value: line 1 column 1 (char 0)"
    client = Client("http://dream.test", transport=httpx.MockTransport(answer))
    with client, pytest.raises(ClientError) as sync_error:
        list(client.events("j1"))
    assert str(sync_error.value) == said
    transport = httpx.MockTransport(answer)
    async with AsyncClient("http://dream.test", transport=transport) as async_client:
        with pytest.raises(ClientError) as async_error:
            [record async for record in async_client.events("j1")]
    assert str(async_error.value) == said


@pytest.mark.anyio
async def test_a_reply_that_is_not_json_is_a_client_error() -> None:
    # A portal or proxy answering 200 with its own page: the client's error, not a ValueError.
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>Sign in to the Wi-Fi</html>", headers=HTML)

    said = "GET http://dream.test/v1/dreamina/scheduler answered 200 with a body that is not "
    said += "JSON (text/html)"
    client = Client("http://dream.test", transport=httpx.MockTransport(answer))
    with client, pytest.raises(ClientError) as sync_error:
        client.scheduler()
    assert str(sync_error.value) == said
    transport = httpx.MockTransport(answer)
    async with AsyncClient("http://dream.test", transport=transport) as async_client:
        with pytest.raises(ClientError) as async_error:
            await async_client.scheduler()
    assert str(async_error.value) == said


HTML = {"content-type": "text/html"}


def test_jobs_since_a_time_is_sent_with_its_time_zone() -> None:
    """The server refuses a time without a zone (400): an aware time is sent as it is, a naive
    one as this machine's local time, as Python reads naive times."""
    aware = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert calls.jobs(None, None, None, aware, None, None).params == {
        "since": "2026-12-01T10:00:00+00:00"
    }
    naive = datetime(2026, 12, 1, 10, 0)
    sent = calls.jobs(None, None, None, naive, None, None).params["since"]
    assert datetime.fromisoformat(sent) == naive.astimezone()
    assert datetime.fromisoformat(sent).tzinfo is not None
