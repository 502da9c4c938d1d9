"""The diffusers engine on a tiny, randomly initialised Stable Diffusion pipeline written to disk
by the test (tests/tiny_pipeline.py: no download) and loaded through the same code path as a real
model: text-to-image, references, a batch of 4, seeds, progress, cancel."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tiny_pipeline import build_tiny_pipeline

from dreamserve.engines.base import CancelSignal, EngineContext, GenerationRequest
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import AccountError, AccountTrouble, BadRequest, Cancelled, JobFailed
from dreamserve.sealing import SecretBox

diffusers = pytest.importorskip("diffusers")  # the `diffusers` extra; `make test` installs it
torch = pytest.importorskip("torch")

from dreamserve.engines.diffusers import DiffusersEngine  # noqa: E402

pytestmark = pytest.mark.anyio

CONTEXT = EngineContext(ThreadPoolExecutor(2))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_pipeline(path)
    return path


@pytest.fixture
async def engine(tiny_model: Path) -> AsyncIterator[DiffusersEngine]:
    made = make(tiny_model)
    yield made
    await made.close()


def make(model: Path, **settings: Any) -> DiffusersEngine:
    values = {
        "model": str(model),
        "models": ["tiny-sd"],
        "device": "cpu",
        "steps": 2,
        "maxPixels": 64 * 64,
        **settings,
    }
    return DiffusersEngine(values, CONTEXT)


def request(**fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "prompt": "a cat and a dog",
        "model": "tiny-sd",
        "width": 64,
        "height": 64,
        "count": 1,
        "seed": 1,
        **fields,
    }
    return GenerationRequest(**values)


async def generate(
    engine: DiffusersEngine, job: GenerationRequest, cancel: CancelSignal | None = None
) -> tuple[list[Image.Image], list[float]]:
    seen: list[float] = []
    images = await engine.generate(job, seen.append, cancel or CancelSignal())
    return images, seen


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


async def test_text_to_image_at_the_catalogue_size(engine: DiffusersEngine) -> None:
    (image,), seen = await generate(engine, request(width=1344, height=768))
    assert image.size == (1344, 768)  # rendered at 80x48 (maxPixels), brought to the size
    assert image.mode == "RGB"
    assert np.asarray(image).std() > 0  # a picture, not a flat colour
    assert seen == [0.5, 1.0]


def test_the_render_size_keeps_the_aspect_within_max_pixels(tiny_model: Path) -> None:
    engine = make(tiny_model)
    assert engine.render_size(1344, 768, 16) == (80, 48)
    assert engine.render_size(64, 64, 16) == (64, 64)
    assert engine.render_size(30, 20, 16) == (16, 16)  # never below one multiple
    big = make(Path("unused"), maxPixels=1024 * 1024)
    assert big.render_size(2560, 1440, 16) == (1360, 768)
    assert big.render_size(1024, 1024, 16) == (1024, 1024)
    assert big.render_size(1328, 1328, 16) == (1024, 1024)  # not 1008: no float lost a pixel
    turbo = make(Path("unused"), maxPixels=512 * 512)
    assert turbo.render_size(2048, 2048, 16) == (512, 512)


async def test_a_batch_of_4_is_one_pipeline_call(engine: DiffusersEngine) -> None:
    images, seen = await generate(engine, request(count=4))
    assert [image.size for image in images] == [(64, 64)] * 4
    assert len({pixels(image) for image in images}) == 4
    assert seen == [0.5, 1.0]  # one call's steps, not four calls'


async def test_a_seed_gives_the_same_images_and_each_image_its_own_seed(
    engine: DiffusersEngine,
) -> None:
    first, _ = await generate(engine, request(count=2, seed=10))
    again, _ = await generate(engine, request(count=2, seed=10))
    shifted, _ = await generate(engine, request(count=1, seed=11))
    other, _ = await generate(engine, request(count=1, seed=99))
    assert [pixels(i) for i in first] == [pixels(i) for i in again]
    assert pixels(first[1]) == pixels(shifted[0])  # image i is seeded seed + i
    assert pixels(other[0]) != pixels(first[0])


async def test_references_go_through_image_to_image(engine: DiffusersEngine) -> None:
    reference = Image.linear_gradient("L").resize((90, 60)).convert("RGB")
    plain, _ = await generate(engine, request(width=96, height=64))
    (guided,), seen = await generate(
        engine, request(width=96, height=64, references=(reference,), strength=0.5)
    )
    assert guided.size == (96, 64)
    assert pixels(guided) != pixels(plain[0])
    assert seen[-1] == 1.0
    assert type(engine._image).__name__ == "StableDiffusionImg2ImgPipeline"
    assert engine._image.unet is engine._text.unet  # the weights are shared


async def test_an_image_strength_of_1_still_runs_a_step(engine: DiffusersEngine) -> None:
    reference = Image.new("RGB", (64, 64), "navy")
    (image,), seen = await generate(engine, request(references=(reference,), strength=1.0))
    assert image.size == (64, 64)
    assert seen[-1] == 1.0


async def test_the_model_stays_loaded_between_jobs(engine: DiffusersEngine) -> None:
    await generate(engine, request())
    loaded = engine._text
    await generate(engine, request(seed=2))
    assert engine._text is loaded
    assert engine.describe() == {
        "kind": "diffusers",
        "model": engine.settings.model,
        "device": "cpu",
        "dtype": "float32",
        "loaded": "StableDiffusionPipeline",
    }
    await engine.close()
    assert engine._text is None


async def test_a_cancel_interrupts_the_pipeline_between_steps(tiny_model: Path) -> None:
    engine = make(tiny_model, steps=20)
    cancel = CancelSignal()
    seen: list[float] = []

    def progress(fraction: float) -> None:
        seen.append(fraction)
        cancel.set()

    with pytest.raises(Cancelled):
        await engine.generate(request(count=2), progress, cancel)
    assert seen == [0.05]  # one step of 20 ran


async def test_a_cancel_before_the_run_does_not_start_it(engine: DiffusersEngine) -> None:
    cancel = CancelSignal()
    cancel.set()
    with pytest.raises(Cancelled):
        await generate(engine, request(), cancel)
    assert engine._text is None  # not even loaded


async def test_a_model_that_cannot_be_loaded_puts_the_account_in_error(tmp_path: Path) -> None:
    engine = make(tmp_path / "nothing-here")
    with pytest.raises(AccountError) as failure:
        await generate(engine, request())
    assert failure.value.error == "Model could not be loaded"
    assert failure.value.details == f"{tmp_path / 'nothing-here'}: OSError (see the server log)"


async def test_a_model_without_image_to_image_fails_a_job_with_references(
    engine: DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_sibling(pipeline: Any) -> Any:
        raise ValueError("AutoPipeline can't find a pipeline linked to PixArtAlphaPipeline")

    monkeypatch.setattr(diffusers.AutoPipelineForImage2Image, "from_pipe", no_sibling)
    reference = Image.new("RGB", (64, 64), "navy")
    with pytest.raises(JobFailed) as failure:
        await generate(engine, request(references=(reference,)))
    assert (failure.value.error, failure.value.details) == (
        "This model takes no reference image",
        "StableDiffusionPipeline has no image-to-image pipeline",
    )
    (image,), _ = await generate(engine, request())  # text-to-image still works
    assert image.size == (64, 64)


async def test_a_device_the_server_lacks_puts_the_account_in_error(tiny_model: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    engine = make(tiny_model, device="cuda:0")
    with pytest.raises(AccountError) as failure:
        await generate(engine, request())
    assert (failure.value.error, failure.value.details) == (
        "Model could not be loaded on its device",
        "cuda:0: AssertionError (see the server log)",
    )


# -- settings and the optional dependency ------------------------------------------------------


@pytest.fixture
def registry() -> EngineRegistry:
    return EngineRegistry(CONTEXT, SecretBox(b"k" * 32))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"models": ["x"]}, "Parameter settings.model is required"),
        ({"model": "m"}, "Parameter settings.models is required"),
        (
            {"model": "m", "models": ["x"], "device": "gpu"},
            "Parameter settings.device is invalid: String should match pattern "
            "'^(auto|cpu|mps|(cuda|xpu)(:\\d{1,2})?)$'",
        ),
        (
            {"model": "m", "models": ["x"], "dtype": "int8"},
            "Parameter settings.dtype is invalid: Input should be 'auto', 'float32', "
            "'float16' or 'bfloat16'",
        ),
    ],
)
def test_bad_settings_are_a_400(
    registry: EngineRegistry, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequest) as bad:
        registry.check_settings("diffusers", settings)
    assert bad.value.message == message


def test_without_torch_choosing_diffusers_says_what_to_install(
    registry: EngineRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    monkeypatch.delitem(sys.modules, "dreamserve.engines.diffusers", raising=False)
    with pytest.raises(BadRequest) as missing:
        registry.check_settings("diffusers", {"model": "m", "models": ["x"]})
    assert missing.value.message == (
        "Engine diffusers needs torch, which is not installed on this server: "
        "pip install 'dreamserve[diffusers]'"
    )


def test_the_server_starts_without_importing_torch() -> None:
    script = (
        "import sys; from dreamserve.app import create_app; from dreamserve.cli import main; "
        "from dreamserve.engines.registry import EngineRegistry; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert shown.stdout.strip() == "[]"


async def test_a_device_out_of_memory_is_the_accounts_trouble(tiny_model: Path) -> None:
    engine = make(tiny_model)

    def progress(fraction: float) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(AccountTrouble) as failure:
        await engine.generate(request(count=2), progress, CancelSignal())
    assert (failure.value.error, failure.value.details) == (
        "Device out of memory",
        "cpu: 64x64, 2 images",
    )
    await engine.close()
