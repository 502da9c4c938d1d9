"""The render-memory budget: the pixels that the jobs in progress in this process may hold.

Admission bounds jobs per account; nothing there bounds what they hold together, and a job's
images (its decoded references, the images its engine returns, the files they are encoded to)
are its largest part by far. A runner therefore reserves its job's estimate here before it
touches a pixel and gives it back once the images are stored: a job waiting for a reservation
holds only its record, however many jobs the accounts' caps admit.

Reservations are granted first come, first served (a large job is not passed over for ever by
small ones behind it), and one larger than the whole budget is granted alone, when nothing else
is reserved, rather than never.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from dreamserve.engines.base import CancelSignal

# Pillow keeps an RGB image in four bytes a pixel (RGBX), as it does RGBA.
BYTES_PER_PIXEL = 4
# What an engine holds of each output image at its peak, unless it says otherwise (its optional
# `image_copies`): the image, and one working copy (a reference fitted to the output, a file
# being encoded).
IMAGE_COPIES = 2
# A decoded reference, and the copy an engine makes of it (converted, fitted or re-encoded).
REFERENCE_COPIES = 2


def image_copies(engine: object) -> int:
    """The copies of an image `engine` says it holds (its optional `image_copies`), or the
    default when it says nothing usable."""
    copies = getattr(engine, "image_copies", IMAGE_COPIES)
    return copies if isinstance(copies, int) and copies >= 1 else IMAGE_COPIES


def render_bytes(
    width: int,
    height: int,
    count: int,
    reference_pixels: Sequence[int | None],
    image_copies: int = IMAGE_COPIES,
) -> int:
    """The estimate of a job's pixels in bytes: `count` images of `width` x `height`, each held
    `image_copies` times, and its references as decoded (each at most the output's longer side
    square: the runner decodes them no larger; None: a reference of unknown size)."""
    bound = max(width, height) ** 2
    references = sum(bound if pixels is None else min(pixels, bound) for pixels in reference_pixels)
    outputs = count * width * height * image_copies
    return BYTES_PER_PIXEL * (outputs + REFERENCE_COPIES * references)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RenderMemory:
    """A budget of bytes shared by every job this process runs, whatever its account."""

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError("a render-memory budget is at least one byte")
        self.budget = budget
        self.in_use = 0  # bytes reserved by jobs in progress
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """How many reservations wait for the budget to free."""
        return len(self._waiters)

    @asynccontextmanager
    async def reserve(self, nbytes: int, cancel: CancelSignal) -> AsyncIterator[None]:
        """Hold `nbytes` of the budget (all of it, when more is asked) for the block; wait
        first, in turn, until they are free. Raises `Cancelled` soon after `cancel` is set
        while waiting: the job then holds nothing."""
        charge = min(nbytes, self.budget)
        await self._acquire(charge, cancel)
        try:
            yield
        finally:
            self._release(charge)

    async def _acquire(self, charge: int, cancel: CancelSignal) -> None:
        cancel.raise_if_set()
        if not self._waiters and self.in_use + charge <= self.budget:
            self.in_use += charge
            return
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        cancelled: asyncio.Future[None] = loop.create_future()

        def wake() -> None:  # from whichever thread sets the cancel
            loop.call_soon_threadsafe(_settle, cancelled)

        entry = (charge, granted)
        self._waiters.append(entry)
        # Woken by the cancel rather than polling it: a burst may leave thousands waiting.
        forget = cancel.on_set(wake)
        try:
            await asyncio.wait({granted, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not granted.done():
                cancel.raise_if_set()
        except BaseException:  # Cancelled, or the task itself cancelled (a shutdown)
            if granted.done():
                self._release(charge)  # granted as it ended: given back at once
            else:
                self._waiters.remove(entry)
                self._grant()  # the ones behind it may fit now
            raise
        finally:
            forget()

    def _release(self, charge: int) -> None:
        self.in_use -= charge
        self._grant()

    def _grant(self) -> None:
        """Grant the waiting reservations that fit, in order, up to the first that does not."""
        while self._waiters:
            charge, granted = self._waiters[0]
            if self.in_use + charge > self.budget:
                return
            self._waiters.popleft()
            self.in_use += charge
            granted.set_result(None)
