"""The job runner: one job from claim to final state.

Claims the job (a conditional update, so a second delivery of the same job does nothing), runs the
account's engine with progress and cancellation, encodes and stores the images off the event loop,
then writes the final state, the images and the slot release in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

from PIL import Image, ImageOps
from sqlalchemy import Connection

from dreamserve.encoding import EXTENSIONS, Encoding, encode
from dreamserve.engines.base import (
    CancelSignal,
    Engine,
    GenerationRequest,
    Upscaler,
    UpscaleRequest,
)
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import AccountError, Cancelled, DatabaseBusy, EngineUnavailable, JobFailed
from dreamserve.ids import IdFactory
from dreamserve.jobs import CANCELLED_BY_USER, Job, Status, StoredImage, millis
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
        config: RunnerConfig,
        account_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.engines = engines
        self.ids = ids
        self.clock = clock
        self.executor = executor
        self.config = config
        self.account_changed = account_changed  # drops admission's cached account lists
        self._signals: dict[int, CancelSignal] = {}  # jobs running here -> their cancel signal

    def cancel(self, job_id: int) -> None:
        """Tell the engine of a job running here to stop (its final state is written by whoever
        ended it); nothing when the job does not run here."""
        signal = self._signals.get(job_id)
        if signal is not None:
            signal.set()

    def _lease_until(self) -> int:
        return millis(self.clock()) + int(self.config.lease_seconds * 1000)

    async def run(self, job_id: int) -> None:
        now = millis(self.clock())
        lease = self._lease_until()

        def claim(tx: JobTransaction) -> tuple[Job, Account | None] | None:
            claimed = tx.claim(job_id, now, lease)
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
        cancel = self._signals[job.id] = CancelSignal()
        heartbeat = asyncio.create_task(self._heartbeat(job, progress, cancel))
        try:
            await self._run_engine(job, account, progress, cancel)
        finally:
            if self._signals.get(job.id) is cancel:  # not a later attempt's (after a requeue)
                del self._signals[job.id]
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _run_engine(
        self, job: Job, account: Account, progress: _Progress, cancel: CancelSignal
    ) -> None:
        try:
            stored = await self._generate(job, account, progress, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the server is stopping; the job stays unfinished and runs again
            raise
        except Cancelled:
            await self._finish(job, Status.FAILED, error=CANCELLED_BY_USER)
        except AccountError as failure:
            log.warning("account %s put in error: %s", account.name, failure.error)
            await self._finish(
                job,
                Status.FAILED,
                error=failure.error,
                details=failure.details,
                account_error=(account, failure.error),
            )
            self.account_changed()
        except JobFailed as failure:
            await self._finish(job, Status.FAILED, error=failure.error, details=failure.details)
        except Exception as exc:
            # The message may hold what the user must not see (a URL, a host, a key in a
            # shared account's settings): the record names the error, the log has it whole.
            log.exception("job %s failed in engine %s", job.jobid, account.engine)
            await self._finish(
                job,
                Status.FAILED,
                error="Image generation failed",
                details=f"{type(exc).__name__} (see the server log)",
            )
        else:
            if not await self._finish(job, Status.COMPLETED, images=stored):
                # Cancelled (or taken back) while the images were being stored: nobody will
                # ever see these files.
                for image in stored:
                    await self.blobs.delete(image.uri)

    async def _generate(
        self, job: Job, account: Account, progress: _Progress, cancel: CancelSignal
    ) -> list[StoredImage]:
        try:
            engine = self.engines.hold(self.engines.for_account(account))
        except EngineUnavailable as missing:  # uninstalled since the account was saved
            raise AccountError("Engine unavailable", missing.message) from None
        try:
            images = await self._images(job, account, engine, progress, cancel)
        finally:
            await self.engines.release(engine)
        # Encoded side by side (in the executor): a 4k JPEG takes a tenth of a second.
        results = await asyncio.gather(
            *(self._store(job, image) for image in images), return_exceptions=True
        )
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
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _decode, data, bound)

    async def _store(self, job: Job, image: Image.Image) -> StoredImage:
        now = self.clock()
        item_id = self.ids.item_id(now)  # before any await: a job's images keep their order
        image_format = self.config.encoding.image_format
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.executor, encode, image, self.config.encoding)
        key = f"images/{now:%Y/%m/%d}/{item_id}.{EXTENSIONS[image_format]}"
        await self.blobs.put(key, data)
        return StoredImage(item_id, key, image.width, image.height, image_format, len(data))

    async def _finish(
        self,
        job: Job,
        status: Status,
        *,
        images: list[StoredImage] | None = None,
        error: str | None = None,
        details: str | None = None,
        account_error: tuple[Account, str] | None = None,
    ) -> bool:
        """Write the job's end (and its account's error), fenced by this attempt: False when
        the job had already ended or was taken back, or when the database stayed busy for a
        whole lease (then the reaper takes the job back and it runs again)."""
        now = millis(self.clock())

        def finish(tx: JobTransaction) -> bool:
            if status is Status.COMPLETED:
                description = _description(tx.conn, job)
                return tx.finish(job, images or (), description, now)
            assert error is not None
            failed = tx.fail(job, error, details, now)
            if failed and account_error is not None:
                account_queries.set_account_error(tx.conn, *account_error)
            return failed

        # The engine's work is lost if its end is not written: worth waiting for, while the
        # heartbeat renews the lease. Past a lease the reaper may have taken the job back (a
        # late end is fenced off then), so the runner gives up and the job runs again.
        give_up = time.monotonic() + self.config.lease_seconds
        while True:
            try:
                return await self.store.write(finish)
            except DatabaseBusy:
                if time.monotonic() >= give_up:
                    log.warning(
                        "job %s: its end was not written, the database stayed busy; it runs "
                        "again once its lease runs out",
                        job.jobid,
                    )
                    return False

    async def _heartbeat(self, job: Job, progress: _Progress, cancel: CancelSignal) -> None:
        """Renew the job's lease and record its progress while it runs; stop the engine when
        the job ended elsewhere (cancelled by another process, its account deleted, reaped)."""
        written = 0
        renewed = time.monotonic()
        every = self.config.lease_seconds / 3
        while True:
            await asyncio.sleep(min(self.config.progress_interval, every))
            percent = progress.percent
            if percent == written and time.monotonic() - renewed < every:
                continue
            update = partial(
                JobTransaction.progress,
                job=job,
                lease_until=self._lease_until(),
                percent=percent if percent != written else None,
                now=millis(self.clock()),
            )
            try:
                renewed_now = await self.store.write(update)
            except DatabaseBusy:
                continue  # tried again at the next turn, while the lease lasts
            if not renewed_now:
                cancel.set()
                self.store.seen_ended(job.jobid)
                return
            written, renewed = percent, time.monotonic()


def _description(conn: Connection, job: Job) -> str | None:
    """What GET /assets says of the job's images: the prompt, or an upscale's source's."""
    if job.type == "upscale" and job.spec.references:
        return asset_queries.description_of(conn, job.user_id, job.spec.references[0])
    return job.spec.prompt


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
