"""The procedural engine: exact sizes, determinism, variety, progress, cancellation, references."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from dreamserve.engines.base import (
    SEEDS,
    CancelSignal,
    EngineContext,
    GenerationRequest,
    image_seed,
)
from dreamserve.engines.procedural import LABEL, ProceduralEngine, fit_reference, render
from dreamserve.errors import Cancelled
from dreamserve.submission import MAX_SEED

pytestmark = pytest.mark.anyio

AURORA = "A stunning aurora borealis over a frozen lake at midnight"


def request(prompt: str = AURORA, **changes: object) -> GenerationRequest:
    fields: dict[str, object] = {
        "prompt": prompt,
        "model": "seedream-4.0",
        "width": 320,
        "height": 180,
        "count": 1,
    }
    fields |= changes
    return GenerationRequest(**fields)  # type: ignore[arg-type]


def pixels(req: GenerationRequest, index: int = 0) -> np.ndarray:
    image = render(req, index, None, lambda _: None, CancelSignal())
    return np.asarray(image, dtype=np.float32)


@pytest.fixture
def engine() -> ProceduralEngine:
    return ProceduralEngine({}, EngineContext(ThreadPoolExecutor(2)))


@pytest.mark.parametrize(("width", "height"), [(2560, 1440), (6197, 2656)])
async def test_renders_the_exact_catalogue_size(
    engine: ProceduralEngine, width: int, height: int
) -> None:
    images = await engine.generate(
        request(width=width, height=height), lambda _: None, CancelSignal()
    )
    assert [image.size for image in images] == [(width, height)]
    assert images[0].mode == "RGB"
    assert images[0].info["comment"] == LABEL


async def test_returns_count_images_each_different(engine: ProceduralEngine) -> None:
    images = await engine.generate(request(count=4), lambda _: None, CancelSignal())
    assert len(images) == 4
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(arrays[i] - arrays[j]).mean() > 10


async def test_image_i_of_a_seed_is_the_image_of_seed_plus_i(engine: ProceduralEngine) -> None:
    images = await engine.generate(request(count=4, seed=40), lambda _: None, CancelSignal())
    [alone] = await engine.generate(request(count=1, seed=42), lambda _: None, CancelSignal())
    assert np.array_equal(np.asarray(images[2]), np.asarray(alone))
    assert np.array_equal(pixels(request(seed=SEEDS - 1), 1), pixels(request(seed=0)))  # wraps


def test_seeds_span_the_requests_seed_range() -> None:
    assert SEEDS == MAX_SEED + 1
    assert [image_seed(MAX_SEED - 1, i) for i in range(3)] == [MAX_SEED - 1, MAX_SEED, 0]


def test_deterministic_from_the_request() -> None:
    assert np.array_equal(pixels(request()), pixels(request()))
    assert np.array_equal(pixels(request(seed=5), 2), pixels(request(seed=5), 2))


@pytest.mark.parametrize(
    "other",
    [
        request("A red desert canyon under a burning noon sun"),
        request(seed=1),
        request(model="nano-banana"),
    ],
)
def test_a_different_prompt_seed_or_model_gives_a_visibly_different_image(
    other: GenerationRequest,
) -> None:
    assert np.abs(pixels(request()) - pixels(other)).mean() > 10


def test_never_a_flat_colour() -> None:
    for prompt in (AURORA, "", "x", "cat", "🌈 unicode prompt"):
        image = pixels(request(prompt))
        assert image.std(axis=(0, 1)).min() > 8, prompt
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 500, prompt


async def test_reports_progress_up_to_done(engine: ProceduralEngine) -> None:
    seen: list[float] = []
    await engine.generate(request(width=1664, height=936, count=2), seen.append, CancelSignal())
    assert max(seen) == pytest.approx(1.0)
    assert all(0 < fraction <= 1 for fraction in seen)
    assert len(seen) >= 4  # several stripes per image


def test_stops_when_cancelled() -> None:
    cancel = CancelSignal()
    cancel.set()
    with pytest.raises(Cancelled):
        render(request(), 0, None, lambda _: None, cancel)


async def first_report(reports: list[float]) -> None:
    for _ in range(1000):
        if reports:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine reported no progress")


async def test_a_4k_job_stops_within_one_stripe_per_thread_of_cancel(
    engine: ProceduralEngine,
) -> None:
    """After the cancel, each busy render thread finishes at most the stripe it is on (about
    0.1 s of work on this hardware), so a 4k job stops well within a second. Counted in
    stripes rather than timed: the machines that run the tests are shared and noisy."""
    cancel = CancelSignal()
    reports: list[float] = []
    task = asyncio.create_task(
        engine.generate(request(width=6197, height=2656, count=4), reports.append, cancel)
    )
    await first_report(reports)
    cancel.set()
    seen = len(reports)
    with pytest.raises(Cancelled):
        await task
    threads = 2
    assert len(reports) - seen <= threads
    assert max(reports) < 0.5  # nowhere near done: 4 images, each of 33 stripes


async def test_cancelling_the_task_frees_the_render_threads(engine: ProceduralEngine) -> None:
    cancel = CancelSignal()
    reports: list[float] = []
    task = asyncio.create_task(
        engine.generate(request(width=4096, height=4096, count=2), reports.append, cancel)
    )
    await first_report(reports)  # both executor threads are rendering now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancel.is_set
    both = threading.Barrier(2)  # met only once both threads are free
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(engine._executor, both.wait, 10) for _ in range(2)))
    settled = len(reports)
    await asyncio.sleep(0.3)
    assert len(reports) == settled  # no thread renders on after the task was cancelled
    assert max(reports) < 0.6  # image 2 starts at 0.5: a few of its 32 stripes at most


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_references_shape_the_image_by_strength() -> None:
    gradient = np.linspace(0, 255, 320, dtype=np.float32)
    reference = np.stack(
        [
            np.tile(gradient, (180, 1)),
            np.tile(gradient[::-1], (180, 1)),
            np.full((180, 320), 90, np.float32),
        ],
        axis=-1,
    )
    ref_image = Image.fromarray(reference.astype(np.uint8))
    results = {}
    for strength in (0.1, 0.9):
        req = request(references=(ref_image,), strength=strength)
        fitted = fit_reference(req)
        image = render(req, 0, fitted, lambda _: None, CancelSignal())
        results[strength] = correlation(np.asarray(image, dtype=np.float32), reference)
    assert results[0.9] > results[0.1] + 0.3
    assert results[0.9] > 0.9
