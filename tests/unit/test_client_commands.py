"""The client's commands' own rules that need no server (httpx's MockTransport where a server
answers): a bad flag is argparse's usage error (status 2, a message naming the flag), never a
traceback; a broken event stream falls back to waiting for the job."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dreamserve.client import Client, cli


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["jobs", "--limit", "-1"], "argument --limit: must be above 0: '-1'"),
        (["jobs", "--limit", "0"], "argument --limit: must be above 0: '0'"),
        (["jobs", "--limit", "many"], "argument --limit: not a number: 'many'"),
        (["jobs", "--watch", "--interval", "-1"], "argument --interval: must be above 0: '-1'"),
        (["jobs", "--watch", "--interval", "0"], "argument --interval: must be above 0: '0'"),
    ],
)
def test_a_bad_number_is_a_usage_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ended:
        cli.main([*args, "--server", "http://127.0.0.1:9"])
    assert ended.value.code == 2
    error = capsys.readouterr().err
    assert error.splitlines()[-1] == f"dreamserve jobs: error: {message}"


class Broken(httpx.SyncByteStream):
    """An event stream that sends one event, then loses its connection."""

    def __iter__(self) -> Iterator[bytes]:
        yield b'event: progress\ndata: {"jobid": "j1", "status": "created", "progress": 10}\n\n'
        raise httpx.ReadError("connection reset")


def test_generate_waits_for_the_job_when_its_event_stream_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    image = {"imageUrl": "/v1/dreamina/files/x.png?signature=s", "itemId": "1", "format": "png"}
    record: dict[str, Any] = {"jobid": "j1", "type": "image", "status": "created"}
    record |= {"model": "m", "request": {}, "response": {}}
    done = record | {"status": "completed", "response": {"images": [image]}}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(200, json=record)
        if request.url.path.endswith("/events"):
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, stream=Broken()
            )
        if request.url.path == "/v1/dreamina/images/j1":
            return httpx.Response(200, json=done)
        return httpx.Response(200, content=b"png bytes")

    transport = httpx.MockTransport(answer)
    monkeypatch.setattr(
        cli, "Client", lambda url, token: Client(url, token, retries=0, transport=transport)
    )
    status = cli.main(["generate", "x", "--server", "http://dream.test", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out == f"{tmp_path / '1.png'}\n"
    assert (tmp_path / "1.png").read_bytes() == b"png bytes"


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("http://[::1", "dreamserve: Invalid server URL 'http://[::1': Invalid port: ':1'"),
        (
            "127.0.0.1:8000",
            "dreamserve: Invalid server URL '127.0.0.1:8000': it must start with http:// or https://",
        ),
    ],
)
def test_a_bad_server_url_is_said_not_a_traceback(
    server: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["jobs", "--server", server]) == 1
    assert capsys.readouterr().err == f"{message}\n"


def test_an_unusable_out_dir_is_said_before_any_job_is_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(500, json={"error": "not reached"})

    transport = httpx.MockTransport(answer)
    monkeypatch.setattr(cli, "Client", lambda url, token: Client(url, token, transport=transport))
    file = tmp_path / "a file"
    file.write_text("")
    status = cli.main(["generate", "x", "--server", "http://dream.test", "--out", str(file / "x")])
    assert status == 1
    assert capsys.readouterr().err.startswith("dreamserve: [Errno 20] Not a directory: ")
    assert sent == []


def test_ctrl_c_during_a_submission_that_was_refused_ends_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while the submission is under way: the command asks again with the same key to
    find the job to cancel; a refusal (every account busy) means no job was made: 130, as any
    Ctrl-C, with nothing to cancel, not the refusal's message and 1."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) == 1:
            raise KeyboardInterrupt  # pressed while the first try was on its way
        return httpx.Response(429, json={"error": "All accounts at capacity"})

    transport = httpx.MockTransport(answer)
    monkeypatch.setattr(
        cli, "Client", lambda url, token: Client(url, token, retries=0, transport=transport)
    )
    status = cli.main(["generate", "x", "--server", "http://dream.test", "--out", str(tmp_path)])
    assert status == 130
    assert [request.method for request in sent] == ["POST", "POST"]
    assert sent[0].headers["idempotency-key"] == sent[1].headers["idempotency-key"]
    assert "All accounts at capacity" not in capsys.readouterr().err


def test_the_jobs_table_never_cuts_a_job_id() -> None:
    """On an 80-column terminal the job id (55 characters here) is folded, not cut to
    `j1207…`: every character of it is in the table, for `upscale`."""
    from rich.console import Console

    jobid = "j1207054544123456789i-u1-LOCAL:procedural-bot:dreamina"
    record: dict[str, Any] = {"jobid": jobid, "type": "image", "model": "seedream-4.6"}
    record |= {"status": "completed", "created": "2026-12-07T05:45:44.123Z"}
    record |= {"request": {}, "response": {"images": [{}, {}]}}
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(cli._table([record]))  # type: ignore[list-item]
    text = console.export_text()
    assert "…" not in text
    cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    assert "".join(cells) == jobid  # the lines of its cell, joined


def test_jobs_watch_into_a_pipe_prints_each_jobs_line_when_it_changes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not on a terminal, `jobs --watch` is a log: each job's line once, then again when it
    changes; nothing for a look that found no change; 0 at Ctrl-C."""
    base: dict[str, Any] = {"type": "image", "model": "m", "request": {}, "response": {}}
    base |= {"created": "2026-12-07T06:00:00Z"}
    one = base | {
        "jobid": "j1",
        "status": "created",
        "progress": 10,
        "started": "2026-12-07T06:00:01Z",
    }
    two = base | {"jobid": "j2", "status": "created"}
    looks = [
        [two, one],  # newest first, as GET /images lists them
        [two, one],
        [two, one | {"progress": 60}],
        [two | {"status": "completed", "response": {"images": [{}]}}, one | {"progress": 60}],
    ]

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"jobs": looks.pop(0), "next": None})

    def sleep(seconds: float) -> None:
        assert seconds == 2.0
        if not looks:
            raise KeyboardInterrupt

    transport = httpx.MockTransport(answer)
    monkeypatch.setattr(
        cli, "Client", lambda url, token: Client(url, token, retries=0, transport=transport)
    )
    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.main(["jobs", "--watch", "--server", "http://dream.test"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] + " " + line.split("\t")[-1] for line in lines] == [
        "j1 running 10%",
        "j2 waiting to start",
        "j1 running 60%",
        "j2 1 image",
    ]
