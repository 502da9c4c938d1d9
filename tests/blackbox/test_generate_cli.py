"""Black-box: the client's commands (`dreamserve generate`, `jobs`, `upscale`) as subprocesses
against a real `dreamserve serve`: images saved and their paths printed, progress on stderr,
references uploaded, the server's errors as they are, Ctrl-C cancelling the job."""

from __future__ import annotations

import io
import os
import pty
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from client_server import DREAMSERVE, GATED, client_server, command_environment, eventually
from PIL import Image
from servers import Server

from dreamserve.client import BadRequest, Client

pytestmark = [pytest.mark.blackbox, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with client_server(tmp_path_factory.mktemp("commands")) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, server.token) as opened:
        yield opened


def dreamserve(
    server: Server, args: Sequence[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DREAMSERVE, *args],
        cwd=cwd,
        env=env or command_environment(server),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def decoded(path: Path) -> Image.Image:
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.load()
    return image


def test_generate_saves_the_images_and_prints_their_paths(
    server: Server, client: Client, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["generate", "a lighthouse", "--model", "nano-banana", "--ratio", "16:9"]
    done = dreamserve(server, [*args, "--count", "2", "--seed", "7", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert len(paths) == 2
    assert all(path.parent == out for path in paths)
    assert [decoded(path).size for path in paths] == [(1344, 768), (1344, 768)]
    # Progress on stderr: the job, then the bar's last state.
    lines = done.stderr.splitlines()
    assert lines[0].startswith("job j")
    jobid = lines[0].removeprefix("job ")
    assert lines[-1].startswith("generating ")
    assert lines[-1].endswith(" 100% completed, 2 images")
    record = client.get(jobid)
    assert record["request"]["prompt"] == "a lighthouse"
    assert [image["seed"] for image in record["response"]["images"]] == [7, 8]
    assert sorted(path.name for path in paths) == sorted(
        f"{image['itemId']}.jpg" for image in record["response"]["images"]
    )
    # A client command opens no database: the directory it ran in holds only what it saved.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_generate_uploads_its_references(server: Server, client: Client, tmp_path: Path) -> None:
    # A name longer than a line, that rich would read as markup: printed as it is.
    reference = tmp_path / f"sketch [bold]{'x' * 80}.png"
    Image.new("RGB", (320, 240), "crimson").save(reference)
    args = ["generate", "--model", "seedream-4.0", "--count", "1", "--ref", str(reference)]
    done = dreamserve(server, [*args, "--out", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    # Only LOCAL:procedural serves seedream-4.0 here: the reference goes there, and so the job.
    assert lines[0] == f"uploaded {reference} to LOCAL:procedural"
    jobid = lines[1].removeprefix("job ")
    record = client.get(jobid)
    assert record["request"]["inputMode"] == "reference"
    assert record["request"]["imageRef_1"].startswith("LOCAL:procedural-image:w320:h240:")
    [path] = [Path(line) for line in done.stdout.splitlines()]
    assert decoded(path).size == (2304, 1728)  # auto: the 4:3 of the reference, at 2k


def test_generate_prints_the_servers_error(server: Server, client: Client, tmp_path: Path) -> None:
    with pytest.raises(BadRequest) as expected:
        client.submit("x", model="no-such-model")
    done = dreamserve(server, ["generate", "x", "--model", "no-such-model"], tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"dreamserve: {expected.value.message}\n"

    env = command_environment(server) | {"DREAMSERVE_TOKEN": "user:1-" + "x" * 30}
    done = dreamserve(server, ["generate", "x"], tmp_path, env)
    assert (done.returncode, done.stderr) == (1, "dreamserve: Unauthorized\n")
    # --server and --token win over the environment.
    args = ["jobs", "--server", server.url, "--token", "user:2-" + "y" * 30]
    done = dreamserve(server, args, tmp_path)
    assert (done.returncode, done.stderr) == (1, "dreamserve: Unauthorized\n")


def test_ctrl_c_cancels_the_job(server: Server, client: Client, tmp_path: Path) -> None:
    tag = f"interrupted {uuid.uuid4()}"
    args = ["generate", tag, "--model", "tiny", "--ratio", "1:1", "--account", GATED]
    process = subprocess.Popen(
        [*DREAMSERVE, *args, "--count", "1"],
        cwd=tmp_path,
        env=command_environment(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal sends it, even where this test runs with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:

        def running() -> list[str]:
            executing = client.scheduler()["executing"].get(GATED, [])
            return [
                job["jobid"]
                for job in executing
                if client.get(job["jobid"])["request"]["prompt"] == tag
            ]

        eventually(lambda: bool(running()), "the job ran")
        [jobid] = running()
        eventually(lambda: "started" in client.get(jobid), "the engine had the job")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 130, stderr
    assert stdout == ""
    assert f"dreamserve: cancelled job {jobid}\n" in stderr
    record = client.get(jobid)
    assert (record["status"], record["error"]) == ("failed", "Cancelled by user")


class HoldingProxy(ThreadingHTTPServer):
    """A 127.0.0.1 proxy in front of the server that holds the reply to the first POST /images
    (the job made, its id not yet with the client) until `release` is set; the rest pass."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.held = threading.Event()  # the first submission's reply is being held
        self.release = threading.Event()
        self.submissions: list[str | None] = []  # their Idempotency-Keys
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    server: HoldingProxy

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def do_DELETE(self) -> None:
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        reply = httpx.request(
            self.command,
            self.server.upstream + self.path,
            headers=headers,
            content=body,
            timeout=60,
        )
        if self.command == "POST" and self.path == "/v1/dreamina/images":
            self.server.submissions.append(self.headers.get("Idempotency-Key"))
            if len(self.server.submissions) == 1:
                self.server.held.set()
                self.server.release.wait(60)
        self.send_response(reply.status_code)
        for key, value in reply.headers.items():
            if key.lower() not in HOP_HEADERS | {"content-encoding"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    def log_message(self, format: str, *args: object) -> None:
        pass


HOP_HEADERS = {"connection", "content-length", "host", "transfer-encoding", "keep-alive"}


def test_ctrl_c_while_the_submission_is_answered_cancels_the_job_it_made(
    server: Server, client: Client, tmp_path: Path
) -> None:
    # The server has made the job, but its reply has not reached the command when Ctrl-C comes:
    # the command asks again with the same Idempotency-Key, which names that job, and cancels it.
    proxy = HoldingProxy(server.url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    tag = f"interrupted early {uuid.uuid4()}"
    env = command_environment(server) | {"DREAMSERVE_URL": proxy.url}
    process = subprocess.Popen(
        [*DREAMSERVE, "generate", tag, "--model", "tiny", "--account", GATED, "--count", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proxy.held.wait(60), "the submission never arrived"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        proxy.release.set()
        if process.poll() is None:
            process.kill()
            process.wait(10)
        proxy.shutdown()
        proxy.server_close()
    made = [job for job in client.jobs(model="tiny") if job["request"].get("prompt") == tag]
    assert len(made) == 1, made
    [job] = made
    assert process.returncode == 130, stderr
    assert stdout == ""
    assert f"dreamserve: cancelled job {job['jobid']}\n" in stderr
    assert (job["status"], job["error"]) == ("failed", "Cancelled by user")
    [first, again] = proxy.submissions
    assert first is not None
    assert again == first


def test_a_reader_gone_away_ends_generate_as_a_pipe_does(
    server: Server, client: Client, tmp_path: Path
) -> None:
    # `dreamserve generate ... | head -0`: stdout's reader is gone before the paths are printed.
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [*DREAMSERVE, "generate", "piped", "--model", "seedream-3.0", "--count", "1"],
            cwd=tmp_path,
            env=command_environment(server),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=180,
            check=False,
        )
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE, done.stderr
    assert "Broken pipe" not in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith("job j")


def test_jobs_lists_the_newest_first(server: Server, client: Client, tmp_path: Path) -> None:
    made = [
        client.wait(client.submit(f"listed {n}", model="seedream-3.0", count=1)["jobid"], 120)
        for n in range(2)
    ]
    done = dreamserve(server, ["jobs", "--model", "seedream-3.0", "--limit", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows == [
        [job["jobid"], "image", "seedream-3.0", "completed", job["created"], "1 image"]
        for job in reversed(made)
    ]
    done = dreamserve(server, ["jobs", "--status", "failed", "--model", "seedream-3.0"], tmp_path)
    assert (done.returncode, done.stdout) == (0, "")


def test_jobs_watch_shows_a_table_until_ctrl_c(
    server: Server, client: Client, tmp_path: Path
) -> None:
    newest = client.wait(client.submit("watched", model="seedream-3.0", count=1)["jobid"], 120)
    listed = len([line for line in server.lines if "GET /v1/dreamina/images?" in line])
    # On a terminal (a pseudo-terminal here): into a pipe it prints lines, not a table.
    terminal, its_end = pty.openpty()
    process = subprocess.Popen(
        [*DREAMSERVE, "jobs", "--watch", "--interval", "0.2", "--limit", "1"],
        cwd=tmp_path,
        env=command_environment(server) | {"COLUMNS": "200"},  # the table's width
        stdout=its_end,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(its_end)
    shown = bytearray()
    reader = threading.Thread(target=read_all, args=(terminal, shown), daemon=True)
    reader.start()
    try:
        # Listed twice: the first table, and a refresh.
        eventually(
            lambda: (
                len([line for line in server.lines if "GET /v1/dreamina/images?" in line])
                >= listed + 2
            ),
            "the watch listed the jobs",
        )
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        reader.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        os.close(terminal)
    assert process.returncode == 0, stderr
    stdout = shown.decode()
    assert "jobs, newest first" in stdout
    assert newest["jobid"] in stdout


def read_all(terminal: int, into: bytearray) -> None:
    """What a pseudo-terminal's other end writes, until it closes."""
    while True:
        try:
            part = os.read(terminal, 65536)
        except OSError:  # EIO: the other end is closed (Linux)
            return
        if not part:
            return
        into.extend(part)


def test_upscale_saves_the_bigger_image(server: Server, client: Client, tmp_path: Path) -> None:
    source = client.wait(client.submit("small", model="nano-banana", ratio="1:1", count=2)["jobid"])
    args = [
        "upscale",
        source["jobid"],
        "--index",
        "1",
        "--resolution",
        "2k",
        "--out",
        str(tmp_path),
    ]
    done = dreamserve(server, args, tmp_path)
    assert done.returncode == 0, done.stderr
    [path] = [Path(line) for line in done.stdout.splitlines()]
    assert decoded(path).size == (2048, 2048)
    lines = done.stderr.splitlines()
    record = client.get(lines[0].removeprefix("job "))
    assert record["type"] == "upscale"
    assert record["request"] == {"jobid": source["jobid"], "imageIndex": 1, "resolution": "2k"}
    assert lines[-1].startswith("upscaling ")
    assert lines[-1].endswith(" 100% completed, 1 image")


def test_generate_gives_up_after_its_timeout(
    server: Server, client: Client, tmp_path: Path
) -> None:
    # The job runs until it is cancelled, its progress never changes: --timeout ends the
    # command while the progress bar follows the job's event stream.
    tag = f"timed out {uuid.uuid4()}"
    args = ["generate", tag, "--model", "tiny", "--account", GATED, "--count", "1"]
    done = subprocess.run(
        [*DREAMSERVE, *args, "--timeout", "1"],
        cwd=tmp_path,
        env=command_environment(server),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    jobid = done.stderr.splitlines()[0].removeprefix("job ")
    try:
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr.splitlines()[-1] == f"dreamserve: Job {jobid} still created after 1 s"
    finally:
        client.cancel(jobid)
