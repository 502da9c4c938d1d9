"""The Prometheus metrics: the counters and histograms each process keeps of what it did, the
gauges read from the database at scrape time (the HTTP middleware that times requests is
api/metrics.py's).

One endpoint per process (docs/operations.md): each API process serves its own `/metrics`, a
`dreamserve worker` its own on `--metrics-port`; Prometheus sums them. The per-account gauges
are the database's, not a process's: every API process reports the same values, correct
whatever number of processes admit and run the jobs.

Label values are bounded: models, account names, engine names, reasons and outcomes from fixed
lists, HTTP route templates (never a raw path). Never a prompt, a token, a secret or a jobid.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection, func, select

from dreamserve.jobs import Status
from dreamserve.storage.database import Database
from dreamserve.storage.tables import accounts, jobs

CONTENT_TYPE = CONTENT_TYPE_LATEST

_JOB = ("model", "account", "engine")
# Seconds: a job's phases run from milliseconds (the procedural engine) to minutes (a GPU, an
# upstream's queue).
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))
_WEBHOOK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))

JOBS_SUBMITTED = Counter("dreamserve_jobs_submitted", "Jobs admitted (a slot or a queue)", _JOB)
JOBS_COMPLETED = Counter("dreamserve_jobs_completed", "Jobs completed", _JOB)
JOBS_FAILED = Counter("dreamserve_jobs_failed", "Jobs failed (cancels not counted)", _JOB)
JOBS_CANCELLED = Counter("dreamserve_jobs_cancelled", "Jobs cancelled by their user", _JOB)
TOO_MANY = Counter("dreamserve_too_many_requests", "Requests answered 429, by reason", ("reason",))
QUEUE_SECONDS = Histogram(
    "dreamserve_job_queue_seconds",
    "From admission to a runner's start",
    ("model",),
    buckets=_JOB_BUCKETS,
)
ENGINE_SECONDS = Histogram(
    "dreamserve_engine_seconds",
    "An engine's run of a job (references decoded, images made)",
    ("engine", "model"),
    buckets=_JOB_BUCKETS,
)
JOB_SECONDS = Histogram(
    "dreamserve_job_seconds",
    "A completed job from admission to its end (end to end)",
    ("model",),
    buckets=_JOB_BUCKETS,
)
ENCODE_SECONDS = Histogram(
    "dreamserve_image_encode_seconds",
    "Encoding one image (its wait for a render thread included)",
    ("format",),
    buckets=_FAST_BUCKETS,
)
STORE_SECONDS = Histogram(
    "dreamserve_image_store_seconds",
    "Writing one encoded image to the blob store",
    buckets=_FAST_BUCKETS,
)
WEBHOOK_TRIES = Counter(
    "dreamserve_webhook_tries", "Webhook tries, by what became of the delivery", ("outcome",)
)
WEBHOOK_TRY_SECONDS = Histogram(
    "dreamserve_webhook_try_seconds",
    "One webhook try, from its request to the receiver's answer",
    buckets=_JOB_BUCKETS,
)
WEBHOOK_LATENCY = Histogram(
    "dreamserve_webhook_delivery_seconds",
    "From a job's end to its webhook delivered (retries included)",
    buckets=_WEBHOOK_BUCKETS,
)
HTTP_REQUESTS = Counter(
    "dreamserve_http_requests", "HTTP requests, by route template", ("method", "route", "status")
)
HTTP_SECONDS = Histogram(
    "dreamserve_http_request_seconds",
    "HTTP requests, from their start to the end of the answer",
    ("method", "route"),
    buckets=_FAST_BUCKETS,
)

# Every reason and outcome from the start, at 0: a dashboard's query finds the series.
REASONS = ("all_at_capacity", "account", "bodies_per_user", "user_limit", "other")
OUTCOMES = ("delivered", "retrying", "failed", "stopped", "refused")
for _reason in REASONS:
    TOO_MANY.labels(_reason)
for _outcome in OUTCOMES:
    WEBHOOK_TRIES.labels(_outcome)

# Gauges read from the database at scrape time (`exposition`), named here for the docs' sake.
GAUGES = (
    "dreamserve_account_jobs_running",
    "dreamserve_account_jobs_waiting",
    "dreamserve_account_slots",
)


def _account_gauges(conn: Connection) -> list[Metric]:
    """The per-account gauges in two statements: the slots taken and the cap of each account
    (accounts.running counts the jobs that hold a slot: running, or about to start), and the
    jobs waiting in each account's queue (`queueSeconds`). Accounts of different owners may
    share a name: their values are added."""
    running = GaugeMetricFamily(
        GAUGES[0], "Jobs holding a slot of the account (running or starting)", labels=["account"]
    )
    waiting = GaugeMetricFamily(
        GAUGES[1], "Jobs waiting in the account's queue for a slot", labels=["account"]
    )
    slots = GaugeMetricFamily(GAUGES[2], "Jobs the account runs at once", labels=["account"])
    names: dict[int, str] = {}
    taken: dict[str, int] = {}
    caps: dict[str, int] = {}
    for account_id, name, held, cap in conn.execute(
        select(accounts.c.id, accounts.c.name, accounts.c.running, accounts.c.max_jobs)
    ):
        names[account_id] = name
        taken[name] = taken.get(name, 0) + held
        caps[name] = caps.get(name, 0) + cap
    queued = dict.fromkeys(taken, 0)
    for account_id, count in conn.execute(
        select(jobs.c.account_id, func.count())
        .where(jobs.c.status == Status.CREATED.value, jobs.c.queue_deadline.is_not(None))
        .group_by(jobs.c.account_id)
    ):
        name = names.get(account_id)
        if name is not None:
            queued[name] += count
    for name in sorted(taken):
        running.add_metric([name], taken[name])
        waiting.add_metric([name], queued[name])
        slots.add_metric([name], caps[name])
    return [running, waiting, slots]


class _Read(Collector):
    """Metric families read beforehand (the database is read off the event loop)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


async def exposition(db: Database | None) -> bytes:
    """This process's metrics and, with `db`, the database's gauges, in Prometheus's text
    format."""
    text = generate_latest(REGISTRY)
    if db is None:
        return text
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Read(await db.read(_account_gauges)))
    return text + generate_latest(registry)


def serve_alone(port: int, host: str) -> None:
    """Serve this process's metrics on `http://host:port/metrics` from a thread of their own
    (a `dreamserve worker`, which has no HTTP server); nothing when `port` is 0. Open: bind the
    worker's host where only Prometheus reaches. No database gauges: the API processes have
    them."""
    if port:
        start_http_server(port, addr=host)
