"""The event lines' text and JSON forms, the access log's quiet paths, and a worker's own
metrics endpoint."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import httpx
import pytest
from support import free_port

from dreamserve import cli, metrics
from dreamserve.errors import AtCapacity, TooManyBodiesOfUser, UserLimitReached
from dreamserve.observe import Event, JsonFormatter, refusal_reason
from dreamserve.settings import Settings


def record(msg: object, args: tuple[object, ...] | None = None) -> logging.LogRecord:
    return logging.LogRecord("dreamserve.observe", logging.INFO, "x.py", 1, msg, args, None)


def test_a_text_line_quotes_values_with_spaces_quotes_equals_or_newlines() -> None:
    fields = {"event": "job.failed", "jobid": "j1-u1-LOCAL:a", "reason": 'a "b"\nc=d', "s": 0.5}
    line = str(Event("job.failed", "job failed", fields))
    assert line == (
        'job failed: event=job.failed jobid=j1-u1-LOCAL:a reason="a \\"b\\"\\nc=d" s=0.500'
    )
    assert "\n" not in line


def test_a_json_line_holds_the_message_and_the_fields() -> None:
    event = Event("job.started", "job started", {"event": "job.started", "user": 1})
    line = json.loads(JsonFormatter().format(record(event)))
    assert line["message"] == "job started"
    assert (line["event"], line["user"], line["level"]) == ("job.started", 1, "info")
    plain = json.loads(JsonFormatter().format(record("%s went %d", ("it", 3))))
    assert plain["message"] == "it went 3"


def access(path: str) -> logging.LogRecord:
    line = logging.LogRecord("uvicorn.access", logging.INFO, "x", 1, "%s - %s %s %s %d", None, None)
    line.args = ("127.0.0.1:5", "GET", path, "1.1", 200)
    return line


@pytest.mark.parametrize("path", ["/metrics", "/metrics?x=1"])
def test_scrapes_stay_out_of_the_access_log(path: str) -> None:
    assert cli.QuietProbes().filter(access(path)) is False


def test_other_requests_stay_in_the_access_log() -> None:
    assert cli.QuietProbes().filter(access("/v1/dreamina/images/metrics")) is True


def test_the_json_format_reaches_uvicorns_own_lines() -> None:
    config = cli.log_config("json")
    assert {each["()"] for each in config["formatters"].values()} == {JsonFormatter}
    assert config["loggers"]["uvicorn.access"]["filters"] == ["quiet_probes", "unsigned_links"]
    assert cli.uvicorn_options(Settings(log_format="json"))["log_config"] == config
    text = cli.log_config()["formatters"]["default"]["()"]
    assert text == "uvicorn.logging.DefaultFormatter"  # text: uvicorn's own


def test_the_log_format_setting_takes_text_or_json() -> None:
    assert Settings().log_format == "text"
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")


def test_setup_logging_writes_json_lines_to_stderr() -> None:
    code = (
        "import logging; from dreamserve import observe; observe.setup_logging('info', 'json');"
        "logging.getLogger('dreamserve.x').info('hello %s', 'there');"
        "logging.getLogger('dreamserve.x').debug('hidden')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    (line,) = done.stderr.splitlines()
    assert json.loads(line)["message"] == "hello there"


def test_a_worker_serves_its_metrics_on_its_own_port() -> None:
    port = free_port()
    metrics.serve_alone(port, "127.0.0.1")
    reply = httpx.get(f"http://127.0.0.1:{port}/metrics")
    assert reply.status_code == 200
    assert "dreamserve_jobs_completed_total" in reply.text or (
        "# TYPE dreamserve_jobs_completed counter" in reply.text
    )


def test_each_429_has_its_reason() -> None:
    assert refusal_reason(AtCapacity(None, 5)) == "all_at_capacity"
    assert refusal_reason(AtCapacity("LOCAL:a", 5)) == "account"
    assert refusal_reason(TooManyBodiesOfUser(6, 5)) == "bodies_per_user"
    assert refusal_reason(UserLimitReached("3 running jobs", "max-running", 5)) == "user_limit"
