"""What the server tells its operator of each event: one function per event, each writing ONE
structured log line (logger `dreamserve.observe`) and updating the metrics (metrics.py).

A line is a short message then `key=value` fields (text), or one JSON object (`json`): every
job line has `jobid`, `user` and `account`. Never a token, a secret or a replyUrl; a prompt
only at debug level. The log formatters used by the CLI live here too.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from dreamserve import metrics
from dreamserve.errors import AtCapacity, DreamserveError, TooManyBodiesOfUser, UserLimitReached
from dreamserve.jobs import CANCELLED_BY_USER, EndedJob, Job, Status

log = logging.getLogger("dreamserve.observe")

UNKNOWN = "unknown"  # the engine of a job this process neither admitted nor ran

# Each account's engine as this process last saw it (admission, a run): the engine label of a
# job cancelled here. Bounded by the accounts there are.
_engines: dict[str, str] = {}


class Event:
    """A log record's message: a short text and its fields, rendered `text key=value ...`."""

    __slots__ = ("fields", "name", "text")

    def __init__(self, name: str, text: str, fields: Mapping[str, object]) -> None:
        self.name = name
        self.text = text
        self.fields = fields

    def __str__(self) -> str:
        pairs = " ".join(f"{key}={_value(value)}" for key, value in self.fields.items())
        return f"{self.text}: {pairs}" if pairs else self.text


_QUOTED = re.compile(r'[\s"=\\]')  # a value with one of these is written JSON-quoted


def _value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if text and text.isprintable() and _QUOTED.search(text) is None:
        return text
    return json.dumps(text, ensure_ascii=False)


def _emit(level: int, name: str, text: str, **fields: object) -> None:
    if log.isEnabledFor(level):
        log.log(level, Event(name, text, {"event": name, **fields}))


def _job_fields(job: Job | EndedJob, engine: str) -> dict[str, object]:
    return {
        "jobid": job.jobid,
        "user": job.user_id,
        "account": job.account,
        "model": job.model,
        "engine": engine,
    }


def _engine_of(account: str) -> str:
    return _engines.get(account, UNKNOWN)


def _learn(account: str, engine: str) -> None:
    if _engines.get(account) != engine:
        if len(_engines) >= 10_000:
            _engines.clear()
        _engines[account] = engine


# Jobs

# Each job counter's series, found once (`labels()` takes a lock and checks its values each
# time; a submission's count is on the submission path). Bounded by models x accounts x engines.
_series: dict[tuple[Counter, str, str, str], Counter] = {}


def _count(counter: Counter, job: Job | EndedJob, engine: str) -> None:
    key = (counter, job.model, job.account, engine)
    series = _series.get(key)
    if series is None:
        if len(_series) >= 10_000:
            _series.clear()
        series = _series[key] = counter.labels(job.model, job.account, engine)
    series.inc()


def job_admitted(job: Job, engine: str) -> None:
    """A job admitted (its transaction committed): on a slot, or in its account's queue."""
    _learn(job.account, engine)
    _count(metrics.JOBS_SUBMITTED, job, engine)
    if log.isEnabledFor(logging.INFO):  # on the submission path: the fields built only if so
        fields = {"event": "job.admitted", **_job_fields(job, engine)}
        fields["type"], fields["queued"] = job.type, job.queue_deadline is not None
        log.info(Event("job.admitted", "job admitted", fields))
        if job.spec.prompt is not None and log.isEnabledFor(logging.DEBUG):
            prompt = {"event": "job.prompt", "jobid": job.jobid, "prompt": job.spec.prompt}
            log.debug(Event("job.prompt", "job prompt", prompt))


class JobRun:
    """One attempt of a job in its runner: what its end reports (the engine's and the
    storing's seconds, measured with `lap`)."""

    def __init__(self, job: Job, engine: str, started_at: int) -> None:
        self.job = job
        self.engine = engine
        self.started_at = started_at  # epoch ms
        self.engine_seconds: float | None = None
        self.store_seconds: float | None = None
        self._lap = time.monotonic()

    def lap(self) -> float:
        """Seconds since the last lap (or the start)."""
        now = time.monotonic()
        seconds, self._lap = now - self._lap, now
        return seconds

    def rendered(self) -> None:
        """The engine returned its images: its seconds since the last lap."""
        self.engine_seconds = self.lap()
        metrics.ENGINE_SECONDS.labels(self.engine, self.job.model).observe(self.engine_seconds)

    def stored(self) -> None:
        self.store_seconds = self.lap()


def job_started(job: Job, engine: str, now: int) -> JobRun:
    """A runner claimed the job (`now`, epoch ms): a new attempt."""
    _learn(job.account, engine)
    queued = max(0, now - job.created_at) / 1000
    metrics.QUEUE_SECONDS.labels(job.model).observe(queued)
    _emit(
        logging.INFO,
        "job.started",
        "job started",
        **_job_fields(job, engine),
        attempt=job.attempts,
        queue_s=queued,
    )
    return JobRun(job, engine, now)


def job_ended(job: Job, run: JobRun | None, status: Status, error: str | None, now: int) -> None:
    """Its runner wrote the job's end (`now`, epoch ms): completed, failed, or found
    cancelled (its engine stopped on a cancel)."""
    engine = run.engine if run is not None else _engine_of(job.account)
    if status is Status.COMPLETED:
        total = max(0, now - job.created_at) / 1000
        _count(metrics.JOBS_COMPLETED, job, engine)
        metrics.JOB_SECONDS.labels(job.model).observe(total)
        timings: dict[str, object] = {"total_s": total}
        if run is not None:
            timings["queue_s"] = max(0, run.started_at - job.created_at) / 1000
            if run.engine_seconds is not None:
                timings["engine_s"] = run.engine_seconds
            if run.store_seconds is not None:
                timings["store_s"] = run.store_seconds
        _emit(
            logging.INFO,
            "job.completed",
            "job completed",
            **_job_fields(job, engine),
            images=job.spec.count,
            **timings,
        )
    elif error == CANCELLED_BY_USER:
        job_cancelled(job)
    else:
        job_failed(job, error or "", engine)


def job_failed(job: Job | EndedJob, reason: str, engine: str | None = None) -> None:
    """A job ended failed: by its runner, or given up on (its runner lost too often, a start
    finding it started too often, its `queueSeconds` out). `reason` is the error its record
    shows."""
    engine = engine or _engine_of(job.account)
    _count(metrics.JOBS_FAILED, job, engine)
    _emit(logging.WARNING, "job.failed", "job failed", **_job_fields(job, engine), reason=reason)


def job_cancelled(job: Job | EndedJob, reason: str | None = None) -> None:
    """A job cancelled: by its user (DELETE /images/<jobid>), or with its account (`reason`:
    the account was deleted)."""
    engine = _engine_of(job.account)
    _count(metrics.JOBS_CANCELLED, job, engine)
    fields = _job_fields(job, engine)
    if reason is not None:
        fields["reason"] = reason
    _emit(logging.INFO, "job.cancelled", "job cancelled", **fields)


def image_encoded(image_format: str, seconds: float) -> None:
    metrics.ENCODE_SECONDS.labels(image_format).observe(seconds)


def image_stored(seconds: float) -> None:
    metrics.STORE_SECONDS.observe(seconds)


# Requests refused


def refusal_reason(error: DreamserveError) -> str:
    """Why a 429: a bounded name for the metric's label."""
    if isinstance(error, AtCapacity):
        return "all_at_capacity" if error.message == "All accounts at capacity" else "account"
    if isinstance(error, TooManyBodiesOfUser):
        return "bodies_per_user"
    if isinstance(error, UserLimitReached):
        return "user_limit"
    return "other"


def too_many(error: DreamserveError, user: int | None, path: str) -> None:
    """A request answered 429 (its error says why)."""
    reason = refusal_reason(error)
    metrics.TOO_MANY.labels(reason).inc()
    _emit(
        logging.INFO,
        "request.refused",
        "request refused",
        reason=reason,
        user=user,
        path=path,
        error=error.message,
    )


# Webhooks


def webhook_tried(
    *,
    jobid: str | None,
    user: int,
    host: str,
    outcome: str,
    status: int | None,
    duration_ms: int,
    error: str | None,
    tries: int,
    latency_ms: int | None,
) -> None:
    """A webhook try recorded. `outcome`: the delivery's state after it (`pending`: another
    try comes; delivered, failed, stopped, refused); `latency_ms`, once delivered: from the
    job's end to the end of this try."""
    outcome = "retrying" if outcome == "pending" else outcome
    metrics.WEBHOOK_TRIES.labels(outcome).inc()
    metrics.WEBHOOK_TRY_SECONDS.observe(duration_ms / 1000)
    fields: dict[str, object] = {
        "jobid": jobid,
        "user": user,
        "host": host,
        "outcome": outcome,
        "status": status,
        "try": tries,
        "duration_s": duration_ms / 1000,
    }
    if latency_ms is not None:
        metrics.WEBHOOK_LATENCY.observe(latency_ms / 1000)
        fields["latency_s"] = latency_ms / 1000
    if error is not None:
        fields["error"] = error
    level = logging.INFO if outcome in ("delivered", "retrying") else logging.WARNING
    _emit(level, "webhook.try", "webhook try", **fields)


# Accounts


def account_changed(
    state: str,
    account: str,
    engine: str,
    *,
    job: Job,
    reason: str | None = None,
    cooldown_s: float | None = None,
) -> None:
    """An account's health changed because of `job`: `error` (put in error, admission skips it
    until its operator saves it again), `cooldown` (for `cooldown_s`) or `recovered`."""
    fields: dict[str, object] = {
        "account": account,
        "engine": engine,
        "jobid": job.jobid,
        "user": job.user_id,
    }
    if reason is not None:
        fields["reason"] = reason
    if cooldown_s is not None:
        fields["cooldown_s"] = cooldown_s
    level = logging.INFO if state == "recovered" else logging.WARNING
    _emit(level, f"account.{state}", f"account {state}", **fields)


# Logging setup (the CLI's)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and, for an event, its fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, Event):
            line["message"] = record.msg.text
            line.update(record.msg.fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str, log_format: str) -> None:
    """The root logger's handler (stderr), in `log_format` (text or json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler])
