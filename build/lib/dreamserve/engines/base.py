"""The engine contract: what every engine (procedural, diffusers, HTTP APIs) implements.

Engines know nothing of HTTP, SQL or jobs: they take a `GenerationRequest`, report progress, watch
a cancel signal, and return images.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar, runtime_checkable

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict

from dreamserve.catalogue import Model
from dreamserve.errors import Cancelled

T = TypeVar("T")

# Called with the fraction done (0 to 1); safe to call from any thread.
ProgressCallback = Callable[[float], None]

# A request's seed is 0 to SEEDS - 1 (POST /images takes 0-2147483647, `submission.MAX_SEED`).
SEEDS = 2**31


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` (0-based) of a job of seed `seed`: `seed + index`, wrapping
    past 2147483647 to 0, so that it is always a seed a request may give.

    A seeded engine (`seeded = True`) makes image `index` from this seed alone: a request with
    this seed and `count` 1 (same prompt, model, size, references and strength) makes the same
    image."""
    return (seed + index) % SEEDS


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    model: str
    width: int
    height: int
    count: int
    references: tuple[Image.Image, ...] = ()
    strength: float = 0.5
    # Always set by the server (picked at random at admission when the client gave none); None
    # only for a job admitted before it did, or an engine called directly.
    seed: int | None = None


@dataclass(frozen=True)
class UpscaleRequest:
    image: Image.Image  # the source image, decoded
    width: int  # the target size
    height: int
    original_strength: float = 0.65  # how much of a plain resample the result keeps
    detail_strength: float = 0.5  # how much detail the engine adds


class CancelSignal:
    """Set by the server when a job must stop; engines poll it between units of work."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        with self._lock:
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` once, when the signal is set (now, if it is), in the thread that
        sets it: for a waiter that must not poll. Returns what forgets the callback."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return partial(self._forget, callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_set(self) -> None:
        if self._event.is_set():
            raise Cancelled


class EngineSettings(BaseModel):
    """The settings an account gives its engine, validated when the account is saved.

    Engines subclass it as their `Settings` attribute. Unknown keys are refused; fields typed
    `SecretStr` are secrets: stored encrypted, never returned by the API nor logged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class EngineContext:
    """What the server lends every engine: an executor for blocking work off the event loop,
    and whether the engine may connect to private addresses (an operator's shared account, or
    a server that allows it: DREAMSERVE_UPSTREAM_ALLOW_PRIVATE)."""

    executor: Executor
    allow_private: bool = False


class Engine(Protocol):
    def serves(self, model: Model) -> bool:
        """Whether an account of this engine that lists no models serves a catalogue model."""

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        """Exactly `request.count` images of `request.width` x `request.height`.

        Raises `Cancelled` soon after `cancel` is set, and `JobFailed` when the job cannot produce
        images (the message is stored on the job). Must not block the event loop.
        """

    async def close(self) -> None:
        """Release what the engine holds (models, connections); it is not used afterwards."""

    # Optional: `def can_run(self, model: Model) -> bool`, whether an account may list the
    # model (default: `serves`); for an engine that renders any model but claims only some.
    # Optional: `async def check_address(self) -> None`, raising BadRequest when a user's
    # account with these settings would be refused at every call (an upstream on a private
    # address): asked when a user saves the account.
    # Optional: `def describe(self) -> dict[str, Any]`, live details of the engine (what it is,
    # what it has loaded) for GET /accounts/<account>. Never secrets.
    # Optional: `seeded: bool` (default False), whether the engine honours seeds: image i of a
    # request is made from `image_seed(request.seed, i)` alone, so asking again with that seed
    # and `count` 1 makes the same image. The job record then reports each image's seed. An
    # engine that forwards the seed to a vendor who may not honour it leaves it False.
    # Optional: `image_copies: int`, how many copies of each output image the engine holds at
    # its peak (default 2: the image and a working copy); the server's render-memory budget
    # counts that many for each image of a job (render_memory.py).


class EngineFactory(Protocol):
    """Builds engines. Its `Settings` attribute, when it has one, is the `EngineSettings` model
    of the accounts it serves (none: the engine takes no settings)."""

    def __call__(self, settings: Mapping[str, Any], context: EngineContext) -> Engine:
        """Build an engine from an account's settings (secrets included). Must be cheap: load
        models and open connections on first use, not here."""


@runtime_checkable
class Upscaler(Protocol):
    """An engine that can also upscale (POST /images/upscale runs only on such accounts)."""

    async def upscale(
        self, request: UpscaleRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> Image.Image:
        """One image of exactly `request.width` x `request.height` made from `request.image`.
        Raises `Cancelled` soon after `cancel` is set; must not block the event loop."""


CANCEL_POLL_SECONDS = 0.1


async def until_cancelled(work: Awaitable[T], cancel: CancelSignal) -> T:
    """The result of `work`, or `Cancelled` soon after `cancel` is set (the work is then
    cancelled): for engines that wait on the network rather than compute."""
    task = asyncio.ensure_future(work)
    try:
        cancel.raise_if_set()
        while True:
            done, _ = await asyncio.wait({task}, timeout=CANCEL_POLL_SECONDS)
            if done:
                return task.result()
            cancel.raise_if_set()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # retrieved: a failure after we stopped waiting is not reported


def to_size(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at exactly `width` x `height`, the size the catalogue promises the job.

    Engines whose model renders at other sizes (a pipeline's multiple of 8, an upstream's own
    size table) hand their image here: a different aspect is cropped around the centre first,
    so nothing is stretched."""
    if image.size == (width, height):
        return image
    fitted = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    fitted.info.update(image.info)
    return fitted
