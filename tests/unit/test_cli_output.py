"""What the `dreamserve` command writes: its version, output into a pipe whose reader went away,
and the health probes left out of uvicorn's access log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dreamserve
from dreamserve import cli
from dreamserve.settings import Settings

ACCESS_FORMAT = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access log call
# The package as this test process imports it (a checkout's src, or the installed one).
PACKAGE_ROOT = Path(dreamserve.__file__).resolve().parents[1]


def _environment(data_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")])
    env["DREAMSERVE_DATA_DIR"] = str(data_dir)
    return env


def _dreamserve(*args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from dreamserve.cli import main; sys.exit(main())",
        *args,
    ]


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"dreamserve {dreamserve.__version__}\n"


def test_output_into_a_pipe_closed_after_one_line_ends_quietly(tmp_path: Path) -> None:
    """`dreamserve openapi | head -1`: the document (over 64 KiB, more than a pipe holds) stops
    at the closed pipe without a traceback, with the status SIGPIPE would give."""
    process = subprocess.Popen(
        _dreamserve("openapi"),
        cwd=tmp_path,
        env=_environment(tmp_path / "data"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    assert process.stdout.readline() == b"{\n"
    process.stdout.close()
    errors = process.stderr.read()
    process.stderr.close()
    assert process.wait(60) == 141
    assert errors == b""


def test_output_into_a_pipe_already_closed_ends_quietly(tmp_path: Path) -> None:
    """`dreamserve accounts list | head -1` where `head` is gone before the first write: a
    small output meets the closed pipe too (written when stdout is flushed)."""
    data_dir = tmp_path / "data"
    env = _environment(data_dir)
    # `migrate` makes the database, the first `accounts` run user 1 (its banner on stderr);
    # the second prints.
    migrate = _dreamserve("migrate")
    subprocess.run(migrate, cwd=tmp_path, env=env, check=True, capture_output=True)
    listing = _dreamserve("accounts", "list")
    subprocess.run(listing, cwd=tmp_path, env=env, check=True, capture_output=True)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        finished = subprocess.run(
            listing,
            cwd=tmp_path,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (finished.returncode, finished.stderr) == (141, b"")


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        ("/healthz", False),
        ("/readyz", False),
        ("/readyz?verbose=1", False),
        ("/healthz/x", True),
        ("/v1/dreamina/healthz", True),
        ("/v1/dreamina/models", True),
    ],
)
def test_the_access_log_leaves_out_the_health_probes(target: str, logged: bool) -> None:
    args = ("127.0.0.1:50000", "GET", target, "1.1", 200)
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, ACCESS_FORMAT, args, None)
    assert cli.QuietProbes().filter(record) is logged


def test_serve_runs_uvicorn_without_the_probes_in_its_access_log(
    uvicorn_loggers: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    uvicorn.Config(app="unused:app", **cli.uvicorn_options(Settings()))  # configures logging
    access = logging.getLogger("uvicorn.access")
    for target in ("/healthz", "/readyz", "/v1/dreamina/models"):
        access.info(ACCESS_FORMAT, "127.0.0.1:50000", "GET", target, "1.1", 200)
    assert capsys.readouterr().out == (
        'INFO:     127.0.0.1:50000 - "GET /v1/dreamina/models HTTP/1.1" 200 OK\n'
    )
