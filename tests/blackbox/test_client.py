"""Black-box: `dreamserve.client` (Client and AsyncClient) against a real `dreamserve serve`
process over real HTTP: jobs, events, references, upscales, accounts, cancelling, the jobs list,
webhooks, typed errors and retries that never make a second job."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_server import GATED, RETRY_AFTER, client_server, eventually, python_path
from PIL import Image
from receiver import receiving
from servers import Server
from support import free_port

from dreamserve.client import (
    AsyncClient,
    BadRequest,
    Client,
    ConnectionFailed,
    Forbidden,
    InvalidWebhook,
    JobFailed,
    NotFound,
    RateLimited,
    Retries,
    Unauthorized,
    WaitTimedOut,
    verify_webhook,
)

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(300)]

SMALL: dict[str, Any] = {"model": "nano-banana", "ratio": "1:1"}  # 1024x1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with client_server(tmp_path_factory.mktemp("client")) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, server.token) as opened:
        yield opened


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def held_job(client: Client, **options: Any) -> str:
    """A job of the gated account that runs until it is cancelled, once its engine has it."""
    record = client.submit(
        f"held {uuid.uuid4()}", model="tiny", ratio="1:1", count=1, account=GATED, **options
    )
    jobid = record["jobid"]
    eventually(lambda: "started" in client.get(jobid), "the held job started")
    return jobid


def test_submit_and_wait_give_four_decodable_images(
    server: Server, client: Client, tmp_path: Path
) -> None:
    created = client.submit("four pictures", **SMALL)
    assert created["status"] == "created"
    assert created["request"]["prompt"] == "four pictures"
    # The API's own URL works as well as the server's root.
    with Client(server.url + "/v1/dreamina/", server.token) as same:
        assert same.get(created["jobid"])["jobid"] == created["jobid"]
    record = client.wait(created["jobid"], timeout=120)
    assert record["status"] == "completed"
    images = record["response"]["images"]
    assert len(images) == 4
    paths = [client.download(image, tmp_path) for image in images]
    assert sorted(paths) == sorted(tmp_path / f"{image['itemId']}.jpg" for image in images)
    for path, image in zip(paths, images, strict=True):
        picture = decoded(path.read_bytes())
        assert (picture.format, picture.size) == ("JPEG", (image["width"], image["height"]))
    # A link relative to the server, and a file name of one's own.
    relative = httpx.URL(images[0]["imageUrl"])
    link = relative.raw_path.decode()
    saved = client.download(link, tmp_path / "first.jpg")
    assert saved.read_bytes() == paths[0].read_bytes()


def test_events_follow_the_job_to_its_final_record(client: Client) -> None:
    created = client.submit("followed", **SMALL, count=1)
    records = list(client.events(created["jobid"]))
    assert {r["jobid"] for r in records} == {created["jobid"]}
    assert [r["status"] for r in records[:-1]] == ["created"] * (len(records) - 1)
    assert records[-1]["status"] == "completed"
    assert records[-1] == client.get(created["jobid"])


@pytest.mark.anyio
async def test_the_async_client_submits_follows_and_waits(server: Server, tmp_path: Path) -> None:
    async with AsyncClient(server.url, server.token) as client:
        assert "nano-banana" in [m["model"] for m in await client.models()]
        created = await client.submit("async pictures", **SMALL, count=2)
        records = [record async for record in client.events(created["jobid"])]
        assert records[-1]["status"] == "completed"
        record = await client.wait(created["jobid"], timeout=60)
        assert record == records[-1]
        path = await client.download(record["response"]["images"][1], tmp_path)
        assert decoded(path.read_bytes()).size == (1024, 1024)
        listed = [job["jobid"] async for job in client.jobs(limit=1)]
        assert created["jobid"] in listed
        with pytest.raises(NotFound) as missing:
            await client.get("j-nope")
        assert (missing.value.status, missing.value.message) == (404, "Job j-nope not found")


def test_an_uploaded_reference_is_used_by_a_job(client: Client, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), "orange").save(buffer, "PNG")
    uploaded = client.upload("LOCAL:procedural", buffer.getvalue())  # its type from its bytes
    assert (uploaded["account"], uploaded["width"], uploaded["height"]) == (
        "LOCAL:procedural",
        300,
        200,
    )
    assert uploaded["size"] == len(buffer.getvalue())
    file = tmp_path / "ref.jpg"
    Image.new("RGB", (64, 48), "navy").save(file, "JPEG")
    second = client.upload("LOCAL:procedural", file)
    assert (second["width"], second["height"]) == (64, 48)
    refs = [uploaded["assetRef"], second["assetRef"]]
    record = client.wait(client.submit(model="seedream-4.0", refs=refs, count=1)["jobid"], 120)
    assert record["request"]["imageRef_1"] == uploaded["assetRef"]
    assert record["request"]["imageRef_2"] == second["assetRef"]
    assert record["request"]["inputMode"] == "reference"
    assert len(record["response"]["images"]) == 1
    with pytest.raises(BadRequest) as refused:
        client.upload("LOCAL:procedural", b"not a picture", "image/gif")
    assert refused.value.message == (
        "Content-Type (image/gif) not supported. Valid values: image/jpeg, image/png, image/webp"
    )


def test_upscale_makes_one_bigger_image(client: Client, tmp_path: Path) -> None:
    source = client.wait(client.submit("to upscale", **SMALL, count=2)["jobid"], 120)
    created = client.upscale(source["jobid"], 1, resolution="2k")
    assert created["type"] == "upscale"
    assert created["request"] == {"jobid": source["jobid"], "imageIndex": 1, "resolution": "2k"}
    record = client.wait(created["jobid"], 120)
    [image] = record["response"]["images"]
    picture = decoded(client.download(image, tmp_path).read_bytes())
    assert picture.size == (image["width"], image["height"]) == (2048, 2048)


def test_accounts_created_read_listed_and_deleted(client: Client) -> None:
    name = f"LOCAL:mine-{uuid.uuid4().hex[:8]}"
    summary = client.put_account(name, engine="procedural", max_jobs=2, priority=-5)
    assert (summary["account"], summary["maxJobs"], summary["priority"]) == (name, 2, -5)
    assert summary["shared"] is False
    listed = client.accounts()
    assert listed[name] == summary
    assert listed["LOCAL:procedural"]["shared"] is True
    assert client.account(name)["account"] == name  # with `details`
    again = client.put_account(name, engine="procedural", max_jobs=3)  # an upsert
    assert again["maxJobs"] == 3
    deleted = client.delete_account(name)
    assert (deleted["account"], deleted["deleted"]) == (name, True)
    with pytest.raises(NotFound) as missing:
        client.account(name)
    assert missing.value.message == f"Unable to find configuration for account {name}"
    with pytest.raises(Forbidden) as shared:
        client.delete_account("LOCAL:procedural")
    assert (shared.value.status, shared.value.message) == (
        403,
        "Account LOCAL:procedural is shared and managed by the operator",
    )
    with pytest.raises(BadRequest) as engine:
        client.put_account(email="a@b.c", password="secret")  # the hosted API's login shape
    assert engine.value.message.startswith("Parameter engine is required, valid values: ")


def test_cancel_ends_a_running_job_and_wait_raises_job_failed(client: Client) -> None:
    jobid = held_job(client)
    running = client.scheduler()
    assert jobid in [job["jobid"] for job in running["executing"][GATED]]
    cancelled = client.cancel(jobid)
    assert (cancelled["status"], cancelled["error"]) == ("failed", "Cancelled by user")
    with pytest.raises(JobFailed) as failed:
        client.wait(jobid)
    assert (failed.value.jobid, failed.value.error) == (jobid, "Cancelled by user")
    assert failed.value.record["status"] == "failed"
    with pytest.raises(NotFound) as ended:
        client.cancel(jobid)
    assert ended.value.message == f"Job {jobid} is not running"


def test_wait_gives_up_after_its_timeout(client: Client) -> None:
    jobid = held_job(client)
    try:
        with pytest.raises(WaitTimedOut) as late:
            client.wait(jobid, timeout=1)
        assert late.value.record["jobid"] == jobid
        assert late.value.record["status"] == "created"
    finally:
        client.cancel(jobid)


def test_jobs_iterates_every_page(client: Client) -> None:
    made = [
        client.submit(f"page {n}", model="seedream-3.0", ratio="1:1", count=1)["jobid"]
        for n in range(3)
    ]
    for jobid in made:
        client.wait(jobid, 120)
    first = client.jobs_page(model="seedream-3.0", limit=1)
    assert [job["jobid"] for job in first["jobs"]] == [made[-1]]
    assert first["next"] is not None
    listed = [job["jobid"] for job in client.jobs(model="seedream-3.0", limit=1)]
    assert listed == made[::-1]  # newest first, one page each
    assert [job["jobid"] for job in client.jobs(model="seedream-3.0", status="failed")] == []


def test_a_signed_delivery_verifies_with_the_secret(client: Client) -> None:
    secret = client.webhook_secret()["secret"]
    assert secret.startswith("whsec_")
    assert client.webhook_secret()["secret"] == secret
    with receiving() as receiver:
        url = f"{receiver.url}/hook"
        record = client.wait(
            client.submit("hooked", **SMALL, count=1, reply_url=url, reply_ref="order-7")["jobid"],
            120,
        )
        eventually(lambda: receiver.count("/hook") == 1, "the delivery came")
        delivery = receiver.received[0]
        verified = verify_webhook(delivery.body, delivery.headers, secret)
        assert verified["jobid"] == record["jobid"]
        assert verified["status"] == "completed"
        assert verified["request"]["replyRef"] == "order-7"
        with pytest.raises(InvalidWebhook):
            verify_webhook(delivery.body.replace(b"completed", b"failed"), delivery.headers, secret)
        with pytest.raises(InvalidWebhook):
            verify_webhook(delivery.body, {}, secret)
        eventually(
            lambda: client.deliveries(record["jobid"])["deliveries"][0]["status"] == "delivered",
            "the delivery recorded",
        )
        rotated = client.rotate_webhook_secret()
        assert rotated["secret"] != secret
        assert "previousSecretExpires" in rotated
        again = client.redeliver(record["jobid"])
        assert again["jobid"] == record["jobid"]
        eventually(lambda: receiver.count("/hook") == 2, "the redelivery came")
        redelivered = receiver.received[1]
        assert redelivered.headers["webhook-id"] == delivery.headers["webhook-id"]
        # Signed by the new secret and, for a day, by the previous one: either verifies.
        for each in (rotated["secret"], secret):
            assert (
                verify_webhook(redelivered.body, redelivered.headers, each)["jobid"]
                == (record["jobid"])
            )


def test_errors_carry_the_servers_status_and_message(server: Server, client: Client) -> None:
    with pytest.raises(BadRequest) as bad:
        client.submit("x", model="no-such-model")
    valid = ", ".join(model["model"] for model in client.models())
    assert (bad.value.status, bad.value.message) == (
        400,
        f"Parameter model (no-such-model) valid values: {valid}",
    )
    assert bad.value.body == {"error": bad.value.message}
    assert str(bad.value) == bad.value.message
    with Client(server.url, "user:1-" + "x" * 30) as stranger, pytest.raises(Unauthorized) as who:
        stranger.models()
    assert (who.value.status, who.value.message) == (401, "Unauthorized")
    with pytest.raises(NotFound) as missing:
        client.get("j0000000000000000000i-u1-LOCAL:gone-bot:dreamina")
    assert missing.value.message == "Job j0000000000000000000i-u1-LOCAL:gone-bot:dreamina not found"


class Counting(httpx.HTTPTransport):
    """The real transport, counting the requests it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return super().handle_request(request)


def test_a_429_carries_retry_after_and_a_long_one_is_not_retried(
    server: Server, client: Client
) -> None:
    jobid = held_job(client)
    try:
        full_body: dict[str, Any] = {"model": "tiny", "ratio": "1:1", "count": 1, "max_jobs": 1}
        once = Client(server.url, server.token, retries=0)
        with once, pytest.raises(RateLimited) as full:
            once.submit("one too many", account=GATED, **full_body)
        assert (full.value.status, full.value.message) == (429, f"Account {GATED} at capacity")
        assert full.value.retry_after == RETRY_AFTER
        # A Retry-After over the client's max_wait is the caller's to honour: raised at once.
        counting = Counting()
        patient = Retries(attempts=3, max_wait=RETRY_AFTER - 1)
        other = Client(server.url, server.token, retries=patient, transport=counting)
        with other, pytest.raises(RateLimited):
            other.submit("one too many", account=GATED, **full_body)
        assert len(counting.sent) == 1
    finally:
        client.cancel(jobid)


def test_connection_refused_is_connection_failed() -> None:
    port = free_port()
    nobody = Client(f"http://127.0.0.1:{port}", "t", retries=Retries(attempts=1, backoff=0.01))
    with nobody, pytest.raises(ConnectionFailed) as refused:
        nobody.models()
    where = f"http://127.0.0.1:{port}/v1/dreamina/models"
    assert str(refused.value).startswith(f"Cannot reach {where}: ")
    assert isinstance(refused.value.__cause__, httpx.ConnectError)


class Flaky(httpx.HTTPTransport):
    """The real transport, but the first POST /images either loses its reply (sent to the
    server, then the connection drops: the server made the job, the client never saw it) or is
    answered 503 by a proxy in front; every POST's Idempotency-Key is recorded."""

    def __init__(self, fault: str) -> None:
        super().__init__()
        self.fault = fault
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or request.url.path != "/v1/dreamina/images":
            return super().handle_request(request)
        self.keys.append(request.headers.get("idempotency-key"))
        if len(self.keys) > 1:
            return super().handle_request(request)
        if self.fault == "503":
            unavailable = {"error": "Service unavailable"}
            return httpx.Response(503, json=unavailable, headers={"Retry-After": "0"})
        response = super().handle_request(request)
        response.read()
        raise httpx.ReadError("connection dropped", request=request)


@pytest.mark.parametrize("fault", ["dropped", "503"])
def test_a_retried_submission_makes_one_job(server: Server, client: Client, fault: str) -> None:
    flaky = Flaky(fault)
    prompt = f"retried {fault} {uuid.uuid4()}"
    fast = Retries(attempts=2, backoff=0.01)
    with Client(server.url, server.token, retries=fast, transport=flaky) as retrying:
        record = retrying.submit(prompt, **SMALL, count=1)
    assert len(flaky.keys) == 2
    assert flaky.keys[0] is not None
    assert flaky.keys[0] == flaky.keys[1]
    same = [
        job for job in client.jobs(model="nano-banana") if job["request"].get("prompt") == prompt
    ]
    assert [job["jobid"] for job in same] == [record["jobid"]]
    client.wait(record["jobid"], 120)


class AsyncFlaky(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str | None] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/dreamina/images/upscale":
            self.keys.append(request.headers.get("idempotency-key"))
            if len(self.keys) == 1:
                response = await super().handle_async_request(request)
                await response.aread()
                raise httpx.RemoteProtocolError("server disconnected", request=request)
        return await super().handle_async_request(request)


@pytest.mark.anyio
async def test_a_retried_async_upscale_makes_one_job(server: Server, client: Client) -> None:
    source = client.wait(client.submit("upscaled once", **SMALL, count=1)["jobid"], 120)
    flaky = AsyncFlaky()
    fast = Retries(attempts=2, backoff=0.01)
    async with AsyncClient(server.url, server.token, retries=fast, transport=flaky) as retrying:
        record = await retrying.upscale(source["jobid"], resolution="2k", idempotency_key="mine")
        await retrying.wait(record["jobid"], 120)
    assert flaky.keys == ["mine", "mine"]
    upscales = [
        job["jobid"]
        for job in client.jobs(model="nano-banana")
        if job["type"] == "upscale" and job["request"]["jobid"] == source["jobid"]
    ]
    assert upscales == [record["jobid"]]


# The client in a process where the server's libraries cannot be imported.
WITHOUT_THE_SERVER = textwrap.dedent(
    """
    import sys

    REFUSED = {"fastapi", "starlette", "sqlalchemy", "uvicorn", "procrastinate", "psycopg",
               "PIL", "numpy", "alembic", "orjson"}


    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in REFUSED:
                # as a package that is not installed is missing
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, Refuse())

    import contextlib
    import io

    from dreamserve.__main__ import main
    from dreamserve.client import Client

    url, token, out = sys.argv[1:4]
    with Client(url, token) as client:
        record = client.wait(client.submit("light", model="nano-banana", count=1)["jobid"], 120)
        path = client.download(record["response"]["images"][0], out)
        print("client", record["jobid"], record["status"], path.stat().st_size > 0)
    # The `dreamserve` command: the client's commands run, the server's say what is missing.
    status = main(["jobs", "--server", url, "--token", token, "--limit", "1"])
    print("cli", status)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        status = main(["serve"])
    print("serve", status, errors.getvalue().strip())
    helped = io.StringIO()
    with contextlib.redirect_stdout(helped), contextlib.suppress(SystemExit):
        main(["--help"])
    print("help", " ".join(helped.getvalue().split()[-3:]))
    print("loaded", sorted(REFUSED & {name.split(".")[0] for name in sys.modules}))
    """
)


def test_the_client_runs_without_the_servers_libraries(server: Server, tmp_path: Path) -> None:
    script = tmp_path / "light.py"
    script.write_text(WITHOUT_THE_SERVER)
    env = {"PYTHONPATH": ":".join(python_path()), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, str(script), server.url, server.token or "", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    _, jobid, status, saved = lines[0].split(" ")
    assert (status, saved) == ("completed", "True")
    assert lines[1].split("\t")[:4] == [jobid, "image", "nano-banana", "completed"]
    assert lines[2:] == [
        "cli 0",
        "serve 1 dreamserve: serve is a server command, and the server is not installed here "
        "(sqlalchemy is missing): pip install 'dreamserve[server]'",
        "help pip install 'dreamserve[server]'",
        "loaded []",
    ]
