"""The render-memory budget on its own: the estimate, the order reservations are granted in,
and what a cancel leaves; and the cancel signal's callback, which wakes a waiting reservation."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest
from support import eventually

from dreamserve.engines.ark import ArkEngine
from dreamserve.engines.base import CancelSignal
from dreamserve.engines.gemini import GeminiEngine
from dreamserve.engines.openai import OpenAIEngine
from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.errors import Cancelled
from dreamserve.render_memory import RenderMemory, image_copies, render_bytes

pytestmark = [pytest.mark.anyio]


def test_the_estimate_counts_each_image_twice_at_four_bytes_a_pixel() -> None:
    assert render_bytes(1024, 768, 3, []) == 4 * 2 * 3 * 1024 * 768
    assert render_bytes(512, 512, 4, [], image_copies=3) == 4 * 3 * 4 * 512 * 512


def test_references_count_as_decoded_no_larger_than_the_outputs_longer_side() -> None:
    square = 1024 * 1024  # the largest a reference of a 1024x768 job is decoded
    small, huge = 300 * 200, 8000 * 6000
    references = 2 * (small + square + square)  # decoded, and the engine's copy of each
    assert render_bytes(1024, 768, 1, [small, huge, None]) == 4 * (2 * 1024 * 768 + references)


def test_an_engine_says_how_many_copies_it_holds_or_is_given_the_default() -> None:
    class Says:
        image_copies = 3

    class SaysNonsense:
        image_copies = "three"

    assert [image_copies(Says()), image_copies(SaysNonsense()), image_copies(object())] == [3, 2, 2]


def test_the_official_api_engines_count_the_downloaded_file_too() -> None:
    engines = (ArkEngine, GeminiEngine, OpenAIEngine, ProceduralEngine)
    assert [image_copies(engine) for engine in engines] == [3, 3, 3, 2]


async def hold(
    memory: RenderMemory, nbytes: int, stack: AsyncExitStack, cancel: CancelSignal | None = None
) -> None:
    await stack.enter_async_context(memory.reserve(nbytes, cancel or CancelSignal()))


async def test_reservations_are_granted_in_turn_as_memory_frees() -> None:
    memory = RenderMemory(10)
    granted: list[str] = []

    async def job(name: str, nbytes: int, done: asyncio.Event) -> None:
        async with memory.reserve(nbytes, CancelSignal()):
            granted.append(name)
            await done.wait()

    events = {name: asyncio.Event() for name in "abc"}
    tasks = [asyncio.create_task(job("a", 6, events["a"]))]
    await eventually(lambda: granted == ["a"])
    tasks.append(asyncio.create_task(job("b", 6, events["b"])))
    await eventually(lambda: memory.waiting == 1)
    # c would fit beside a, but b came first: it is not passed over.
    tasks.append(asyncio.create_task(job("c", 1, events["c"])))
    await eventually(lambda: memory.waiting == 2)
    assert (granted, memory.in_use) == (["a"], 6)
    events["a"].set()
    await eventually(lambda: granted == ["a", "b", "c"])
    assert (memory.in_use, memory.waiting) == (7, 0)
    events["b"].set()
    events["c"].set()
    await asyncio.gather(*tasks)
    assert memory.in_use == 0


async def test_a_reservation_larger_than_the_budget_is_granted_alone() -> None:
    memory = RenderMemory(10)
    async with AsyncExitStack() as small, AsyncExitStack() as large:
        await hold(memory, 1, small)
        waiting = asyncio.create_task(hold(memory, 50, large))
        await eventually(lambda: memory.waiting == 1)
        await small.aclose()
        await waiting  # granted once nothing else is held, charged the whole budget
        assert (memory.in_use, memory.waiting) == (10, 0)
    assert memory.in_use == 0


async def test_a_cancel_while_waiting_raises_cancelled_and_lets_the_next_in() -> None:
    memory = RenderMemory(10)
    cancel = CancelSignal()
    async with AsyncExitStack() as stack:
        await hold(memory, 8, stack)

        async def waiting() -> None:
            async with memory.reserve(5, cancel):
                raise AssertionError("granted after its cancel")

        first = asyncio.create_task(waiting())
        await eventually(lambda: memory.waiting == 1)
        second = asyncio.create_task(hold(memory, 2, stack))  # fits, but waits its turn
        await eventually(lambda: memory.waiting == 2)
        cancel.set()
        with pytest.raises(Cancelled):
            await first
        await second
        assert (memory.in_use, memory.waiting) == (10, 0)
    assert memory.in_use == 0


async def test_a_task_cancelled_while_waiting_holds_nothing() -> None:
    memory = RenderMemory(10)
    async with AsyncExitStack() as stack:
        await hold(memory, 10, stack)
        waiting = asyncio.create_task(hold(memory, 1, AsyncExitStack()))
        await eventually(lambda: memory.waiting == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (memory.in_use, memory.waiting) == (10, 0)
    assert memory.in_use == 0


async def test_a_task_cancelled_as_its_reservation_is_granted_gives_it_back() -> None:
    memory = RenderMemory(10)
    stack = AsyncExitStack()
    await hold(memory, 10, stack)
    waiting = asyncio.create_task(hold(memory, 4, AsyncExitStack()))
    await eventually(lambda: memory.waiting == 1)
    await stack.aclose()  # grants the waiting one...
    assert memory.in_use == 4
    waiting.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (memory.in_use, memory.waiting) == (0, 0)


def test_a_cancel_signal_calls_back_once_when_set_or_at_once_if_it_is() -> None:
    cancel = CancelSignal()
    calls: list[str] = []
    cancel.on_set(lambda: calls.append("first"))
    forget = cancel.on_set(lambda: calls.append("forgotten"))
    forget()
    assert calls == []
    cancel.set()
    cancel.set()
    assert calls == ["first"]
    cancel.on_set(lambda: calls.append("late"))
    assert calls == ["first", "late"]


async def test_a_cancel_set_from_another_thread_wakes_a_waiting_reservation() -> None:
    memory = RenderMemory(10)
    cancel = CancelSignal()
    async with AsyncExitStack() as stack:
        await hold(memory, 10, stack)
        waiting = asyncio.create_task(hold(memory, 1, AsyncExitStack(), cancel))
        await eventually(lambda: memory.waiting == 1)
        await asyncio.to_thread(cancel.set)
        with pytest.raises(Cancelled):
            await waiting
        assert memory.waiting == 0
