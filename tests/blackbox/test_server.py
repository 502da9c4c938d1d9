"""Black-box: `make run` exactly as the README says, in a fresh data dir, driven over real HTTP."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SEED_BODY = {
    "prompt": "A stunning aurora borealis over a frozen lake at midnight",
    "model": "seedream-4.0",
    "ratio": "16:9",
    "resolution": "2k",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`make run` in its own process group, its output collected line by line."""

    def __init__(self, data_dir: Path, port: int, database_url: str | None = None) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE_")}
        env |= {"DREAMSERVE_DATA_DIR": str(data_dir), "DREAMSERVE_PORT": str(port)}
        if database_url is not None:
            env["DREAMSERVE_DATABASE_URL"] = database_url
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.process = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(120):
            self.stop(signal.SIGKILL)
            raise AssertionError("server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "Uvicorn running on" in line:  # after startup: the socket is listening
                self.ready.set()

    @property
    def token(self) -> str | None:
        found = re.search(
            r"API token for user 1 \(shown only now; keep it\): (\S+)", "".join(self.lines)
        )
        return found.group(1) if found else None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        os.killpg(self.process.pid, sig)
        self.process.wait(30)
        self.reader.join(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "fresh-data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    running = Server(data_dir, free_port())
    yield running
    if running.process.poll() is None:
        running.stop()


def wait_completed(client: httpx.Client, jobid: str, seconds: float = 180) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reply = client.get(f"/v1/dreamina/images/{jobid}")
        assert reply.status_code == 200, reply.text
        if reply.json()["status"] != "created":
            return dict(reply.json())
        time.sleep(0.5)
    raise AssertionError(f"job {jobid} not finished after {seconds}s")


def test_the_seed_request_end_to_end(server: Server, data_dir: Path) -> None:
    token = server.token
    assert token is not None, "the first start prints a token"
    assert f"curl -X POST {server.url}/v1/dreamina/images" in "".join(server.lines)
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


def test_jobs_survive_a_kill(data_dir: Path, database_url: str | None) -> None:
    """Slots filled with slow 4k jobs, SIGKILL, start again: every job reaches a terminal
    state, none is lost, and every account's slot count is back to zero. On both databases."""
    server = Server(data_dir, free_port(), database_url)
    token = server.token or ""
    headers = {"Authorization": f"Bearer {token}"}
    slow = {**SEED_BODY, "resolution": "4k", "ratio": "21:9", "count": 1}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        account = {"account": "LOCAL:kill", "engine": "procedural", "maxJobs": 3}
        assert client.post("/v1/dreamina/accounts", json=account).status_code == 200
        jobids = []
        for _ in range(3):
            reply = client.post("/v1/dreamina/images", json={**slow, "account": "LOCAL:kill"})
            jobids.append(reply.json()["jobid"])
        full = client.post("/v1/dreamina/images", json={**slow, "account": "LOCAL:kill"})
        assert (full.status_code, full.json()) == (429, {"error": "Account LOCAL:kill at capacity"})
        shared = {**slow, "account": "LOCAL:procedural", "count": 2}
        jobids += [client.post("/v1/dreamina/images", json=shared).json()["jobid"] for _ in "ab"]
        deadline = time.monotonic() + 60
        while client.get(f"/v1/dreamina/images/{jobids[0]}").json().get("progress", 0) < 5:
            assert time.monotonic() < deadline, "the job never made progress"
            time.sleep(0.2)
        running = client.get("/v1/dreamina/accounts").json()
        assert {name: a["running"] for name, a in running.items()} == {
            "LOCAL:procedural": 2,
            "LOCAL:kill": 3,
        }
    server.stop(signal.SIGKILL)

    again = Server(data_dir, free_port(), database_url)
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
            }
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
