"""The `diffusers` engine: open models on the operator's own hardware (Hugging Face diffusers).

The account's `model` is a local directory or a hub id, loaded through diffusers' auto-pipeline
classes, so any text-to-image pipeline works (SDXL-Turbo, FLUX.1-schnell, SD 3.5...). The
pipeline is loaded on the first job and kept; references go through the matching
image-to-image pipeline, made from the loaded one so the weights are shared. `count` images come
from one batched call with one seeded generator per image. Progress comes from the step callback
and a cancel interrupts the pipeline between steps.

Every run of a device goes through that device's single thread: one run at a time per GPU,
whichever account asks, and the event loop never waits on the model. The model renders at the
job's aspect within `maxPixels`, on the multiple its pipeline needs; the result is brought to
the catalogue's size.

Needs the `diffusers` extra (torch, diffusers, transformers): the registry imports this module
only when an account uses it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import diffusers
import torch
from PIL import Image
from pydantic import Field

from dreamserve.catalogue import Model
from dreamserve.engines.base import (
    SEEDS,
    CancelSignal,
    EngineContext,
    EngineSettings,
    GenerationRequest,
    ProgressCallback,
    image_seed,
    to_size,
)
from dreamserve.errors import AccountError, AccountTrouble, JobFailed

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_STRENGTH = 0.05  # an imageStrength of 1 still lets the model make a picture of its own


class DiffusersSettings(EngineSettings):
    model: str = Field(min_length=1)  # a local directory or a hub id
    models: list[str] = Field(min_length=1)  # the catalogue models it serves
    # auto: cuda, else mps, else cpu; or one device, e.g. "cuda:1"
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|(cuda|xpu)(:\d{1,2})?)$")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on cuda
    steps: int = Field(4, ge=1, le=500)
    guidanceScale: float = Field(0.0, ge=0, le=50)  # 0 for distilled models (SDXL-Turbo)
    maxPixels: int = Field(1024 * 1024, ge=64 * 64)  # the largest picture the model makes
    negativePrompt: str | None = None


class DiffusersEngine:
    Settings = DiffusersSettings
    # The render-memory budget's count of each image: the pipeline's decoded float32 batch (three
    # times an image) and the image at the job's size.
    image_copies = 4
    seeded = True  # image i from its own generator, seeded seed + i (the record reports it)
    # Only the operator's shared accounts: a user's own account would choose what the server
    # downloads and reads from its disk, and take its GPUs.
    operator_only = True

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self.settings = DiffusersSettings.model_validate(dict(settings))
        self.context = context
        self.device = _device(self.settings.device)
        self.dtype = _dtype(self.settings.dtype, self.device)
        self._text: Any = None  # the text-to-image pipeline, once loaded
        self._image: Any = None  # its image-to-image sibling, made on first use
        self._load_lock = threading.Lock()

    def serves(self, model: Model) -> bool:
        return model.name in self.settings.models

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            _device_thread(self.device), self._run, request, progress, cancel
        )

    def _run(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        cancel.raise_if_set()
        pipeline = self._pipeline(bool(request.references))
        cancel.raise_if_set()
        width, height = self.render_size(request.width, request.height, _multiple(pipeline))
        steps = self.settings.steps
        arguments: dict[str, Any] = {
            "prompt": request.prompt,
            "num_images_per_prompt": request.count,
            "guidance_scale": self.settings.guidanceScale,
            "generator": _generators(request),
            "output_type": "pil",
        }
        if self.settings.negativePrompt is not None:
            arguments["negative_prompt"] = self.settings.negativePrompt
        if request.references:
            # diffusers' strength is how much noise goes over the reference: the opposite of
            # imageStrength (how much the reference shapes the result). At least one step runs.
            strength = max(MIN_STRENGTH, 1.0 - request.strength)
            while int(steps * strength) < 1:  # as diffusers counts the steps it runs
                steps += 1
            reference = request.references[0].convert("RGB")
            arguments["image"] = reference.resize((width, height), Image.Resampling.LANCZOS)
            arguments["strength"] = strength
            runs = max(1, int(steps * strength))  # the steps img2img really runs
        else:
            arguments["width"], arguments["height"] = width, height
            runs = steps

        reported = [0.0]

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            reported[0] = min(1.0, (step + 1) / runs)
            progress(reported[0])
            if cancel.is_set:
                pipe._interrupt = True  # diffusers stops before the next step
            return tensors

        try:
            with torch.inference_mode():
                images = pipeline(
                    num_inference_steps=steps, callback_on_step_end=step_end, **arguments
                ).images
        except torch.OutOfMemoryError:
            # The device's, not the prompt's: a few in a row cool the account down.
            raise AccountTrouble(
                "Device out of memory", f"{self.device}: {width}x{height}, {request.count} images"
            ) from None
        cancel.raise_if_set()
        if reported[0] < 1.0:  # a pipeline may run other steps than counted above (FLUX)
            progress(1.0)
        if len(images) != request.count:
            raise JobFailed("Model returned too few images", f"{len(images)} of {request.count}")
        return [to_size(image, request.width, request.height) for image in images]

    def render_size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        """The job's aspect within `maxPixels`, each side a multiple the pipeline accepts."""
        most = self.settings.maxPixels

        def side(length: int, other: int) -> int:
            # length * sqrt(most / (width * height)) in whole numbers: no float lost a pixel
            fitted = length if width * height <= most else math.isqrt(length * most // other)
            return max(multiple, fitted // multiple * multiple)

        return side(width, height), side(height, width)

    def _pipeline(self, references: bool) -> Any:
        with self._load_lock:
            if self._text is None:
                self._text = self._load()
            if not references:
                return self._text
            if self._image is None:
                try:
                    self._image = diffusers.AutoPipelineForImage2Image.from_pipe(self._text)
                except ValueError:  # PixArt, Sana...: no image-to-image pipeline
                    raise JobFailed(
                        "This model takes no reference image",
                        f"{type(self._text).__name__} has no image-to-image pipeline",
                    ) from None
                self._image.set_progress_bar_config(disable=True)
            return self._image

    def _load(self) -> Any:
        try:
            pipeline = diffusers.AutoPipelineForText2Image.from_pretrained(
                self.settings.model, dtype=self.dtype
            )
        except (OSError, ValueError) as error:
            # A missing or unreadable model is the account's fault, not the job's: admission
            # skips the account until it is saved again. The whole error is in the log only
            # (it names files of the server).
            log.exception("model %s could not be loaded", self.settings.model)
            raise AccountError(
                "Model could not be loaded",
                f"{self.settings.model}: {type(error).__name__} (see the server log)",
            ) from None
        pipeline.set_progress_bar_config(disable=True)
        try:
            return pipeline.to(self.device)
        except (RuntimeError, AssertionError, ValueError) as error:
            # No such device (torch without CUDA says so with an AssertionError), or too
            # little memory on it: the account's fault too.
            log.exception("model %s could not be moved to %s", self.settings.model, self.device)
            raise AccountError(
                "Model could not be loaded on its device",
                f"{self.device}: {type(error).__name__} (see the server log)",
            ) from None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "diffusers",
            "model": self.settings.model,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "loaded": type(self._text).__name__ if self._text is not None else None,
        }

    async def close(self) -> None:
        self._text = self._image = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


_threads: dict[str, ThreadPoolExecutor] = {}
_threads_lock = threading.Lock()


def _device_thread(device: torch.device) -> ThreadPoolExecutor:
    """The one thread that runs models on `device` (a GPU runs one pipeline at a time)."""
    with _threads_lock:
        key = str(device)
        if key not in _threads:
            _threads[key] = ThreadPoolExecutor(1, thread_name_prefix=f"diffusers-{key}")
        return _threads[key]


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    device = torch.device(name)
    backend: Any = getattr(torch, device.type, None)  # torch.cuda, torch.xpu
    if device.index is None and device.type in ("cuda", "xpu") and backend.is_available():
        # "cuda" and "cuda:0" are one GPU: one thread (and one queue) for both
        device = torch.device(device.type, backend.current_device())
    return device


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _multiple(pipeline: Any) -> int:
    """The multiple each side must be: the VAE's downscale times the latent patch (2)."""
    return int(getattr(pipeline, "vae_scale_factor", 8)) * 2


def _generators(request: GenerationRequest) -> list[torch.Generator]:
    """One generator per image, seeded `image_seed(seed, index)` (seed + index; on the CPU, so
    a seed gives the same starting noise on any device): image i of a job is the image of a
    count-1 request with that seed."""
    seed = request.seed if request.seed is not None else secrets.randbelow(SEEDS)
    return [
        torch.Generator("cpu").manual_seed(image_seed(seed, index))
        for index in range(request.count)
    ]
