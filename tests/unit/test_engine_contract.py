"""The engine contract (engines/base.py), one suite run over every engine: the procedural engine,
diffusers on a tiny pipeline, and ark, gemini and openai against their fake upstreams.

What every engine promises the job runner: exactly `count` images of exactly the size asked,
with or without references; image i of seed s remade by seed s + i alone where it says `seeded`;
progress between 0 and 1 that never goes back and ends at 1; a
cancel ends the run with `Cancelled` (before it starts, and soon when it is under way); it says
which catalogue models it serves; its settings refuse keys it does not know; `close` releases it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from upstreams import KEY, FakeUpstream, fake_upstream

from dreamserve.catalogue import Model, default_catalogue
from dreamserve.engines.base import CancelSignal, Engine, EngineContext, GenerationRequest
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import BadRequest, Cancelled
from dreamserve.sealing import SecretBox

pytestmark = pytest.mark.anyio

CONTEXT = EngineContext(ThreadPoolExecutor(2), allow_private=True)
ENGINES = ["procedural", "diffusers", "ark", "gemini", "openai"]


@dataclass
class Subject:
    """One engine under the contract: how to build it, a model it serves, and how to make its
    runs slow enough to be cancelled midway."""

    name: str
    settings: dict[str, Any]
    model: str
    slow: Callable[[], dict[str, Any]]  # settings for a slow run (and whatever it must set)
    slow_request: dict[str, Any]

    def build(self, **extra: Any) -> Engine:
        registry = EngineRegistry(CONTEXT, SecretBox(b"c" * 32))
        return registry.factory(self.name)({**self.settings, **extra}, CONTEXT)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers")
    from tiny_pipeline import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(path)
    return path


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with fake_upstream() as upstream:
        yield upstream


@pytest.fixture(params=ENGINES)
def subject(request: pytest.FixtureRequest, fake: FakeUpstream) -> Iterator[Subject]:
    fake.delay, fake.links_expired = 0.0, False
    upstream = {"apiKey": KEY, "baseUrl": fake.url}

    def slow_upstream() -> dict[str, Any]:
        fake.delay = 5.0
        return {}

    name = request.param
    if name == "procedural":
        yield Subject(name, {}, "seedream-4.0", dict, {"width": 4096, "height": 4096, "count": 4})
    elif name == "diffusers":
        model = request.getfixturevalue("tiny_model")
        settings = {
            "model": str(model),
            "models": ["seedream-4.0"],
            "device": "cpu",
            "steps": 2,
            "maxPixels": 64 * 64,
        }
        yield Subject(name, settings, "seedream-4.0", lambda: {"steps": 400}, {})
    elif name == "ark":
        yield Subject(name, upstream, "seedream-4.0", slow_upstream, {})
    elif name == "gemini":
        yield Subject(name, upstream, "nano-banana", slow_upstream, {})
    else:
        yield Subject(name, {**upstream, "model": "m"}, "seedream-4.0", slow_upstream, {})
    fake.delay = 0.0


@pytest.fixture
async def engine(subject: Subject) -> AsyncIterator[Engine]:
    built = subject.build()
    yield built
    await built.close()


def job(subject: Subject, **fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "prompt": "a harbour at night",
        "model": subject.model,
        "width": 1344,
        "height": 768,
        "count": 2,
        "seed": 5,
        **fields,
    }
    return GenerationRequest(**values)


class Progress:
    def __init__(self) -> None:
        self.seen: list[float] = []

    def __call__(self, fraction: float) -> None:
        self.seen.append(fraction)


async def test_it_makes_count_images_of_exactly_the_size_asked(
    subject: Subject, engine: Engine
) -> None:
    for count, (width, height) in [(1, (1024, 1024)), (3, (1344, 768))]:
        images = await engine.generate(
            job(subject, count=count, width=width, height=height), Progress(), CancelSignal()
        )
        assert [image.size for image in images] == [(width, height)] * count
        for image in images:
            assert image.mode in ("RGB", "L")
            assert np.asarray(image).std() > 0  # a picture, never a flat colour


async def test_it_takes_references(subject: Subject, engine: Engine) -> None:
    reference = Image.radial_gradient("L").resize((300, 200)).convert("RGB")
    images = await engine.generate(
        job(subject, references=(reference,), strength=0.6), Progress(), CancelSignal()
    )
    assert [image.size for image in images] == [(1344, 768)] * 2


async def test_progress_stays_between_0_and_1_never_goes_back_and_ends_at_1(
    subject: Subject, engine: Engine
) -> None:
    progress = Progress()
    await engine.generate(job(subject), progress, CancelSignal())
    assert progress.seen
    assert all(0 <= fraction <= 1 for fraction in progress.seen)
    assert progress.seen == sorted(progress.seen)
    assert progress.seen[-1] == 1.0


SEEDED = {"procedural", "diffusers"}  # the engines whose images report their seed


async def test_a_seeded_engine_makes_image_i_from_seed_plus_i_alone(
    subject: Subject, engine: Engine
) -> None:
    """`seeded = True` is a promise the record passes on to clients (each image's seed remakes
    it): image 2 of seed 40 is the single image of seed 42. Upstream engines promise none."""
    seeded = getattr(engine, "seeded", False)
    assert seeded is (subject.name in SEEDED)
    if not seeded:
        return
    small = {"width": 1024, "height": 1024}
    images = await engine.generate(
        job(subject, count=3, seed=40, **small), Progress(), CancelSignal()
    )
    [alone] = await engine.generate(
        job(subject, count=1, seed=42, **small), Progress(), CancelSignal()
    )

    def apart(a: Image.Image, b: Image.Image) -> float:
        return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())

    # The procedural engine byte for byte; a pipeline's batch of three and a single image share
    # their starting noise, but the batch's arithmetic may round a pixel one level apart.
    assert apart(images[2], alone) <= (0 if subject.name == "procedural" else 2)
    assert apart(images[1], alone) > 50


async def test_a_cancel_before_the_run_ends_it_with_cancelled(
    subject: Subject, engine: Engine
) -> None:
    cancel = CancelSignal()
    cancel.set()
    with pytest.raises(Cancelled):
        await engine.generate(job(subject), Progress(), cancel)


async def test_a_cancel_midway_ends_the_run_soon(subject: Subject) -> None:
    engine = subject.build(**subject.slow())
    cancel = CancelSignal()
    try:
        run = asyncio.ensure_future(
            engine.generate(job(subject, **subject.slow_request), Progress(), cancel)
        )
        await asyncio.sleep(0.3)
        assert not run.done()
        cancel.set()
        stopped = time.monotonic()
        with pytest.raises(Cancelled):
            await run
        assert time.monotonic() - stopped < 3
    finally:
        await engine.close()


async def test_it_says_which_catalogue_models_it_serves(subject: Subject, engine: Engine) -> None:
    models: list[Model] = list(default_catalogue().models)
    served = [model.name for model in models if engine.serves(model)]
    assert subject.model in served


def test_its_settings_refuse_unknown_keys(subject: Subject) -> None:
    registry = EngineRegistry(CONTEXT, SecretBox(b"c" * 32))
    with pytest.raises(BadRequest) as refused:
        registry.check_settings(subject.name, {**subject.settings, "colour": "blue"})
    assert refused.value.message.startswith(
        f"Parameter settings.colour not allowed: engine {subject.name} takes "
    )


async def test_close_can_be_called_twice(subject: Subject) -> None:
    engine = subject.build()
    await engine.generate(job(subject, count=1), Progress(), CancelSignal())
    await engine.close()
    await engine.close()
