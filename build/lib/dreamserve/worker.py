"""The job runner: one job from claim to final state.

Claims the job (a conditional update, so a second delivery of the same job does nothing), waits
for its share of the render-memory budget, runs the account's engine with progress and
cancellation, encodes and stores the images off the event loop, gives the memory back, then writes
the final state, the images and the slot release in one transaction. Meanwhile it renews the job's
lease; a runner that cannot stops its engine before the lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

from PIL import Image, ImageOps
from sqlalchemy import Connection

from dreamserve import observe
from dreamserve.encoding import EXTENSIONS, Encoding, encode
from dreamserve.engines.base import (
    CancelSignal,
    Engine,
    GenerationRequest,
    Upscaler,
    UpscaleRequest,
    image_seed,
)
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import (
    AccountError,
    AccountTrouble,
    Cancelled,
    DatabaseBusy,
    EngineUnavailable,
    JobFailed,
    StorageFull,
)
from dreamserve.ids import IdFactory
from dreamserve.jobs import CANCELLED_BY_USER, Job, Status, StoredImage, millis
from dreamserve.render_memory import RenderMemory, image_copies, render_bytes
from dreamserve.render_threads import take_turn
from dreamserve.storage import account_queries, asset_queries
from dreamserve.storage.account_queries import Account
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.job_store import JobStore, JobTransaction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerConfig:
    encoding: Encoding = field(default_factory=Encoding)
    progress_interval: float = 0.5
    lease_seconds: float = 30.0  # a runner silent this long is presumed dead (the reaper)


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        blobs: BlobStore,
        engines: EngineRegistry,
        ids: IdFactory,
        clock: Callable[[], datetime],
        executor: Executor,
        memory: RenderMemory,
        config: RunnerConfig,
        account_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.engines = engines
        self.ids = ids
        self.clock = clock
        self.executor = executor
        self.memory = memory  # shared by every job: none holds pixels before it has its share
        self.config = config
        self.account_changed = account_changed  # drops admission's cached account lists
        self._signals: dict[int, CancelSignal] = {}  # jobs running here -> their cancel signal
        self._jobids: dict[str, int] = {}  # the jobids of the jobs running here -> their ids
        self._runs: dict[int, observe.JobRun] = {}  # the jobs running here -> their timings
        self._turns = itertools.count(1)  # the order jobs got their memory in (render_threads)

    def cancel(self, job_id: int) -> None:
        """Tell the engine of a job running here to stop (its final state is written by whoever
        ended it); nothing when the job does not run here."""
        signal = self._signals.get(job_id)
        if signal is not None:
            signal.set()

    def ended(self, jobid: str) -> None:
        """A job ended (published by this process, or by another through PostgreSQL's
        notifications): stop its engine if it runs here. A cancel through another API process
        reaches the engine at once, not at the next lease renewal."""
        job_id = self._jobids.get(jobid)
        if job_id is not None:
            self.cancel(job_id)

    def _lease_until(self) -> int:
        return millis(self.clock()) + int(self.config.lease_seconds * 1000)

    async def run(self, job_id: int) -> None:
        leased_at = time.monotonic()  # before lease_until: the runner's count of it ends no later
        now = millis(self.clock())
        lease_until = self._lease_until()

        def claim(tx: JobTransaction) -> tuple[Job, Account | None] | None:
            claimed = tx.claim(job_id, now, lease_until)
            if claimed is None:
                return None
            job, account_id = claimed
            account = account_queries.account_by_id(tx.conn, account_id) if account_id else None
            return job, account

        try:
            claimed = await self.store.write(claim)
        except DatabaseBusy:
            # Still queued, with the lease admission gave it: the reaper dispatches it again.
            log.warning("job %s not started: the database is busy", job_id)
            return
        if claimed is None:
            return
        job, account = claimed
        if account is None:
            await self._finish(job, Status.FAILED, error="Account no longer exists")
            return

        progress = _Progress()
        run = self._runs[job.id] = observe.job_started(job, account.engine, now)
        cancel = self._signals[job.id] = CancelSignal()
        self._jobids[job.jobid] = job.id
        lease = _Lease(self.config.lease_seconds, leased_at)
        heartbeat = asyncio.create_task(self._heartbeat(job, progress, cancel, lease))
        try:
            await self._run_engine(job, account, progress, cancel, lease)
        finally:
            if self._signals.get(job.id) is cancel:  # not a later attempt's (after a requeue)
                del self._signals[job.id]
                self._jobids.pop(job.jobid, None)
            if self._runs.get(job.id) is run:
                del self._runs[job.id]
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _run_engine(
        self,
        job: Job,
        account: Account,
        progress: _Progress,
        cancel: CancelSignal,
        lease: _Lease,
    ) -> None:
        try:
            stored = await self._generate(job, account, progress, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the server is stopping; the job stays unfinished and runs again
            raise
        except Exception as failure:
            if lease.is_lost:
                # Stopped because its lease could not be renewed: however the engine ended, the
                # job is the reaper's to run again. A final state written now (the database may
                # be back) would end a job that was only interrupted.
                return
            await self._fail(job, account, failure)
        else:
            ended = not lease.is_lost and await self._finish(
                job, Status.COMPLETED, images=stored, account=account
            )
            if ended and (account.failures or account.cooldown_until is not None):
                observe.account_changed("recovered", account.name, account.engine, job=job)
                self.account_changed()
            if not ended:
                # Cancelled, taken back or its lease given up on while the images were being
                # stored: nobody will ever see these files.
                for image in stored:
                    await self.blobs.delete(image.uri)

    async def _fail(self, job: Job, account: Account, failure: Exception) -> None:
        """Write the end of a job whose engine, or the storing of its images, raised."""
        if isinstance(failure, Cancelled):
            await self._finish(job, Status.FAILED, error=CANCELLED_BY_USER)
        elif isinstance(failure, AccountError):
            observe.account_changed(
                "error", account.name, account.engine, job=job, reason=failure.error
            )
            await self._finish(
                job,
                Status.FAILED,
                error=failure.error,
                details=failure.details,
                account_error=(account, failure.error),
            )
            self.account_changed()
        elif isinstance(failure, AccountTrouble):
            await self._finish(
                job,
                Status.FAILED,
                error=failure.error,
                details=failure.details,
                account=account,
                trouble=failure,
            )
        elif isinstance(failure, JobFailed):
            await self._finish(job, Status.FAILED, error=failure.error, details=failure.details)
        else:
            # The message may hold what the user must not see (a URL, a host, a key in a
            # shared account's settings): the record names the error, the log has it whole.
            log.error("job %s failed in engine %s", job.jobid, account.engine, exc_info=failure)
            await self._finish(
                job,
                Status.FAILED,
                error="Image generation failed",
                details=f"{type(failure).__name__} (see the server log)",
            )

    async def _generate(
        self, job: Job, account: Account, progress: _Progress, cancel: CancelSignal
    ) -> list[StoredImage]:
        """The job's images, stored. Its references are decoded and its engine run only once
        its estimate is reserved, which is given back once the images are stored (or the job
        failed): a job waiting for the budget holds no pixels. Its blocking work then runs in
        its turn on the render threads: before the work of the jobs that got memory after it."""
        copies = image_copies(self._engine(account))
        spec = job.spec
        known = spec.reference_pixels
        sizes = [known[i] if i < len(known) else None for i in range(len(spec.references))]
        nbytes = render_bytes(spec.width, spec.height, spec.count, sizes, copies)
        async with self.memory.reserve(nbytes, cancel):
            take_turn(next(self._turns))
            return await self._render(job, account, progress, cancel)

    def _engine(self, account: Account) -> Engine:
        try:
            return self.engines.for_account(account)
        except EngineUnavailable as missing:  # uninstalled since the account was saved
            raise AccountError("Engine unavailable", missing.message) from None

    async def _render(
        self, job: Job, account: Account, progress: _Progress, cancel: CancelSignal
    ) -> list[StoredImage]:
        # Taken again: the account's engine may have been replaced while the job waited.
        engine = self.engines.hold(self._engine(account))
        run = self._runs.get(job.id)
        if run is not None:
            run.lap()  # the engine's time from here (not the wait for memory)
        try:
            images = await self._images(job, account, engine, progress, cancel)
        finally:
            await self.engines.release(engine)
        if run is not None:
            run.rendered()
        # An engine may return its images after a cancel (it was finishing a step): the job
        # ended, or is no longer this runner's, so they are neither encoded nor stored.
        cancel.raise_if_set()
        seeds = _seeds(job, engine)
        # Encoded side by side (in the executor): a 4k JPEG takes a tenth of a second.
        results = await asyncio.gather(
            *(
                self._store(job, image, seed, cancel)
                for image, seed in zip(images, seeds, strict=True)
            ),
            return_exceptions=True,
        )
        if run is not None:
            run.stored()
        stored = [result for result in results if isinstance(result, StoredImage)]
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            for image in stored:  # nobody will ever see them
                await self.blobs.delete(image.uri)
            raise failures[0]
        return stored

    async def _images(
        self, job: Job, account: Account, engine: Engine, progress: _Progress, cancel: CancelSignal
    ) -> list[Image.Image]:
        spec = job.spec
        bound = max(spec.width, spec.height)  # references are never needed larger than this
        references = tuple([await self._reference(key, bound) for key in spec.references])
        if job.type == "upscale":
            if not isinstance(engine, Upscaler):  # the account changed engine since admission
                raise JobFailed("Image upscale failed", f"engine {account.engine} cannot upscale")
            upscale = UpscaleRequest(
                references[0], spec.width, spec.height, spec.strength, spec.detail
            )
            images = [await engine.upscale(upscale, progress.report, cancel)]
        else:
            request = GenerationRequest(
                prompt=job.spec.prompt or "",
                model=job.model,
                width=spec.width,
                height=spec.height,
                count=spec.count,
                references=references,
                strength=spec.strength,
                seed=spec.seed,
            )
            images = await engine.generate(request, progress.report, cancel)
        sizes = [image.size for image in images]
        if sizes != [(spec.width, spec.height)] * spec.count:
            raise JobFailed(
                "Image generation failed",
                f"engine {account.engine} returned images of {sizes}, expected "
                f"{spec.count} of {spec.width}x{spec.height}",
            )
        return images

    async def _reference(self, key: str, bound: int) -> Image.Image:
        try:
            data = await self.blobs.get(key)
        except FileNotFoundError:
            raise JobFailed("A reference image is no longer available", key) from None
        except OSError as error:
            log.error("reference %s cannot be read: %s", key, error)
            raise JobFailed("Storage unavailable", _STORE_DOWN) from None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _decode, data, bound)

    async def _store(
        self, job: Job, image: Image.Image, seed: int | None, cancel: CancelSignal
    ) -> StoredImage:
        now = self.clock()
        item_id = self.ids.item_id(now)  # before any await: a job's images keep their order
        image_format = self.config.encoding.image_format
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        data = await loop.run_in_executor(self.executor, encode, image, self.config.encoding)
        observe.image_encoded(image_format, time.monotonic() - started)
        cancel.raise_if_set()  # cancelled while encoding: nothing written
        key = f"images/{now:%Y/%m/%d}/{item_id}.{EXTENSIONS[image_format]}"
        try:
            started = time.monotonic()
            await self.blobs.put(key, data)
            observe.image_stored(time.monotonic() - started)
        except StorageFull:
            # The operator's to fix, not the prompt's: the record says so rather than "OSError".
            log.error("job %s: its images cannot be stored, the blob store is full", job.jobid)
            raise JobFailed("Storage full", _NO_SPACE) from None
        except OSError as error:  # an object store unreachable after its retries, a disk error
            log.error("job %s: its images cannot be stored: %s", job.jobid, error)
            raise JobFailed("Storage unavailable", _STORE_DOWN) from None
        return StoredImage(
            item_id, key, image.width, image.height, image_format, len(data), seed=seed
        )

    async def _finish(
        self,
        job: Job,
        status: Status,
        *,
        images: list[StoredImage] | None = None,
        error: str | None = None,
        details: str | None = None,
        account_error: tuple[Account, str] | None = None,
        account: Account | None = None,
        trouble: AccountTrouble | None = None,
    ) -> bool:
        """Write the job's end (and its account's error, or its health: a completion ends a
        cooldown, `trouble` counts towards one), fenced by this attempt: False when the job had
        already ended or was taken back, or when the database stayed busy or full for a whole
        lease (then the reaper takes the job back and it runs again)."""
        now = millis(self.clock())
        cooling: list[int] = []

        def finish(tx: JobTransaction) -> bool:
            if status is Status.COMPLETED:
                description = _description(tx.conn, job)
                completed = tx.finish(job, images or (), description, now)
                if completed and account is not None:
                    account_queries.account_succeeded(tx.conn, account.id)
                return completed
            assert error is not None
            failed = tx.fail(job, error, details, now)
            if failed and account_error is not None:
                account_queries.set_account_error(tx.conn, *account_error)
            if failed and account is not None and trouble is not None:
                asked = None if trouble.cool_for is None else int(trouble.cool_for * 1000)
                until = account_queries.account_failed(tx.conn, account.id, error, now, asked)
                cooling[:] = [] if until is None else [until]
            return failed

        ended = await self._write_end(job, finish)
        if ended:
            observe.job_ended(job, self._runs.get(job.id), status, error, now)
        if ended and account is not None and cooling:
            seconds = (cooling[0] - now) / 1000
            observe.account_changed(
                "cooldown", account.name, account.engine, job=job, reason=error, cooldown_s=seconds
            )
            self.account_changed()  # admission here sees it now, elsewhere within its cache
        return ended

    async def _write_end(self, job: Job, finish: Callable[[JobTransaction], bool]) -> bool:
        """Write the job's end, tried again while the database is busy or has no space left:
        the engine's work is lost if its end is not written, so it is worth waiting for, while
        the heartbeat renews the lease. Past a lease the reaper may have taken the job back (a
        late end is fenced off then), so the runner gives up: False, and the job runs again."""
        give_up = time.monotonic() + self.config.lease_seconds
        told = False
        while True:
            try:
                return await self.store.write(finish)
            except DatabaseBusy:  # it waited for the lock already
                why = "the database stayed busy"
            except StorageFull:  # a full disk answers at once: a pause between tries
                why = "the database had no space left"
                if not told:  # once, not at every try
                    log.warning(
                        "job %s: its end was not written, the database has no space left; "
                        "trying again",
                        job.jobid,
                    )
                    told = True
                await asyncio.sleep(_FULL_RETRY_SECONDS)
            if time.monotonic() >= give_up:
                log.warning(
                    "job %s: its end was not written, %s; it runs again once its lease runs out",
                    job.jobid,
                    why,
                )
                return False

    async def _heartbeat(
        self, job: Job, progress: _Progress, cancel: CancelSignal, lease: _Lease
    ) -> None:
        """Renew the job's lease and record its progress while it runs; stop the engine when
        the job ended elsewhere (cancelled by another process, its account deleted, reaped), or
        when the lease could not be renewed in time (`lease.is_lost`: the reaper's job now)."""
        every = self.config.lease_seconds / 3
        written, failures = 0, 0
        while True:
            if failures:
                delay = _retry_delay(failures, every)
            else:
                delay = min(self.config.progress_interval, every)
            await asyncio.sleep(max(0.0, min(delay, lease.time_to_give_up())))
            if lease.time_to_give_up() <= 0:
                lease.is_lost = True
                cancel.set()
                log.warning(
                    "job %s: lease not renewed for %.1f s; engine stopped, job left for the reaper",
                    job.jobid,
                    lease.age(),
                )
                return
            percent = progress.percent
            if not failures and percent == written and lease.age() < every:
                continue
            try:
                renewed = await self._renew(job, percent if percent != written else None, lease)
            except Exception as error:  # whatever it was, the lease was not renewed
                # A database blip, or a write still hanging when the runner must give up
                # (TimeoutError). One line each: a flood of tracebacks would hide the outage.
                failures += 1
                log.warning(
                    "job %s: lease renewal failed (%s); retrying", job.jobid, _one_line(error)
                )
                continue
            if not renewed:
                cancel.set()
                self.store.seen_ended(job.jobid)
                return
            written, failures = percent, 0

    async def _renew(self, job: Job, percent: int | None, lease: _Lease) -> bool:
        """Renew the lease (with the progress, when it changed) before the runner must give up
        on it; False when this attempt no longer runs the job."""
        at = time.monotonic()
        update = partial(
            JobTransaction.progress,
            job=job,
            lease_until=self._lease_until(),
            percent=percent,
            now=millis(self.clock()),
        )
        async with asyncio.timeout(lease.time_to_give_up()):
            renewed = await self.store.write(update)
        if renewed:
            lease.renewed_at = at
        return renewed


_FULL_RETRY_SECONDS = 0.5  # between tries of a job's end while the database has no space left

_STORE_DOWN = "the server's image store cannot be reached; try again later"
_NO_SPACE = (
    "the server has no space left to store the images; try again once its operator has freed some"
)


def _seeds(job: Job, engine: Engine) -> list[int | None]:
    """The seed of each of the job's images, for its record: image i of seed s was made with
    s + i when its engine honours seeds (`seeded`); None where it does not, for an upscale, or a
    job admitted before the server picked seeds."""
    seed = job.spec.seed
    if job.type != "image" or seed is None or not getattr(engine, "seeded", False):
        return [None] * job.spec.count
    return [image_seed(seed, index) for index in range(job.spec.count)]


def _description(conn: Connection, job: Job) -> str | None:
    """What GET /assets says of the job's images: the prompt, or an upscale's source's."""
    if job.type == "upscale" and job.spec.references:
        return asset_queries.description_of(conn, job.user_id, job.spec.references[0])
    return job.spec.prompt


class _Lease:
    """An attempt's lease as its runner counts it: on the monotonic clock (the wall clock may
    jump), from before its `lease_until` was computed, so never ending later than the stored one.

    The runner gives up on it with a third of it left: renewals that fail are retried until
    then, and then the engine is stopped. That third (10 s by default) is for the engine to see
    its cancel (engines poll it between steps), for an event loop that stalls, and for a reaper
    whose clock (another host's) runs ahead of this one: the reaper must never take the job back
    while this attempt still runs. A healthy runner renews with two thirds left, so its retries
    get a third of the lease as well.
    """

    def __init__(self, seconds: float, renewed_at: float) -> None:
        self.seconds = seconds
        self.renewed_at = renewed_at  # time.monotonic() when the stored lease was computed
        self.is_lost = False  # given up on: the engine was told to stop, the job left alone

    def age(self) -> float:
        return time.monotonic() - self.renewed_at

    def time_to_give_up(self) -> float:
        return self.renewed_at + self.seconds * 2 / 3 - time.monotonic()


def _retry_delay(failures: int, window: float) -> float:
    """The wait before retrying a renewal that failed `failures` times in a row: from 1/32 of
    the `window` the retries have, doubling up to an eighth of it (about ten tries in all)."""
    return min(window / 32 * 2.0 ** (failures - 1), window / 8)


def _one_line(error: BaseException) -> str:
    """An error's type and the first line of its message (a database error's message goes on
    with its SQL and a link)."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class _Progress:
    """The latest fraction an engine reported, from whichever thread it reports."""

    def __init__(self) -> None:
        self.fraction = 0.0

    def report(self, fraction: float) -> None:
        self.fraction = fraction

    @property
    def percent(self) -> int:
        # 100 is reserved for the finished job: a job whose images are being stored is at 99.
        return max(0, min(99, int(self.fraction * 100)))


def _decode(data: bytes, bound: int) -> Image.Image:
    """The image upright (EXIF orientation applied), in RGB, its longer side at most `bound`:
    a JPEG is decoded at a reduced scale where it can be, so memory follows the output."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (bound, bound))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
        image.load()
        upright = ImageOps.exif_transpose(image).convert("RGB")
    if max(upright.size) > bound:
        upright.thumbnail((bound, bound), Image.Resampling.LANCZOS)
    return upright
