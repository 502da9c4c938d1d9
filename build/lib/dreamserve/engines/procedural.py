"""The procedural engine: abstract compositions computed from the request, with no model at all.

It is what it says: no weights, no network, no pretence of being a model. Every image is a
deterministic function of (prompt, model, size, its seed): image i of a request is made from
`image_seed(seed, i)` (seed + i) and nothing else of its position, so a request with that seed
and `count` 1 makes the same image (the engine is `seeded`). A palette drawn from the
prompt's words, soft colour fields, interference ripples and rings, blended with the reference
images by `strength`. It makes the server useful out of the box and the tests fast and real.
The composition is computed on a coarse grid and resampled to the full size in horizontal stripes,
so progress is reported and a cancel is seen within a stripe (a few milliseconds even at 8k).
"""

from __future__ import annotations

import asyncio
import colorsys
import hashlib
import math
import re
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter, ImageOps

from dreamserve.catalogue import Model
from dreamserve.engines.base import (
    CancelSignal,
    EngineContext,
    EngineSettings,
    GenerationRequest,
    ProgressCallback,
    UpscaleRequest,
    image_seed,
)

Array = npt.NDArray[np.float32]

LABEL = "dreamserve procedural engine: an abstract composition, not a model's output"
STRIPE_PIXELS = 1 << 19  # about half a megapixel per stripe
# The composition is computed on at most this many points, then resampled to the full size.
COMPOSITION_PIXELS = 1 << 17
_WORD = re.compile(r"\w+")


class ProceduralEngine:
    """Renders any model at its catalogue size, but an account that lists no models serves only
    the built-in catalogue's: a model of the operator's configuration file is for the accounts
    that list it (a placeholder never stands in for the operator's GPU); takes no settings."""

    Settings = EngineSettings
    seeded = True  # image i is made from seed + i alone (the job record reports it)

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self._executor = context.executor

    def serves(self, model: Model) -> bool:
        return model.builtin

    def can_run(self, model: Model) -> bool:
        return True  # an account that lists an operator's model asked for it

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        loop = asyncio.get_running_loop()
        references = await loop.run_in_executor(self._executor, fit_reference, request)
        count = request.count
        # The images render side by side: progress is the sum of theirs, reported under a
        # lock so that it never goes back.
        done = [0.0] * count
        lock = threading.Lock()

        def image(index: int) -> Image.Image:
            def report(fraction: float) -> None:
                with lock:
                    done[index] = fraction
                    progress(sum(done) / count)

            return render(request, index, references, report, cancel)

        futures = [loop.run_in_executor(self._executor, image, i) for i in range(count)]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            cancel.set()  # stop the images still rendering
            raise

    async def upscale(
        self, request: UpscaleRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> Image.Image:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, resample, request, progress, cancel)

    def describe(self) -> dict[str, Any]:
        return {"kind": "procedural", "note": LABEL}

    async def close(self) -> None:
        return None


def render(
    request: GenerationRequest,
    index: int,
    reference: Image.Image | None,
    progress: ProgressCallback,
    cancel: CancelSignal,
) -> Image.Image:
    """Image number `index` of the request.

    The composition is smooth, so it is computed on a coarse grid of at most
    `COMPOSITION_PIXELS` (the numpy work, which costs per pixel) and resampled to the full size
    in horizontal stripes (Pillow's bicubic resize, in C), each blended with the reference by
    `strength`: a 2k image costs tens of milliseconds instead of most of a second. Progress is
    reported and a cancel seen at every stripe.
    """
    width, height = request.width, request.height
    cancel.raise_if_set()
    grid = _grid_size(width, height)
    scene = _Scene.from_request(request, index)
    colour = scene.colour(grid[0], grid[1], 0, grid[1])
    coarse = Image.fromarray(np.clip(colour * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    scale_y = grid[1] / height
    result = Image.new("RGB", (width, height))
    rows = max(8, STRIPE_PIXELS // width)
    for top in range(0, height, rows):
        cancel.raise_if_set()
        bottom = min(height, top + rows)
        box = (0.0, top * scale_y, float(grid[0]), bottom * scale_y)
        stripe = coarse.resize((width, bottom - top), Image.Resampling.BICUBIC, box=box)
        if reference is not None:
            stripe = Image.blend(stripe, reference.crop((0, top, width, bottom)), request.strength)
        result.paste(stripe, (0, top))
        progress(bottom / height)
    result.info["comment"] = LABEL
    return result


def _grid_size(width: int, height: int) -> tuple[int, int]:
    """The coarse grid of a `width` x `height` image: the same shape, at most
    `COMPOSITION_PIXELS` (the full size when it is that small)."""
    factor = max(1.0, math.sqrt(width * height / COMPOSITION_PIXELS))
    return max(1, math.ceil(width / factor)), max(1, math.ceil(height / factor))


UPSCALE_LABEL = (
    "dreamserve procedural engine: a resampled and sharpened image, not a model's output"
)


UPSCALE_STRIPE_ROWS = 512
_UNSHARP_RADIUS = 2
_OVERLAP = 4 * _UNSHARP_RADIUS  # rows past each stripe's edges, so the sharpening has no seams


def resample(
    request: UpscaleRequest, progress: ProgressCallback, cancel: CancelSignal
) -> Image.Image:
    """The procedural upscale: a Lanczos resample sharpened by `detail_strength` (an unsharp
    mask), blended with a plain bicubic resample by `original_strength`.

    Made in horizontal stripes written into the output, so that memory is the output and a
    stripe (not four full-size copies: an 8k image is 200 MB each), and a cancel is seen
    between stripes."""
    source = request.image.convert("RGB")
    width, height = request.width, request.height
    scale = source.height / height
    percent = round(250 * request.detail_strength)
    output = Image.new("RGB", (width, height))
    for top in range(0, height, UPSCALE_STRIPE_ROWS):
        cancel.raise_if_set()
        bottom = min(height, top + UPSCALE_STRIPE_ROWS)
        above, below = max(0, top - _OVERLAP), min(height, bottom + _OVERLAP)
        box = (0.0, above * scale, float(source.width), below * scale)
        size = (width, below - above)
        stripe = source.resize(size, Image.Resampling.LANCZOS, box=box)
        if percent:
            sharpen = ImageFilter.UnsharpMask(radius=_UNSHARP_RADIUS, percent=percent, threshold=1)
            stripe = stripe.filter(sharpen)
        if request.original_strength > 0:
            plain = source.resize(size, Image.Resampling.BICUBIC, box=box)
            stripe = Image.blend(stripe, plain, request.original_strength)
        output.paste(stripe.crop((0, top - above, width, bottom - above)), (0, top))
        progress(bottom / height)
    output.info["comment"] = UPSCALE_LABEL
    return output


def fit_reference(request: GenerationRequest) -> Image.Image | None:
    """The first reference as RGB, scaled and cropped to the output size."""
    if not request.references:
        return None
    first = request.references[0].convert("RGB")
    return ImageOps.fit(first, (request.width, request.height), Image.Resampling.LANCZOS)


class _Scene:
    """The random choices behind one image, drawn once; `colour` evaluates any band of rows."""

    def __init__(self, rng: np.random.Generator, palette: Array) -> None:
        self.palette = palette
        self.accent = palette[rng.integers(len(palette))]
        self.blobs = rng.uniform([-0.8, -0.6, 0.12, -1.0], [0.8, 0.6, 0.55, 1.0], size=(6, 4))
        angles = rng.uniform(0, 2 * np.pi, size=3)
        self.waves = np.stack(
            [np.cos(angles), np.sin(angles), rng.uniform(2, 9, 3), rng.uniform(0, 2 * np.pi, 3)],
            axis=1,
        )
        self.ripple_centre = rng.uniform(-0.6, 0.6, size=2)
        self.ripple_frequency = float(rng.uniform(10, 40))
        self.rings = rng.uniform([-0.7, -0.5, 0.08, 0.004], [0.7, 0.5, 0.45, 0.02], size=(4, 4))
        self.offset = float(rng.uniform(0, 1))
        self.bands = float(rng.uniform(0.6, 1.6))

    @classmethod
    def from_request(cls, request: GenerationRequest, index: int) -> _Scene:
        words = _WORD.findall(request.prompt.lower())
        size = f"{request.width}x{request.height}"
        # The image's own seed, not its index: image i of seed s is the image of seed s + i.
        # No seed (a job admitted before the server picked one) renders as seed 0.
        seed = image_seed(request.seed or 0, index)
        text = "\0".join([request.model, request.prompt, size, str(seed)])
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode()).digest()[:16]))
        return cls(rng, _palette(words, rng))

    def colour(self, width: int, height: int, top: int, bottom: int) -> Array:
        """RGB floats (0..1) of rows `top` to `bottom`."""
        scale = np.float32(1 / min(width, height))
        u = (np.arange(width, dtype=np.float32) - width / 2) * scale
        v = (np.arange(top, bottom, dtype=np.float32) - height / 2) * scale
        uu, vv = u[np.newaxis, :], v[:, np.newaxis]

        warp = np.zeros((bottom - top, width), dtype=np.float32)
        for cos, sin, frequency, phase in self.waves.tolist():
            warp += np.sin((uu * cos + vv * sin) * frequency + phase)
        warp *= np.float32(1 / 3)

        field = np.zeros_like(warp)
        for x, y, radius, weight in self.blobs.tolist():
            distance2 = (uu - x) ** 2 + (vv - y + 0.08 * warp) ** 2
            field += weight * np.exp(distance2 * (-1 / (radius * radius)))

        cx, cy = self.ripple_centre.tolist()
        distance = np.sqrt((uu - cx) ** 2 + (vv - cy) ** 2)
        ripple = np.sin(distance * self.ripple_frequency + 2 * warp)

        position = (field * self.bands + 0.12 * ripple + 0.25 * warp + self.offset) % 1.0
        rgb = _lookup(self.palette, position)

        light = 0.82 + 0.18 * np.sin(3 * field + warp)[..., np.newaxis]
        rgb *= light
        for x, y, radius, thickness in self.rings.tolist():
            edge = np.abs(np.sqrt((uu - x) ** 2 + (vv - y) ** 2) - radius)
            mask = np.clip(1 - edge * (1 / thickness), 0, 1)[..., np.newaxis]
            rgb += (self.accent - rgb) * (0.85 * mask)
        vignette = 1 - 0.35 * np.clip(np.sqrt(uu * uu + vv * vv) - 0.45, 0, 1)
        return np.asarray(rgb * vignette[..., np.newaxis], dtype=np.float32)


def _palette(words: list[str], rng: np.random.Generator) -> Array:
    """Five colours: hues from the prompt's words (the same word, the same hue), then chance."""
    hues = [int.from_bytes(hashlib.sha256(word.encode()).digest()[:4]) / 2**32 for word in words]
    hues = hues[:5] + list(rng.uniform(0, 1, size=max(0, 5 - len(hues))))
    colours = []
    for i, hue in enumerate(hues):
        saturation = rng.uniform(0.45, 0.95)
        value = rng.uniform(0.35, 0.7) if i % 2 else rng.uniform(0.75, 1.0)
        colours.append(colorsys.hsv_to_rgb(hue, saturation, value))
    return np.asarray(colours, dtype=np.float32)


def _lookup(palette: Array, position: Array) -> Array:
    """Smooth cyclic interpolation through the palette at `position` (0..1)."""
    scaled = position * len(palette)
    lower = np.floor(scaled).astype(np.intp) % len(palette)
    upper = (lower + 1) % len(palette)
    t = scaled - np.floor(scaled)
    t = (t * t * (3 - 2 * t))[..., np.newaxis]
    return np.asarray(palette[lower] * (1 - t) + palette[upper] * t, dtype=np.float32)
