"""The composition root: concrete parts built from Settings, and the ASGI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from random import Random
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from dreamserve import __version__
from dreamserve.admission import Admission
from dreamserve.api import (
    accounts,
    assets,
    files,
    health,
    images,
    metrics,
    models,
    scheduler,
    webhooks,
)
from dreamserve.api.body import BodyLimits, BodyReads
from dreamserve.api.deps import BEARER_SCHEME
from dreamserve.api.docs import install_docs
from dreamserve.api.errors import install_error_handlers, route_methods
from dreamserve.api.metrics import HttpMetrics
from dreamserve.api.studio import install_studio
from dreamserve.catalogue import Catalogue
from dreamserve.config import ConfigError, OperatorConfig, load_config
from dreamserve.dispatch.base import Dispatcher, Runner
from dreamserve.dispatch.inprocess import InProcessDispatcher
from dreamserve.dispatch.postgres import PostgresDispatcher
from dreamserve.encoding import Encoding
from dreamserve.engines.base import EngineContext
from dreamserve.engines.registry import BUILTIN, EngineRegistry, EngineSource
from dreamserve.errors import DreamserveError
from dreamserve.events import JobEvents, PostgresFeed
from dreamserve.ids import IdFactory
from dreamserve.jobs import millis
from dreamserve.links import LinkSigner
from dreamserve.reaper import Reaper, ReaperConfig
from dreamserve.render_memory import RenderMemory
from dreamserve.render_threads import RenderThreads
from dreamserve.sealing import SecretBox
from dreamserve.service import Service, ServiceConfig
from dreamserve.service.accounts import Accounts
from dreamserve.service.assets import Assets
from dreamserve.service.readiness import Readiness
from dreamserve.service.records import Records
from dreamserve.service.scheduler import Scheduler
from dreamserve.service.submissions import Submissions
from dreamserve.service.tokens import Tokens
from dreamserve.settings import Settings
from dreamserve.storage import job_queries
from dreamserve.storage.blobs import BlobStore, open_blob_store
from dreamserve.storage.database import Database, DatabaseConfig, open_database
from dreamserve.storage.job_store import JobStore
from dreamserve.storage.keyfile import load_or_create_key
from dreamserve.webhooks.delivery import Deliverer, DeliveryConfig
from dreamserve.webhooks.keys import WebhookSecrets
from dreamserve.webhooks.outbox import Webhooks
from dreamserve.worker import JobRunner, RunnerConfig
from dreamserve.worker_accounts import RELIST_SECONDS, AccountPicker

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
DispatcherFactory = Callable[[Runner], Dispatcher]
API_PREFIX = "/v1/dreamina"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Server:
    """Every part of a server, built once: the service the API and the CLI call, and what the
    background tasks (and tests) work with beside it."""

    service: Service
    db: Database
    store: JobStore
    blobs: BlobStore
    dispatcher: Dispatcher
    deliverer: Deliverer
    events: JobEvents
    admission: Admission
    ids: IdFactory
    memory: RenderMemory
    runs_jobs: bool = True  # this process runs jobs (not an API process with RUN_JOBS=false)


@asynccontextmanager
async def open_server(
    settings: Settings,
    *,
    clock: Clock = utc_now,
    catalogue: Catalogue | None = None,
    engines: Mapping[str, EngineSource] = BUILTIN,
    dispatcher: DispatcherFactory | None = None,
    worker_accounts: Sequence[str] | None = None,
    runs_jobs: bool | None = None,
) -> AsyncIterator[Server]:
    """Every part of the server wired together, the schema migrated; closed on exit.

    `catalogue`, `engines` and `dispatcher` replace the built-in ones (benchmarks and tests);
    by default jobs go through procrastinate on PostgreSQL, and run in-process on SQLite.
    `runs_jobs` (default: the setting) says whether this process runs jobs at all, and
    `worker_accounts` the accounts whose jobs it runs (None: every account's).
    """
    runs_jobs = settings.run_jobs if runs_jobs is None else runs_jobs
    postgres = settings.database.startswith("postgresql")
    if not postgres and not runs_jobs:
        raise ConfigError(_SQLITE_RUNS_JOBS)
    key, box_key = _prepare_data_dir(settings.data_dir)
    box = SecretBox(box_key)
    signer = LinkSigner(key, settings.base_url, settings.link_ttl_seconds, clock)
    # Before the database: a blob store URL that cannot be used stops the start, nothing open.
    blobs = open_blob_store(settings.blob_store, signer, settings.blob_links == "presigned")
    db = open_database(
        settings.database,
        DatabaseConfig(
            busy_seconds=settings.database_busy_seconds,
            statement_seconds=settings.database_statement_seconds,
            retry_after=settings.retry_after_seconds,
        ),
    )
    await db.migrate()
    executor = RenderThreads(settings.threads)
    context = EngineContext(executor, allow_private=settings.upstream_allow_private)
    registry = EngineRegistry(context, box, engines)
    ids = IdFactory()
    events = JobEvents()
    secrets = WebhookSecrets(db, box, clock)
    deliverer = Deliverer(
        db,
        blobs,
        secrets,
        events,
        clock,
        DeliveryConfig(
            timeout=settings.webhook_timeout_seconds,
            claim_grace=settings.webhook_claim_grace_seconds,
            allow_private=settings.webhook_allow_private,
            concurrency=settings.webhook_concurrency,
            per_user=settings.webhook_concurrency_per_user,
            per_host=settings.webhook_concurrency_per_host,
        ),
    )
    admission = Admission(
        registry,
        Random(),
        settings.retry_after_seconds,
        cache_seconds=settings.account_cache_seconds,
        wall=lambda: millis(clock()),
    )
    store = JobStore(db, events, int(settings.lease_seconds * 1000))
    memory = RenderMemory(settings.render_memory_mb << 20)
    runner = JobRunner(
        store,
        blobs,
        registry,
        ids,
        clock,
        executor,
        memory,
        RunnerConfig(
            Encoding(
                settings.image_format,
                settings.jpeg_quality,
                settings.png_compress_level,
                settings.webp_quality,
            ),
            settings.progress_interval_seconds,
            settings.lease_seconds,
        ),
        account_changed=admission.forget,
    )
    events.on_end(runner.ended)  # a job cancelled by any process stops its engine here
    if dispatcher is not None:
        dispatch = dispatcher(runner)
    else:
        dispatch = await _default_dispatcher(settings, runner, db, runs_jobs, worker_accounts)
    store.dispatch = dispatch.dispatch  # jobs promoted from a queue, wherever a slot freed
    config = ServiceConfig(
        queue_limit=settings.queue_limit,
        token_cache_seconds=settings.token_cache_seconds,
        lease_seconds=settings.lease_seconds,
        max_upload_bytes=settings.max_upload_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_upload_pixels=settings.max_upload_pixels,
        webhook_allow_private=settings.webhook_allow_private,
    )
    # The built-in catalogue, with the models of the operator's configuration file.
    models = catalogue or load_config(settings.config).catalogue
    records = Records(db, blobs, events, config, models.names)
    service = Service(
        tokens=Tokens(db, clock, config),
        submissions=Submissions(
            store=store,
            blobs=blobs,
            catalogue=models,
            admission=admission,
            dispatcher=dispatch,
            ids=ids,
            clock=clock,
            config=config,
        ),
        records=records,
        scheduler=Scheduler(
            store=store,
            blobs=blobs,
            dispatcher=dispatch,
            records=records,
            clock=clock,
            config=config,
        ),
        accounts=Accounts(
            db=db,
            catalogue=models,
            admission=admission,
            dispatcher=dispatch,
            store=store,
            clock=clock,
        ),
        assets=Assets(db=db, blobs=blobs, ids=ids, clock=clock, config=config),
        webhooks=Webhooks(db, secrets, deliverer, clock),
        config=config,
    )
    try:
        parts = (service, db, store, blobs, dispatch, deliverer, events, admission, ids, memory)
        yield Server(*parts, runs_jobs)
    finally:
        await dispatch.close()
        await deliverer.close()
        await registry.close()
        executor.shutdown(wait=True, cancel_futures=True)
        await db.close()


_SQLITE_RUNS_JOBS = (
    "DREAMSERVE_RUN_JOBS=false needs PostgreSQL (DREAMSERVE_DATABASE_URL): on SQLite the "
    "server runs the jobs itself, and no worker can take them"
)


async def _default_dispatcher(
    settings: Settings,
    runner: Runner,
    db: Database,
    runs_jobs: bool,
    worker_accounts: Sequence[str] | None,
) -> Dispatcher:
    """In-process on SQLite; on PostgreSQL procrastinate, opened (its schema applied)."""
    if not db.shared:
        return InProcessDispatcher(runner)
    dispatcher = PostgresDispatcher(
        runner,
        settings.database,
        runs_jobs=runs_jobs,
        accounts=worker_accounts,
        account_of=partial(_queued_account, db),
        lease_seconds=settings.lease_seconds,
    )
    await dispatcher.open()
    return dispatcher


async def _queued_account(db: Database, job_id: int) -> str | None:
    return await db.read(lambda conn: job_queries.queued_account(conn, job_id))


def _prepare_data_dir(data_dir: Path) -> tuple[bytes, bytes]:
    """The data dir made if missing, and its two keys (the link signer's, the sealing box's);
    ConfigError, in one line, when it cannot be used (a file in its path, no permission)."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the owner's only
        return (
            load_or_create_key(data_dir / "secret.key"),
            load_or_create_key(data_dir / "secrets.key"),
        )
    except OSError as error:
        where = "" if error.filename in (None, str(data_dir)) else f": {error.filename}"
        reason = error.strerror or str(error)
        raise ConfigError(f"data directory {data_dir}: cannot be used ({reason}{where})") from None


def create_app(
    settings: Settings,
    *,
    clock: Clock = utc_now,
    catalogue: Catalogue | None = None,
    engines: Mapping[str, EngineSource] = BUILTIN,
    dispatcher: DispatcherFactory | None = None,
    resume: bool = True,
) -> FastAPI:
    """The ASGI app. Its lifespan opens the service and, with `resume`, takes the runner lock
    and resumes unfinished jobs (without it, as a second API process in tests, the app runs
    only the jobs it admits)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        parts = open_server(
            settings, clock=clock, catalogue=catalogue, engines=engines, dispatcher=dispatcher
        )
        async with (
            parts as server,
            background(server, settings, clock, resume) as runners,
            mcp_endpoint.running(),  # the MCP route's session manager: stops before the service
        ):
            app.state.server = server
            app.state.service = server.service
            app.state.readiness = Readiness(
                server.db,
                server.blobs,
                _runner_tasks(server, runners) if server.runs_jobs else None,
            )
            try:
                yield
            finally:
                server.events.stop()  # in case the server did not say so sooner (`stopping`)
                app.state.readiness = None

    app = FastAPI(
        title="dreamserve",
        version=__version__,
        summary="Self-hosted server for the Dreamina image-generation API",
        lifespan=lifespan,
        docs_url=None,  # install_docs: pages that load nothing from a CDN
        redoc_url=None,
    )
    install_docs(app)
    install_studio(app, settings.base_url, presigned=settings.blob_links == "presigned")
    app.state.body_reads = BodyReads(
        BodyLimits(
            max_bytes=settings.max_body_bytes,
            reads_per_user=settings.max_body_reads_per_user,
            reads=settings.max_body_reads,
            retry_after=settings.retry_after_seconds,
            spool_dir=settings.data_dir,
        )
    )
    install_error_handlers(app)
    app.state.metrics_token = settings.metrics_token  # GET /metrics (api/metrics.py)
    app.include_router(metrics.router)
    app.add_middleware(HttpMetrics, prefix=API_PREFIX)
    routers = (
        images.router,
        webhooks.router,
        assets.router,
        accounts.router,
        scheduler.router,
        files.router,
        models.router,
    )
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(health.router)  # /healthz, /readyz: root paths, no token
    # /v1/dreamina/mcp: the MCP server (api/mcp.py), not in the OpenAPI document.
    # Imported here, not with the module: the MCP SDK takes ~0.8 s to import, which the CLI's
    # commands that never make an app (tokens, users, accounts, migrate) would pay too.
    from dreamserve.api.mcp import McpEndpoint, request_bytes

    mcp_endpoint = McpEndpoint(
        request_bytes(settings.max_body_bytes, settings.max_upload_bytes),
        settings.retry_after_seconds,
    )
    mcp_route = mcp_endpoint.route(API_PREFIX)
    app.router.routes.append(mcp_route)
    app.state.route_methods = [
        *route_methods(API_PREFIX, routers),
        *route_methods("", [health.router]),
        (mcp_route.path_regex, mcp_route.methods or set()),
    ]
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    return app


async def run_worker(
    settings: Settings,
    accounts: Sequence[str] | None,
    stop: asyncio.Event,
    *,
    engines: Mapping[str, EngineSource] = BUILTIN,
    started: asyncio.Event | None = None,
    relist_seconds: float = RELIST_SECONDS,
) -> None:
    """`dreamserve worker`: run the jobs of `accounts` (None: of every account whose engine
    this process can load, read again every `relist_seconds` for accounts added later) that API
    processes on the same PostgreSQL admit, until `stop` is set; no HTTP, no webhooks (the API
    processes send them). The reaper runs here too."""
    if not settings.database.startswith("postgresql"):
        raise ConfigError(
            "dreamserve worker needs PostgreSQL (DREAMSERVE_DATABASE_URL): on SQLite, "
            "`dreamserve serve` runs the jobs itself"
        )
    named = None if accounts is None else list(dict.fromkeys(accounts))
    parts = open_server(settings, engines=engines, worker_accounts=named or [], runs_jobs=True)
    async with parts as server, background(server, settings, utc_now, True, deliver=False):
        dispatcher = server.dispatcher
        assert isinstance(dispatcher, PostgresDispatcher)
        picker = AccountPicker(server.db, server.admission.engines)
        if named is not None:
            for name in await picker.missing(named):
                log.warning("worker: account %s does not exist (yet); its jobs run here", name)
            for name, why in (await picker.pick()).left.items():
                if name in named:  # its jobs would fail here: said, not refused (as asked)
                    log.warning("worker: account %s cannot run here: %s", name, why)
            log.info("worker started: runs the jobs of %s", ", ".join(named))
            relisting = None
        else:
            picked = await picker.pick()
            dispatcher.work(picked.taken)
            _log_picked(picked.taken, picked.left)
            relist = _relist(picker, dispatcher, set(picked.left), relist_seconds)
            relisting = asyncio.create_task(relist, name="worker-accounts")
        if started is not None:
            started.set()
        try:
            await stop.wait()
        finally:
            if relisting is not None:
                relisting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relisting
        await _finish_running(dispatcher, settings.stop_grace_seconds)  # then `close` stops them


def _log_picked(taken: Sequence[str], left: Mapping[str, str]) -> None:
    runs = ", ".join(taken) if taken else "no account yet"
    leaves = "".join(f"; leaves {name}: {why}" for name, why in left.items())
    log.info(
        "worker started: runs the jobs of %s (every account whose engine loads here)%s",
        runs,
        leaves,
    )


async def _relist(
    picker: AccountPicker, dispatcher: PostgresDispatcher, left: set[str], every: float
) -> None:
    """Take the accounts added since (whose engines load here); say once which are left."""
    while True:
        await asyncio.sleep(every)
        try:
            picked = await picker.pick()
        except Exception as error:  # the database is down: next round
            log.warning("worker: accounts not read (%s); reading them again later", error)
            continue
        new = dispatcher.work(picked.taken)
        newly_left = {name: why for name, why in picked.left.items() if name not in left}
        left.update(newly_left)
        if new:
            log.info("worker: now also runs the jobs of %s", ", ".join(new))
        for name, why in newly_left.items():
            log.info("worker: leaves %s: %s", name, why)


def stopping(app: FastAPI) -> None:
    """The server starts to shut down: submissions are refused (503 `Server is stopping`, with
    Retry-After), and requests that wait on a job (`?wait=`, event streams) answer with the
    job as it is and end, instead of holding the shutdown until it ends. Nothing when the app
    has not started."""
    server: Server | None = getattr(app.state, "server", None)
    if server is not None:
        server.service.submissions.stopping = True
        server.events.stop()


async def finish_running(app: FastAPI, grace: float) -> int:
    """After `stopping`: start no more jobs here, and wait up to `grace` seconds
    (DREAMSERVE_STOP_GRACE_SECONDS) for those running to end; how many still run. The
    lifespan's exit stops those (each keeps its slot and lease, and runs again at the next
    start, or on another process when its lease runs out)."""
    server: Server | None = getattr(app.state, "server", None)
    return 0 if server is None else await _finish_running(server.dispatcher, grace)


async def _finish_running(dispatcher: Dispatcher, grace: float) -> int:
    drain = getattr(dispatcher, "drain", None)  # the built-in dispatchers (not tests' fakes)
    if drain is None:
        return 0
    log.info(
        "stopping: submissions refused (503), no job started; the running ones get up to %g s "
        "to end (DREAMSERVE_STOP_GRACE_SECONDS)",
        grace,
    )
    left: int = await drain(grace)
    if left:
        log.warning(
            "stopping: %d job(s) still running after %g s (DREAMSERVE_STOP_GRACE_SECONDS): "
            "stopped, they run again at the next start",
            left,
            grace,
        )
    return left


async def apply_config(
    service: Service, config: OperatorConfig, *, shared: bool | None = None
) -> None:
    """Save the accounts of the operator's configuration file (an upsert: the same file gives
    the same accounts at every start); with `shared`, only the shared ones (True) or only the
    users' (False). A bad account stops the start, naming it."""
    for configured in config.accounts:
        if shared is not None and (configured.user is None) is not shared:
            continue
        try:
            await service.accounts.put(configured.user, configured.fields)
        except DreamserveError as error:
            name = configured.fields.get("account") or configured.fields.get("email") or "?"
            raise ConfigError(f"account {name}: {error.message}") from None


@asynccontextmanager
async def background(
    server: Server, settings: Settings, clock: Clock, resume: bool, deliver: bool = True
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """The server's background tasks, for as long as it serves: with `deliver`, the webhook
    deliverer; on PostgreSQL, the listener for other processes' job changes; with `resume`,
    the reaper (on every process of a PostgreSQL database: its takings back are conditional
    updates) and, in a process that runs jobs, the runner lock (on PostgreSQL watched:
    `Scheduler.keep_runner_lock`) and the jobs an earlier process left (without `resume`, as a
    second API process in tests, the app runs only the jobs it admits). Yields the tasks of
    these that run jobs (the reaper, the runner lock's watch), for /readyz."""
    tasks: list[asyncio.Task[None]] = []
    runners: list[asyncio.Task[None]] = []
    if deliver:
        tasks.append(asyncio.create_task(server.deliverer.run_forever(), name="webhooks"))
    if settings.database.startswith("postgresql"):
        feed = PostgresFeed(settings.database, server.events)
        tasks.append(asyncio.create_task(feed.run_forever(), name="job-notifications"))
    try:
        if resume and server.runs_jobs:
            for jobid in await server.service.scheduler.resume():
                log.warning("job %s failed: the server stopped while it ran too often", jobid)
        if isinstance(server.dispatcher, PostgresDispatcher):
            server.dispatcher.start()  # once resumed: a job it claimed would be taken back
        if resume:
            reaper = Reaper(
                server.store,
                server.blobs,
                server.dispatcher,
                clock,
                ReaperConfig(
                    settings.reaper_interval_seconds,
                    server.service.config.max_attempts,
                    settings.retention_days,
                    settings.lease_seconds,
                ),
            )
            reaping = asyncio.create_task(reaper.run_forever(), name="reaper")
            runners.append(reaping)
            if server.db.shared and server.runs_jobs:  # a PostgreSQL lock lives with a connection
                watch = _keep_runner_lock(server.service.scheduler, reaping)
                runners.append(asyncio.create_task(watch, name="runner-lock"))
            tasks.extend(runners)
        yield runners
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _runner_tasks(
    server: Server, runners: list[asyncio.Task[None]]
) -> Callable[[], list[asyncio.Task[None]]]:
    """The tasks that run jobs in this process, as /readyz checks them: the background's and,
    on PostgreSQL, procrastinate's (its workers and their sweep)."""
    dispatcher = server.dispatcher
    if isinstance(dispatcher, PostgresDispatcher):
        return lambda: [*runners, *dispatcher.tasks()]
    return lambda: list(runners)


# How soon a PostgreSQL server learns that its runner lock's connection ended: the longest
# another server that takes the lock meanwhile may run a job this one still runs.
RUNNER_LOCK_CHECK_SECONDS = 1.0


async def _keep_runner_lock(scheduler: Scheduler, reaping: asyncio.Task[None]) -> None:
    """Keep the runner lock; when another server took it, stop this one's runners and reaper
    (requeueing is the holder's now)."""
    await scheduler.keep_runner_lock(RUNNER_LOCK_CHECK_SECONDS)
    reaping.cancel()


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its 422 `detail` responses: every error here is a 400 (or
    other status) with an `{"error"}` body, which the routes declare themselves (the image
    routes' own 422, an Idempotency-Key used with another request, stays)."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        for path in document["paths"].values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if "HTTPValidationError" in str(responses.get("422")):
                    del responses["422"]
        document.setdefault("components", {})["securitySchemes"] = BEARER_SCHEME
        schemas = document["components"].get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = document
    return app.openapi_schema
