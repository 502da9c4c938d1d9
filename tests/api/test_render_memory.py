"""The render-memory budget: however many jobs the caps admit, only those whose pixels fit the
budget render at once; the others wait, holding no pixels, and every reservation is given back
however its job ends. And the render threads run the work of the job that got its memory first
first, so a job's images are stored before later jobs render theirs.

SMALL renders one 1024x1024 image: 8 MiB in the budget (4 bytes a pixel, two copies), so a
20 MiB budget holds two such jobs at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

import pytest
from PIL import Image
from support import SMALL, Harness, _SharedEngine, eventually, open_harness

from dreamserve.engines.base import CancelSignal, EngineContext, GenerationRequest, UpscaleRequest
from dreamserve.errors import JobFailed
from dreamserve.render_memory import render_bytes
from dreamserve.settings import Settings

pytestmark = [pytest.mark.anyio]

MIB = 1 << 20
SMALL_BYTES = 8 * MIB


class MeteredEngine(_SharedEngine):
    """Blank images behind a gate (or, as told, a failure or a crash once it opens); counts the
    jobs inside it at once. A job's cancel is seen while it waits at the gate."""

    def __init__(self, outcome: str = "images", image_copies: int | None = None) -> None:
        self.gate = asyncio.Event()
        self.outcome = outcome
        self.started = 0
        self.active = 0
        self.peak = 0
        if image_copies is not None:
            self.image_copies = image_copies

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        await self._run(cancel)
        return [Image.new("RGB", (request.width, request.height)) for _ in range(request.count)]

    async def upscale(
        self, request: UpscaleRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> Image.Image:
        await self._run(cancel)
        return Image.new("RGB", (request.width, request.height))

    async def _run(self, cancel: CancelSignal) -> None:
        self.started += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            while not self.gate.is_set():  # polled, as engines poll their cancel
                cancel.raise_if_set()
                await asyncio.sleep(0.01)
            if self.outcome == "fail":
                raise JobFailed("Image generation failed", "as the test asked")
            if self.outcome == "crash":
                raise RuntimeError("as the test asked")
        finally:
            self.active -= 1


def budgeted(settings: Settings, megabytes: int) -> Settings:
    return settings.model_copy(update={"render_memory_mb": megabytes})


async def submit(harness: Harness, count: int, body: dict[str, object] = SMALL) -> list[str]:
    jobids = []
    for _ in range(count):
        reply = await harness.post(body)
        assert reply.status_code == 200, reply.text
        jobids.append(reply.json()["jobid"])
    return jobids


async def started(engine: MeteredEngine, count: int) -> None:
    await eventually(lambda: engine.started >= count)


async def test_only_the_jobs_that_fit_the_budget_render_the_others_wait(settings) -> None:
    engine = MeteredEngine()
    async with open_harness(budgeted(settings, 20), engines={"procedural": engine.factory}) as h:
        memory = h.server.memory
        jobids = await submit(h, 6)
        await eventually(lambda: memory.waiting == 4)
        await started(engine, 2)
        assert (engine.started, memory.in_use) == (2, 2 * SMALL_BYTES)
        waiting = (await h.get(jobids[-1])).json()  # claimed, its lease kept, not yet rendering
        assert (waiting["status"], waiting["progress"]) == ("created", 0)
        engine.gate.set()
        records = [await h.wait(jobid) for jobid in jobids]
        assert [record["status"] for record in records] == ["completed"] * 6
        assert (engine.started, engine.peak) == (6, 2)
        assert (memory.in_use, memory.waiting) == (0, 0)


async def test_a_job_larger_than_the_whole_budget_runs_alone(settings) -> None:
    engine = MeteredEngine()
    async with open_harness(budgeted(settings, 1), engines={"procedural": engine.factory}) as h:
        memory = h.server.memory
        jobids = await submit(h, 3)
        await eventually(lambda: memory.waiting == 2)
        await started(engine, 1)
        assert (engine.started, memory.in_use) == (1, 1 * MIB)  # the whole budget, no more
        engine.gate.set()
        records = [await h.wait(jobid) for jobid in jobids]
        assert [record["status"] for record in records] == ["completed"] * 3
        assert (engine.peak, memory.in_use, memory.waiting) == (1, 0, 0)


@pytest.mark.parametrize(
    ("outcome", "error"),
    [("fail", "Image generation failed"), ("crash", "Image generation failed")],
)
async def test_a_failed_or_crashed_job_gives_its_memory_back(settings, outcome, error) -> None:
    engine = MeteredEngine(outcome)
    async with open_harness(budgeted(settings, 20), engines={"procedural": engine.factory}) as h:
        memory = h.server.memory
        jobids = await submit(h, 4)
        await eventually(lambda: memory.waiting == 2)
        engine.gate.set()
        records = [await h.wait(jobid) for jobid in jobids]
        assert [(record["status"], record["error"]) for record in records] == [
            ("failed", error)
        ] * 4
        assert (engine.started, engine.peak) == (4, 2)  # the two waiting ran once memory freed
        assert (memory.in_use, memory.waiting) == (0, 0)


async def test_a_job_cancelled_while_it_renders_gives_its_memory_back(settings) -> None:
    engine = MeteredEngine()
    async with open_harness(budgeted(settings, 20), engines={"procedural": engine.factory}) as h:
        memory = h.server.memory
        first, *others = await submit(h, 3)
        await eventually(lambda: memory.waiting == 1)
        assert (await h.call("DELETE", f"/scheduler/{first}")).status_code == 200
        await started(engine, 3)  # the third took the first's share
        await eventually(lambda: memory.waiting == 0)
        assert memory.in_use == 2 * SMALL_BYTES
        engine.gate.set()
        assert [(await h.wait(jobid))["status"] for jobid in others] == ["completed"] * 2
        assert (engine.peak, memory.in_use, memory.waiting) == (2, 0, 0)


async def test_a_job_cancelled_while_it_waits_for_memory_never_renders(settings) -> None:
    engine = MeteredEngine()
    async with open_harness(budgeted(settings, 20), engines={"procedural": engine.factory}) as h:
        memory = h.server.memory
        *running, last = await submit(h, 3)
        await eventually(lambda: memory.waiting == 1)
        assert (await h.call("DELETE", f"/scheduler/{last}")).status_code == 200
        await eventually(lambda: memory.waiting == 0)
        assert memory.in_use == 2 * SMALL_BYTES
        cancelled = await h.wait(last)
        assert (cancelled["status"], cancelled["error"]) == ("failed", "Cancelled by user")
        engine.gate.set()
        assert [(await h.wait(jobid))["status"] for jobid in running] == ["completed"] * 2
        assert (engine.started, memory.in_use, memory.waiting) == (2, 0, 0)


async def test_an_engine_says_how_many_copies_of_an_image_it_holds(settings) -> None:
    engine = MeteredEngine(image_copies=1)  # 4 MiB a SMALL job: four fit in 20 MiB
    async with open_harness(budgeted(settings, 20), engines={"procedural": engine.factory}) as h:
        memory = h.server.memory
        jobids = await submit(h, 6)
        await eventually(lambda: memory.waiting == 1)
        await started(engine, 5)
        assert (engine.started, memory.in_use) == (5, 5 * 4 * MIB)
        engine.gate.set()
        for jobid in jobids:
            await h.wait(jobid)
        assert (engine.peak, memory.in_use) == (5, 0)


async def test_a_waiting_job_has_not_read_its_references_and_counts_them(
    settings, monkeypatch
) -> None:
    engine = MeteredEngine()
    async with open_harness(budgeted(settings, 20), engines={"procedural": engine.factory}) as h:
        memory = h.server.memory
        engine.gate.set()
        source = await h.wait((await submit(h, 1))[0])
        engine.gate.clear()
        image = source["response"]["images"][0]
        blobs = h.server.blobs
        real_get = blobs.get
        read: list[str] = []

        async def get(key: str) -> bytes:
            read.append(key)
            return await real_get(key)

        monkeypatch.setattr(blobs, "get", get)
        first, second = await submit(h, 2)
        (referring,) = await submit(h, 1, {**SMALL, "imageRef_1": image["assetRef"]})
        await eventually(lambda: memory.waiting == 1)
        assert read == []  # no reference read, let alone decoded, before its job has memory
        for jobid in (first, second):
            assert (await h.call("DELETE", f"/scheduler/{jobid}")).status_code == 200
        await started(engine, 4)
        # Its image and its 1024x1024 reference, each counted twice.
        assert (read, memory.in_use) == ([image["imageUri"]], 2 * SMALL_BYTES)
        engine.gate.set()
        assert (await h.wait(referring))["status"] == "completed"
        assert memory.in_use == 0


async def test_ten_8k_upscales_render_one_at_a_time_in_the_default_budget(settings) -> None:
    engine = MeteredEngine()
    async with open_harness(settings, engines={"procedural": engine.factory}) as h:
        memory = h.server.memory
        engine.gate.set()
        source = await h.wait((await submit(h, 1))[0])  # one 1024x1024 image
        engine.gate.clear()
        body = {"jobid": source["jobid"], "upscaleResolution": "8k"}
        jobids = []
        for _ in range(10):
            reply = await h.call("POST", "/images/upscale", body)
            assert reply.status_code == 200, reply.text
            jobids.append(reply.json()["jobid"])
        await eventually(lambda: memory.waiting == 9)
        await started(engine, 2)
        # 8192x8192 and its source, each twice: 545 MB of the 1024 MiB, where ten took 5.4 GB.
        one = render_bytes(8192, 8192, 1, [1024 * 1024])
        assert (one, engine.started, memory.in_use) == (545_259_520, 2, one)
        for jobid in reversed(jobids):  # the waiting ones first: none of them starts
            assert (await h.call("DELETE", f"/scheduler/{jobid}")).status_code == 200
        await eventually(lambda: memory.in_use == 0)
        assert (engine.started, engine.peak, memory.waiting) == (2, 1, 0)


class OrderedEngine(_SharedEngine):
    """Each job waits at the gate of its prompt, then has the render threads note its prompt."""

    def __init__(self) -> None:
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.started = 0
        self.queued: list[str] = []  # the prompts, as their work was handed to the threads
        self.ran: list[str] = []  # the prompts, as the threads ran their work
        self.executor: Executor | None = None

    def factory(self, settings: Mapping[str, Any], context: EngineContext) -> OrderedEngine:
        self.executor = context.executor
        return self

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        self.started += 1
        await self.gates[request.prompt].wait()
        noted = asyncio.get_running_loop().run_in_executor(
            self.executor, self.ran.append, request.prompt
        )
        self.queued.append(request.prompt)
        await noted
        return [Image.new("RGB", (request.width, request.height))] * request.count


async def test_the_render_threads_run_the_work_of_the_earlier_job_first(settings) -> None:
    engine = OrderedEngine()
    one_thread = settings.model_copy(update={"render_threads": 1})
    async with open_harness(one_thread, engines={"procedural": engine.factory}) as h:
        jobids = []
        for count, prompt in enumerate(["first", "second"], 1):
            jobids += await submit(h, 1, {**SMALL, "prompt": prompt})
            await started(engine, count)  # both hold memory, the first since earlier
        assert engine.executor is not None
        gate = threading.Event()
        engine.executor.submit(gate.wait)  # the one thread waits: the work queues up
        engine.gates["second"].set()
        await eventually(lambda: engine.queued == ["second"])
        engine.gates["first"].set()
        await eventually(lambda: engine.queued == ["second", "first"])
        gate.set()
        assert [(await h.wait(jobid))["status"] for jobid in jobids] == ["completed"] * 2
        assert engine.ran == ["first", "second"]
