"""Metrics and logs: after a known set of jobs (completed, failed, cancelled, waiting, 429s),
GET /metrics counts exactly those (counts, not timings), its gauges show the database's running
and waiting jobs, its HTTP series carry route templates; each event is one log line with its
fields, in text or JSON, and never a prompt or a token at info."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from receiver import receiving
from sqlalchemy import update
from support import SMALL, Harness, _SharedEngine, eventually, open_harness

from dreamserve.engines.base import CancelSignal, GenerationRequest
from dreamserve.errors import AccountError, JobFailed
from dreamserve.observe import Event, JsonFormatter
from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts, jobs

pytestmark = pytest.mark.anyio

ACCOUNT = "LOCAL:procedural"
PROMPT = "a secret prompt about lighthouses"  # never at info
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class ScriptedEngine(_SharedEngine):
    """By prompt: `fail` fails the job, `hold` runs until cancelled, `account` puts the account
    in error; anything else returns blank images at once."""

    def __init__(self) -> None:
        self.started = 0

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        self.started += 1
        if request.prompt.startswith("fail"):
            raise JobFailed("The prompt was refused", "policy")
        if request.prompt.startswith("account"):
            raise AccountError("Invalid API key", "upstream answered 401")
        while request.prompt.startswith("hold") and not cancel.is_set:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        cancel.raise_if_set()
        return [Image.new("RGB", (request.width, request.height)) for _ in range(request.count)]


@pytest.fixture
def engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
async def harness(settings: Settings, engine: ScriptedEngine) -> AsyncIterator[Harness]:
    async with open_harness(settings, engines={"procedural": engine.factory}) as opened:
        yield opened


async def scrape(harness: Harness, token: str | None = None) -> tuple[str, Samples]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    reply = await harness.client.get("/metrics", headers=headers)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return reply.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def known_jobs(harness: Harness, engine: ScriptedEngine) -> dict[str, Any]:
    """3 completed, 1 failed, 1 cancelled, 1 that waited for a slot (then completed), and two
    429s (every account at capacity, the named account at capacity); their jobids, and the
    gauges read while one job ran and one waited."""
    body = {**SMALL, "prompt": PROMPT}
    completed = [(await harness.post(body)).json()["jobid"] for _ in range(3)]
    for jobid in completed:
        assert (await harness.wait(jobid))["status"] == "completed"
    failed = (await harness.post({**SMALL, "prompt": "fail please"})).json()["jobid"]
    assert (await harness.wait(failed))["error"] == "The prompt was refused"
    held = (await harness.post({**SMALL, "prompt": "hold on"})).json()["jobid"]
    await eventually(lambda: engine.started == 5)
    await harness.execute(update(accounts).where(accounts.c.name == ACCOUNT).values(max_jobs=1))
    waiting = await harness.post({**body, "queueSeconds": 60})
    assert waiting.status_code == 200, waiting.text
    everyone = await harness.post(body)
    assert (everyone.status_code, everyone.json()) == (429, {"error": "All accounts at capacity"})
    named = await harness.post({**body, "account": ACCOUNT})
    assert named.status_code == 429
    _, during = await scrape(harness)
    cancel = await harness.call("DELETE", f"/scheduler/{held}")  # the waiting job takes its slot
    assert cancel.status_code == 200, cancel.text
    assert (await harness.wait(waiting.json()["jobid"]))["status"] == "completed"
    return {
        "completed": [*completed, waiting.json()["jobid"]],
        "failed": failed,
        "cancelled": held,
        "during": during,
    }


# Metrics


@pytest.mark.both_databases
async def test_metrics_count_exactly_the_jobs_and_429s(
    harness: Harness, engine: ScriptedEngine
) -> None:
    _, before = await scrape(harness)
    jobs = await known_jobs(harness, engine)
    text, after = await scrape(harness)
    labels = {"model": "nano-banana", "account": ACCOUNT, "engine": "procedural"}

    def delta(name: str, **only: str) -> float:
        return value(after, name, **only) - value(before, name, **only)

    assert delta("dreamserve_jobs_submitted_total", **labels) == 6
    assert delta("dreamserve_jobs_completed_total", **labels) == 4
    assert delta("dreamserve_jobs_failed_total", **labels) == 1
    assert delta("dreamserve_jobs_cancelled_total", **labels) == 1
    assert delta("dreamserve_too_many_requests_total", reason="all_at_capacity") == 1
    assert delta("dreamserve_too_many_requests_total", reason="account") == 1
    assert delta("dreamserve_job_seconds_count", model="nano-banana") == 4
    assert delta("dreamserve_engine_seconds_count", engine="procedural", model="nano-banana") == 4
    assert delta("dreamserve_image_encode_seconds_count", format="jpeg") == 4
    assert delta("dreamserve_image_store_seconds_count") == 4
    assert delta("dreamserve_job_queue_seconds_count", model="nano-banana") == 6
    # The database's gauges: while one job ran and one waited, then after.
    during = jobs["during"]
    assert value(during, "dreamserve_account_jobs_running", account=ACCOUNT) == 1
    assert value(during, "dreamserve_account_jobs_waiting", account=ACCOUNT) == 1
    assert value(during, "dreamserve_account_slots", account=ACCOUNT) == 1
    assert value(after, "dreamserve_account_jobs_running", account=ACCOUNT) == 0
    assert value(after, "dreamserve_account_jobs_waiting", account=ACCOUNT) == 0
    # Route templates, never a raw path, a jobid or the prompt.
    route = {"method": "GET", "route": "/v1/dreamina/images/{jobid}", "status": "200"}
    assert delta("dreamserve_http_requests_total", **route) >= 5
    posted = {"method": "POST", "route": "/v1/dreamina/images", "status": "429"}
    assert delta("dreamserve_http_requests_total", **posted) == 2
    for jobid in [*jobs["completed"], jobs["failed"], jobs["cancelled"]]:
        assert jobid not in text
    assert PROMPT not in text
    assert harness.token.partition("-")[2] not in text


@pytest.mark.both_databases
async def test_every_api_process_reports_the_gauges_of_the_database(
    settings: Settings, engine: ScriptedEngine
) -> None:
    """Two API processes on one database: a job held by the first shows in the second's
    gauges (read from the database, not from the process that admitted it)."""
    async with (
        open_harness(settings, engines={"procedural": engine.factory}) as first,
        open_harness(settings, engines={"procedural": engine.factory}, resume=False) as second,
    ):
        held = (await first.post({**SMALL, "prompt": "hold on"})).json()["jobid"]
        await eventually(lambda: engine.started == 1)
        for harness in (first, second):
            _, samples = await scrape(harness)
            assert value(samples, "dreamserve_account_jobs_running", account=ACCOUNT) == 1
        assert (await first.call("DELETE", f"/scheduler/{held}")).status_code == 200
        _, after = await scrape(second)
    assert value(after, "dreamserve_account_jobs_running", account=ACCOUNT) == 0


async def test_a_path_no_route_matches_is_counted_as_unmatched(harness: Harness) -> None:
    _, before = await scrape(harness)
    assert (await harness.client.get("/v1/dreamina/nothing/12345")).status_code == 404
    _, after = await scrape(harness)
    labels = {"method": "GET", "route": "unmatched", "status": "404"}
    assert value(after, "dreamserve_http_requests_total", **labels) == (
        value(before, "dreamserve_http_requests_total", **labels) + 1
    )
    assert all("12345" not in dict(key[1]).get("route", "") for key in after)


async def test_the_metrics_token_is_asked_for_when_set(
    settings: Settings, engine: ScriptedEngine
) -> None:
    guarded = settings.model_copy(update={"metrics_token": "scrape-me"})
    async with open_harness(guarded, engines={"procedural": engine.factory}) as harness:
        bare = await harness.client.get("/metrics")
        assert (bare.status_code, bare.json()) == (401, {"error": "Unauthorized"})
        wrong = await harness.client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert (wrong.status_code, wrong.json()) == (401, {"error": "Unauthorized"})
        user = await harness.client.get("/metrics", headers=harness.auth)  # an API token: no
        assert user.status_code == 401
        await scrape(harness, token="scrape-me")


async def test_metrics_are_open_without_the_token_setting(harness: Harness) -> None:
    await scrape(harness)  # no Authorization header at all


async def test_the_grafana_dashboard_queries_only_metrics_that_exist(
    harness: Harness, engine: ScriptedEngine
) -> None:
    await known_jobs(harness, engine)
    text, _ = await scrape(harness)
    names = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    dashboard = json.loads(
        (Path(__file__).parents[2] / "docs" / "grafana-dashboard.json").read_text()
    )
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"\bdreamserve_[a-z_]+\b", target["expr"])
    }
    assert queried, "the dashboard queries no dreamserve metric"
    assert queried <= names, sorted(queried - names)
    assert len(dashboard["panels"]) >= 8


# Logs

LINE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parsed(text: str) -> tuple[str, dict[str, str]]:
    """A text event line's message and its fields (quoted values unquoted)."""
    message, _, pairs = text.partition(": ")
    fields = {
        key: json.loads(raw) if raw.startswith('"') else raw for key, raw in LINE.findall(pairs)
    }
    return message, fields


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, str], logging.LogRecord]]:
    found = []
    for record in caplog.records:
        if isinstance(record.msg, Event):
            message, fields = parsed(record.getMessage())
            assert message == record.msg.text
            found.append((fields["event"], fields, record))
    return found


@pytest.mark.both_databases
async def test_each_job_event_is_one_line_with_its_fields(
    harness: Harness, engine: ScriptedEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    jobs = await known_jobs(harness, engine)
    lines = events(caplog)
    by_job: dict[str, list[str]] = {}
    for name, fields, _ in lines:
        if "jobid" in fields:
            by_job.setdefault(fields["jobid"], []).append(name)
        if name.startswith("job."):
            assert fields["user"] == "1"
            assert fields["account"] == ACCOUNT
            assert (fields["model"], fields["engine"]) == ("nano-banana", "procedural")
    for jobid in jobs["completed"]:
        assert by_job[jobid] == ["job.admitted", "job.started", "job.completed"]
    assert by_job[jobs["failed"]] == ["job.admitted", "job.started", "job.failed"]
    assert by_job[jobs["cancelled"]] == ["job.admitted", "job.started", "job.cancelled"]
    done = [fields for name, fields, _ in lines if name == "job.completed"]
    assert {"queue_s", "engine_s", "store_s", "total_s"} <= set(done[0])
    assert all(float(fields["total_s"]) >= 0 for fields in done)
    (failure,) = [fields for name, fields, _ in lines if name == "job.failed"]
    assert failure["reason"] == "The prompt was refused"
    refused = [fields for name, fields, _ in lines if name == "request.refused"]
    assert [(each["reason"], each["user"]) for each in refused] == [
        ("all_at_capacity", "1"),
        ("account", "1"),
    ]
    assert refused[1]["error"] == f"Account {ACCOUNT} at capacity"
    # Never a prompt or a token at info.
    assert PROMPT not in caplog.text
    assert harness.token not in caplog.text
    assert harness.token.partition("-")[2] not in caplog.text


async def test_the_prompt_is_logged_at_debug_only(
    harness: Harness, engine: ScriptedEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dreamserve.observe")
    jobid = (await harness.post({**SMALL, "prompt": PROMPT})).json()["jobid"]
    await harness.wait(jobid)
    prompts = [fields for name, fields, _ in events(caplog) if name == "job.prompt"]
    assert prompts == [{"event": "job.prompt", "jobid": jobid, "prompt": PROMPT}]
    (record,) = [r for r in caplog.records if PROMPT in r.getMessage()]
    assert record.levelno == logging.DEBUG


async def test_json_lines_parse_with_the_events_fields(
    harness: Harness, engine: ScriptedEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    jobid = (await harness.post({**SMALL, "prompt": 'quotes " and = and\nnewline'})).json()
    await harness.wait(jobid["jobid"])
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(record)) for record in caplog.records]
    completed = [line for line in lines if line.get("event") == "job.completed"]
    assert len(completed) == 1
    line = completed[0]
    assert line["message"] == "job completed"
    assert line["level"] == "info"
    assert line["logger"] == "dreamserve.observe"
    assert (line["jobid"], line["user"], line["account"]) == (jobid["jobid"], 1, ACCOUNT)
    assert isinstance(line["engine_s"], float)
    assert all(isinstance(line, dict) for line in lines)  # every record, events or not
    assert "newline" not in caplog.text


async def test_an_account_put_in_error_is_one_line(
    harness: Harness, engine: ScriptedEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    jobid = (await harness.post({**SMALL, "prompt": "account broken"})).json()["jobid"]
    assert (await harness.wait(jobid))["error"] == "Invalid API key"
    changes = [fields for name, fields, _ in events(caplog) if name.startswith("account.")]
    assert changes == [
        {
            "event": "account.error",
            "account": ACCOUNT,
            "engine": "procedural",
            "jobid": jobid,
            "user": "1",
            "reason": "Invalid API key",
        }
    ]


def quiet_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx at warning, as the CLI sets it (it logs every request's URL at info)."""
    httpx_log = logging.getLogger("httpx")
    monkeypatch.setattr(httpx_log, "level", logging.WARNING)
    monkeypatch.setattr(httpx_log, "_cache", {})


async def test_a_webhook_try_is_one_line_and_counted(
    settings: Settings,
    engine: ScriptedEngine,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    quiet_httpx(monkeypatch)
    hooks = settings.model_copy(update={"webhook_allow_private": True})
    async with open_harness(hooks, engines={"procedural": engine.factory}) as harness:
        _, before = await scrape(harness)
        with receiving() as receiver:
            url = f"{receiver.url}/hook?key=receiver-secret"
            jobid = (await harness.post({**SMALL, "replyUrl": url})).json()["jobid"]
            await harness.wait(jobid)
            await eventually(lambda: receiver.count() == 1)
            await eventually(lambda: any(n == "webhook.try" for n, _, _ in events(caplog)))
        _, after = await scrape(harness)
    (fields,) = [fields for name, fields, _ in events(caplog) if name == "webhook.try"]
    assert fields["jobid"] == jobid
    assert (fields["outcome"], fields["status"], fields["try"]) == ("delivered", "200", "1")
    assert {"duration_s", "latency_s", "host", "user"} <= set(fields)
    assert "receiver-secret" not in caplog.text
    tries = ("dreamserve_webhook_tries_total", {"outcome": "delivered"})
    assert value(after, tries[0], **tries[1]) - value(before, tries[0], **tries[1]) == 1
    latency = "dreamserve_webhook_delivery_seconds_count"
    assert value(after, latency) - value(before, latency) == 1


@pytest.mark.both_databases
async def test_jobs_cancelled_with_their_account_are_one_line_each_and_counted(
    harness: Harness, engine: ScriptedEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    body = {"account": "LOCAL:doomed", "engine": "procedural", "maxJobs": 5}
    await harness.put_account(body)
    held = [
        (await harness.post({**SMALL, "prompt": "hold on", "account": "LOCAL:doomed"})).json()[
            "jobid"
        ]
        for _ in range(2)
    ]
    await eventually(lambda: engine.started == 2)
    labels = {"model": "nano-banana", "account": "LOCAL:doomed", "engine": "procedural"}
    _, before = await scrape(harness)  # the counters are the process's: another test's count
    assert (await harness.call("DELETE", "/accounts/LOCAL:doomed")).status_code == 200
    cancelled = [fields for name, fields, _ in events(caplog) if name == "job.cancelled"]
    assert sorted(fields["jobid"] for fields in cancelled) == sorted(held)
    for fields in cancelled:
        assert (fields["user"], fields["account"], fields["model"]) == (
            "1",
            "LOCAL:doomed",
            "nano-banana",
        )
        assert fields["reason"] == "Account LOCAL:doomed was deleted"
    _, after = await scrape(harness)
    counted = "dreamserve_jobs_cancelled_total"
    assert value(after, counted, **labels) - value(before, counted, **labels) == 2


async def test_jobs_a_start_gives_up_on_are_one_failed_line_each(
    settings: Settings, engine: ScriptedEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_harness(settings, engines={"procedural": engine.factory}) as first:
        jobid = (await first.post({**SMALL, "prompt": "hold on"})).json()["jobid"]
        await eventually(lambda: engine.started == 1)
        # As if it had been started the most times a job may be: the next start gives up.
        await first.execute(update(jobs).where(jobs.c.jobid == jobid).values(attempts=99))
    caplog.set_level(logging.INFO)
    async with open_harness(settings, engines={"procedural": engine.factory}) as second:
        record = await second.wait(jobid)
    assert record["status"] == "failed"
    (failed,) = [fields for name, fields, _ in events(caplog) if name == "job.failed"]
    assert failed["jobid"] == jobid
    assert failed["reason"] == record["error"]
    assert (failed["user"], failed["account"], failed["model"]) == ("1", ACCOUNT, "nano-banana")
