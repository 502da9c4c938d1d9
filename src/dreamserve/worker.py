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
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from PIL import Image, PngImagePlugin
from sqlalchemy import Connection

from dreamserve.engines.base import CancelSignal, GenerationRequest
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import Cancelled, JobFailed
from dreamserve.ids import IdFactory
from dreamserve.jobs import CANCELLED_BY_USER, Job, Status, StoredImage, millis
from dreamserve.settings import ImageFormat
from dreamserve.storage import queries
from dreamserve.storage.blobs import EXTENSIONS, BlobStore
from dreamserve.storage.database import Database
from dreamserve.storage.queries import Account

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerConfig:
    image_format: ImageFormat = "jpeg"
    progress_interval: float = 0.5


class JobRunner:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        engines: EngineRegistry,
        ids: IdFactory,
        clock: Callable[[], datetime],
        executor: Executor,
        config: RunnerConfig,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.engines = engines
        self.ids = ids
        self.clock = clock
        self.executor = executor
        self.config = config

    async def run(self, job_id: int) -> None:
        now = millis(self.clock())

        def claim(conn: Connection) -> tuple[Job, int | None, Account | None] | None:
            claimed = queries.claim_job(conn, job_id, now)
            if claimed is None:
                return None
            job, account_id = claimed
            account = queries.account_by_id(conn, account_id) if account_id else None
            return job, account_id, account

        claimed = await self.db.write(claim)
        if claimed is None:
            return
        job, account_id, account = claimed
        if account is None:
            await self._finish(job, account_id, Status.FAILED, error="Account no longer exists")
            return

        progress = _Progress()
        cancel = CancelSignal()
        flusher = asyncio.create_task(self._flush_progress(job, progress))
        try:
            stored = await self._generate(job, account, progress, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the server is stopping; the job stays unfinished and runs again
            raise
        except Cancelled:
            await self._finish(job, account.id, Status.FAILED, error=CANCELLED_BY_USER)
        except JobFailed as failure:
            await self._finish(
                job, account.id, Status.FAILED, error=failure.error, details=failure.details
            )
        except Exception as exc:
            log.exception("job %s failed in engine %s", job.jobid, account.engine)
            await self._finish(
                job,
                account.id,
                Status.FAILED,
                error="Image generation failed",
                details=f"{type(exc).__name__}: {exc}",
            )
        else:
            await self._finish(job, account.id, Status.COMPLETED, images=stored)
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher

    async def _generate(
        self, job: Job, account: Account, progress: _Progress, cancel: CancelSignal
    ) -> list[StoredImage]:
        engine = self.engines.engine(
            account.engine, account.settings, account_id=account.id, version=account.updated_at
        )
        spec = job.spec
        references = tuple([await self._reference(key) for key in spec.references])
        request = GenerationRequest(
            prompt=job.request.get("prompt") or "",
            model=job.model,
            width=spec.width,
            height=spec.height,
            count=spec.count,
            references=references,
            strength=spec.strength,
            seed=spec.seed,
        )
        images = await engine.generate(request, progress.report, cancel)
        if len(images) != spec.count:
            raise JobFailed(
                "Image generation failed",
                f"engine {account.engine} returned {len(images)} images, expected {spec.count}",
            )
        return [await self._store(job, image) for image in images]

    async def _reference(self, key: str) -> Image.Image:
        try:
            data = await self.blobs.get(key)
        except FileNotFoundError:
            raise JobFailed("A reference image is no longer available", key) from None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _decode, data)

    async def _store(self, job: Job, image: Image.Image) -> StoredImage:
        now = self.clock()
        image_format = self.config.image_format
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self.executor, encode, image, image_format)
        item_id = self.ids.item_id(now)
        key = f"images/{now:%Y/%m/%d}/{item_id}.{EXTENSIONS[image_format]}"
        await self.blobs.put(key, data)
        return StoredImage(item_id, key, image.width, image.height, image_format, len(data))

    async def _finish(
        self,
        job: Job,
        account_id: int | None,
        status: Status,
        *,
        images: list[StoredImage] | None = None,
        error: str | None = None,
        details: str | None = None,
    ) -> None:
        now = millis(self.clock())
        await self.db.write(
            lambda conn: queries.finish_job(
                conn,
                job,
                account_id,
                status=status,
                now=now,
                images=images or (),
                description=job.request.get("prompt"),
                error=error,
                error_details=details,
            )
        )

    async def _flush_progress(self, job: Job, progress: _Progress) -> None:
        written = 0
        while True:
            await asyncio.sleep(self.config.progress_interval)
            percent = progress.percent
            if percent != written:
                now = millis(self.clock())
                update = partial(queries.set_progress, job_id=job.id, progress=percent, now=now)
                await self.db.write(update)
                written = percent


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


def encode(image: Image.Image, image_format: ImageFormat) -> bytes:
    """The image as a file of `image_format`, keeping its `comment` (the engine's label)."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    comment = str(image.info.get("comment", ""))
    if image_format == "jpeg":
        rgb.save(buffer, "JPEG", quality=92, comment=comment)
    elif image_format == "png":
        info = PngImagePlugin.PngInfo()
        if comment:
            info.add_text("Comment", comment)
        rgb.save(buffer, "PNG", pnginfo=info, compress_level=6)
    else:
        rgb.save(buffer, "WEBP", quality=90)
    return buffer.getvalue()


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")
