"""Black-box: `make run` exactly as the README says, in a fresh data dir, driven over real HTTP."""

from __future__ import annotations

import io
import os
import re
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from receiver import Answer, receiving
from servers import ROOT, Server, server_pid, serving, wait_completed
from standardwebhooks import Webhook
from support import free_port
from upstreams import KEY, fake_upstream

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(300)]

SEED_BODY = {
    "prompt": "A stunning aurora borealis over a frozen lake at midnight",
    "model": "seedream-4.0",
    "ratio": "16:9",
    "resolution": "2k",
}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "fresh-data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    with serving(data_dir, free_port()) as running:
        yield running


def test_the_seed_request_end_to_end(server: Server, data_dir: Path) -> None:
    token = server.token
    assert token is not None, "the first start prints a token"
    assert f"curl -X POST {server.url}/v1/dreamina/images" in "".join(server.lines)
    # Before the first job, the routing: which accounts serve each model.
    assert "model seedream-4.0: LOCAL:procedural\n" in server.lines
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        created = client.post("/v1/dreamina/images", json=SEED_BODY)
        assert created.status_code == 200, created.text
        assert created.json()["status"] == "created"
        record = wait_completed(client, created.json()["jobid"])
    assert record["status"] == "completed", record
    images = record["response"]["images"]
    assert len(images) == 4
    with httpx.Client(timeout=30) as anonymous:  # no Authorization header
        for image in images:
            reply = anonymous.get(image["imageUrl"])
            assert reply.status_code == 200
            assert reply.headers["content-type"] == "image/jpeg"
            assert int(reply.headers["content-length"]) == len(reply.content)
            decoded = Image.open(io.BytesIO(reply.content))
            decoded.load()
            assert (decoded.format, decoded.size) == ("JPEG", (2560, 1440))
            assert (image["width"], image["height"], image["format"]) == (2560, 1440, "jpeg")
            assert (data_dir / "blobs" / image["imageUri"]).is_file()

    # A second start reuses the data dir: no new token, the old one still works.
    server.stop()
    # The access log shows each download without the signature that would fetch it again.
    downloads = [line for line in server.lines if "GET /v1/dreamina/files/" in line]
    assert len(downloads) == 4, "".join(server.lines)
    assert all("?expires=" in line and "signature" not in line for line in downloads)
    again = Server(data_dir, free_port())
    try:
        assert again.token is None
        with httpx.Client(base_url=again.url, headers=headers, timeout=30) as client:
            later = client.get(f"/v1/dreamina/images/{record['jobid']}").json()
        assert later["status"] == "completed"
        assert [i["assetRef"] for i in later["response"]["images"]] == [
            i["assetRef"] for i in images
        ]
    finally:
        again.stop()


@pytest.mark.both_databases
def test_jobs_survive_a_kill(data_dir: Path, database_url: str | None) -> None:
    """Slots filled with jobs held running (their upstream does not answer yet), SIGKILL, start
    again: every job reaches a terminal state, none is lost, and every account's slot count is
    back to zero. On both databases."""
    allow = {"DREAMSERVE_UPSTREAM_ALLOW_PRIVATE": "true"}
    with fake_upstream() as fake:
        fake.answering.clear()
        server = Server(data_dir, free_port(), database_url, allow)
        headers = {"Authorization": f"Bearer {server.token}"}
        body = {**SEED_BODY, "count": 1}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            for name, cap in (("LOCAL:kill", 3), ("LOCAL:other", 2)):
                account = {"account": name, "engine": "openai", "maxJobs": cap}
                settings = {"apiKey": KEY, "baseUrl": fake.url, "model": "gpt-image-2"}
                reply = client.post("/v1/dreamina/accounts", json={**account, "settings": settings})
                assert reply.status_code == 200, reply.text
            jobids = []
            for _ in range(3):
                reply = client.post("/v1/dreamina/images", json={**body, "account": "LOCAL:kill"})
                jobids.append(reply.json()["jobid"])
            full = client.post("/v1/dreamina/images", json={**body, "account": "LOCAL:kill"})
            assert (full.status_code, full.json()) == (
                429,
                {"error": "Account LOCAL:kill at capacity"},
            )
            other = {**body, "account": "LOCAL:other", "count": 2}
            jobids += [client.post("/v1/dreamina/images", json=other).json()["jobid"] for _ in "ab"]
            deadline = time.monotonic() + 60
            while len(fake.calls("/images/generations")) < 5:  # every job is in its engine
                assert time.monotonic() < deadline, "the jobs never reached their engine"
                time.sleep(0.1)
            running = client.get("/v1/dreamina/accounts").json()
            assert {name: a["running"] for name, a in running.items()} == {
                "LOCAL:procedural": 0,
                "LOCAL:kill": 3,
                "LOCAL:other": 2,
            }
        server.stop(signal.SIGKILL)
        fake.answering.set()

        again = Server(data_dir, free_port(), database_url, allow)
        try:
            with httpx.Client(base_url=again.url, headers=headers, timeout=30) as client:
                for jobid in jobids:
                    record = wait_completed(client, jobid, seconds=240)
                    assert record["status"] == "completed", record
                assert client.get("/v1/dreamina/scheduler").json() == {"executing": {}, "total": 0}
                accounts = client.get("/v1/dreamina/accounts").json()
                assert {name: a["running"] for name, a in accounts.items()} == {
                    "LOCAL:procedural": 0,
                    "LOCAL:kill": 0,
                    "LOCAL:other": 0,
                }
        finally:
            again.stop()


def test_sigterm_with_an_open_event_stream_exits_within_the_shutdown_bound(
    data_dir: Path,
) -> None:
    """A job held in its engine (the upstream does not answer) and a client following its event
    stream: SIGTERM ends the stream with the record as it is, and the server exits well within
    DREAMSERVE_SHUTDOWN_SECONDS plus a little, instead of waiting for the job."""
    bound = 2
    extra = {"DREAMSERVE_UPSTREAM_ALLOW_PRIVATE": "true", "DREAMSERVE_SHUTDOWN_SECONDS": str(bound)}
    with fake_upstream() as fake:
        fake.answering.clear()
        server = Server(data_dir, free_port(), None, extra)
        try:
            headers = {"Authorization": f"Bearer {server.token}"}
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
                account = {"account": "LOCAL:held", "engine": "openai", "maxJobs": 1}
                settings = {"apiKey": KEY, "baseUrl": fake.url, "model": "gpt-image-2"}
                reply = client.post("/v1/dreamina/accounts", json={**account, "settings": settings})
                assert reply.status_code == 200, reply.text
                body = {**SEED_BODY, "count": 1, "account": "LOCAL:held"}
                jobid = client.post("/v1/dreamina/images", json=body).json()["jobid"]
                deadline = time.monotonic() + 30
                while not fake.calls("/images/generations"):  # the job is in its engine
                    assert time.monotonic() < deadline, "the job never reached its engine"
                    time.sleep(0.05)
                lines: list[str] = []
                with client.stream("GET", f"/v1/dreamina/images/{jobid}/events") as stream:
                    chunks = stream.iter_lines()
                    while not lines or lines[-1] != "":  # the first event, whole
                        lines.append(next(chunks))
                    signalled = time.monotonic()
                    os.killpg(server.process.pid, signal.SIGTERM)
                    lines += list(chunks)  # until the server ends the stream
                server.process.wait(bound + 10)
                took = time.monotonic() - signalled
        finally:
            fake.answering.set()
            if server.process.poll() is None:
                server.stop(signal.SIGKILL)
            else:
                server.reader.join(10)
                assert server.process.stdout is not None
                server.process.stdout.close()
    # Far below what waiting for the job would take (it never ends: the upstream does not
    # answer); the slack is for a loaded machine, where the exit (coverage writing its data
    # included) took more than 1.5 s.
    assert took < bound + 5, took
    assert "Application shutdown complete." in "".join(server.lines), "".join(server.lines)
    assert lines[0] == "event: progress"
    assert [line for line in lines if line.startswith("event:")][-1] == "event: progress"


def tried(client: httpx.Client, jobid: str) -> bool:
    """Whether the job's webhook has a try on record."""
    [delivery] = client.get(f"/v1/dreamina/images/{jobid}/webhooks").json()["deliveries"]
    return bool(delivery["tries"])


@pytest.mark.both_databases
def test_pending_webhooks_are_delivered_after_a_kill(
    data_dir: Path, database_url: str | None
) -> None:
    """A receiver down (503) while jobs end; the server is SIGKILLed with the deliveries
    pending; the receiver comes back; the restarted server delivers each, signed, once."""
    allow = {"DREAMSERVE_WEBHOOK_ALLOW_PRIVATE": "true"}
    server = Server(data_dir, free_port(), database_url, allow)
    headers = {"Authorization": f"Bearer {server.token}"}
    with receiving(Answer(503, b"deploying")) as receiver:
        try:  # killed in the end, as a crash would; also when a check fails
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
                secret = client.get("/v1/dreamina/webhooks/secret").json()["secret"]
                body = {"prompt": "a quick one", "model": "nano-banana", "ratio": "1:1", "count": 1}
                jobids = [
                    client.post(
                        "/v1/dreamina/images", json={**body, "replyUrl": f"{receiver.url}/{n}"}
                    ).json()["jobid"]
                    for n in range(3)
                ]
                for jobid in jobids:
                    wait_completed(client, jobid)
                # Killed once the server recorded each first try (the receiver having answered
                # is not enough: a kill before the record leaves a try that never was).
                deadline = time.monotonic() + 30
                for jobid in jobids:
                    while not tried(client, jobid):
                        assert time.monotonic() < deadline, "the first tries never came"
                        time.sleep(0.1)
        finally:
            server.stop(signal.SIGKILL)
        receiver.default = Answer(200)

        again = Server(data_dir, free_port(), database_url, allow)
        try:
            deadline = time.monotonic() + 60  # the second try is due 5 s (+-20%) after the first
            with httpx.Client(base_url=again.url, headers=headers, timeout=30) as client:
                for jobid in jobids:
                    while True:
                        listed = client.get(f"/v1/dreamina/images/{jobid}/webhooks").json()
                        [delivery] = listed["deliveries"]
                        if delivery["status"] != "pending":
                            break
                        assert time.monotonic() < deadline, f"{receiver.count()} tries arrived"
                        time.sleep(0.1)
                    # Each ended with its 200, after the 503 before the kill: nothing more comes.
                    assert delivery["status"] == "delivered"
                    assert [t["statusCode"] for t in delivery["tries"]] == [503, 200]
            assert receiver.count() == 6
            for n, jobid in enumerate(jobids):
                tries = [each for each in receiver.received if each.path == f"/{n}"]
                assert len(tries) == 2
                assert tries[0].headers["webhook-id"] == tries[1].headers["webhook-id"]
                payload = Webhook(secret).verify(tries[1].body, tries[1].headers)
                assert payload["jobid"] == jobid
                assert payload["status"] == "completed"
        finally:
            again.stop()


def test_a_second_server_on_the_same_data_dir_stops_at_once(server: Server, data_dir: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE_")}
    env |= {"DREAMSERVE_DATA_DIR": str(data_dir), "DREAMSERVE_PORT": str(free_port())}
    second = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "dreamserve"), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert second.stderr.strip() == (
        "dreamserve: Another dreamserve server runs the jobs of this database: run one server "
        "per data directory (or database)"
    )
    with httpx.Client(base_url=server.url, timeout=30) as client:  # the first one is unharmed
        assert client.get("/v1/dreamina/images/x").status_code == 401


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def post_huge(port: int, token: str, total: int, chunked: bool) -> tuple[int, bytes, int]:
    """POST `total` bytes to the upload endpoint a megabyte at a time, stopping as soon as the
    server answers; the status and body of its answer, and how many bytes went out."""
    head = (
        "POST /v1/dreamina/assets/LOCAL:procedural HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: image/png\r\n"
        + ("Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n")
    )
    chunk = os.urandom(1 << 20)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        sent = 0
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(framed)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 20:
            part = sock.recv(65536)
            if not part:
                break
            answer += part
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2], sent


def test_a_200_mb_upload_is_refused_with_flat_memory(server: Server) -> None:
    """Declared or streamed, 200 MB never enter memory: the upload stops at the 10 MB limit."""
    token = server.token or ""
    port = int(server.url.rpartition(":")[2])
    pid = server_pid(server)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/v1/dreamina/models", headers={"Authorization": f"Bearer {token}"})
    before = peak_rss_kib(pid)
    expected = b'{"error":"Image is too large (limit 10485760 bytes)"}'
    for chunked in (False, True):
        status, body, sent = post_huge(port, token, 200 * 1024 * 1024, chunked)
        assert (status, body) == (400, expected)
        assert sent < 64 * 1024 * 1024  # the server answered long before the end
    grown_mib = (peak_rss_kib(pid) - before) / 1024
    print(f"peak RSS grew {grown_mib:.1f} MiB over two 200 MB uploads")
    assert grown_mib < 64  # a 10 MB buffer and change; holding the body would be 200+
    assert not (Path(server.data_dir) / "blobs" / "uploads").exists()


def test_upload_generate_with_the_reference_upscale_and_download(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.token}"}
    buffer = io.BytesIO()
    gradient = Image.linear_gradient("L").resize((640, 360)).convert("RGB")
    gradient.save(buffer, "JPEG")
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        uploaded = client.post(
            "/v1/dreamina/assets/LOCAL:procedural",
            content=buffer.getvalue(),
            headers={"Content-Type": "image/jpeg"},
        )
        assert uploaded.status_code == 200, uploaded.text
        ref = uploaded.json()["assetRef"]
        body = {"prompt": "from my picture", "imageRef_1": ref, "imageStrength": 0.8, "count": 1}
        created = client.post("/v1/dreamina/images", json=body)
        assert created.status_code == 200, created.text
        assert created.json()["request"]["inputMode"] == "reference"
        record = wait_completed(client, created.json()["jobid"])
        assert record["status"] == "completed", record
        image = record["response"]["images"][0]
        assert (image["width"], image["height"]) == (2560, 1440)  # auto: nearest 16:9
        upscale = client.post(
            "/v1/dreamina/images/upscale",
            json={"jobid": record["jobid"], "upscaleResolution": "4k"},
        )
        assert upscale.status_code == 200, upscale.text
        assert upscale.json()["type"] == "upscale"
        done = wait_completed(client, upscale.json()["jobid"])
    assert done["status"] == "completed", done
    [large] = done["response"]["images"]
    with httpx.Client(timeout=30) as anonymous:
        reply = anonymous.get(large["imageUrl"])
    assert reply.status_code == 200
    decoded = Image.open(io.BytesIO(reply.content))
    decoded.load()
    assert (decoded.format, decoded.size) == ("JPEG", (5404, 3040))


TINY_CONFIG = """
[sizes.tiny.1k]
"1:1" = "64x64"
"16:9" = "112x64"

[[models]]
name = "tiny-sd"
resolutions = ["1k"]
sizes = "tiny"
max_refs = 1
prompt_required = true
auto_ratio = false

[[accounts]]
account = "LOCAL:gpu0"
engine = "diffusers"
maxJobs = 1
settings = {{ model = "{model}", models = ["tiny-sd"], device = "cpu", steps = 2 }}
"""


def test_a_diffusers_model_from_the_config_file_serves_jobs(data_dir: Path, tmp_path: Path) -> None:
    """An operator's open model, end to end: the config file declares the model and a shared
    diffusers account; the server loads the pipeline from disk on the first job."""
    pytest.importorskip("diffusers")
    from tiny_pipeline import build_tiny_pipeline

    model = tmp_path / "tiny-sd"
    build_tiny_pipeline(model)
    config = tmp_path / "dreamserve.toml"
    config.write_text(TINY_CONFIG.format(model=model))
    server = Server(data_dir, free_port(), extra={"DREAMSERVE_CONFIG": str(config)})
    try:
        headers = {"Authorization": f"Bearer {server.token}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            # The file declares accounts: no placeholder LOCAL:procedural to stand in for the
            # GPU, so a job that names no account goes to LOCAL:gpu0.
            assert list(client.get("/v1/dreamina/accounts").json()) == ["LOCAL:gpu0"]
            body = {"prompt": "a lighthouse", "model": "tiny-sd", "ratio": "16:9", "count": 2}
            created = client.post("/v1/dreamina/images", json=body)
            assert created.status_code == 200, created.text
            assert "-LOCAL:gpu0-bot:dreamina" in created.json()["jobid"]
            record = wait_completed(client, created.json()["jobid"])
            assert record["status"] == "completed", record
            shown = client.get("/v1/dreamina/accounts/LOCAL:gpu0").json()
        assert shown["engine"] == "diffusers"
        assert shown["models"] == {"image": ["tiny-sd"]}
        assert shown["details"] == {
            "kind": "diffusers",
            "model": str(model),
            "device": "cpu",
            "dtype": "float32",
            "loaded": "StableDiffusionPipeline",
        }
        with httpx.Client(timeout=30) as anonymous:
            for image in record["response"]["images"]:
                reply = anonymous.get(image["imageUrl"])
                decoded = Image.open(io.BytesIO(reply.content))
                assert (decoded.format, decoded.size) == ("JPEG", (112, 64))
    finally:
        server.stop()
