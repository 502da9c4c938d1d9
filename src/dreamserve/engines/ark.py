"""The `ark` engine: Seedream through BytePlus ModelArk or Volcengine Ark.

`POST {baseUrl}/api/v3/images/generations`, synchronous. The size is the catalogue's pixel size
(`<W>x<H>`), references go as `data:` URLs, the watermark is off unless the account asks for it,
and `count` > 1 uses Seedream's own batching (`sequential_image_generation`), with single calls
for whatever it did not return. Which catalogue model is which upstream model id is the
account's `models` map, so new model revisions need no code.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from dreamserve.catalogue import Model
from dreamserve.engines.base import CancelSignal, EngineContext, GenerationRequest, ProgressCallback
from dreamserve.engines.upstream import (
    UPSTREAM_IMAGE_COPIES,
    Upstream,
    UpstreamSettings,
    data_url,
)
from dreamserve.errors import JobFailed

BYTEPLUS = "https://ark.ap-southeast.bytepluses.com"
SEED_LIMIT = 2147483647  # the API takes -1 (random) to this


class SizeLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    minSide: int | None = Field(None, ge=1)
    maxSide: int | None = Field(None, ge=1)
    minPixels: int | None = Field(None, ge=1)
    maxPixels: int | None = Field(None, ge=1)

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """`width` x `height`, scaled at the same aspect into these limits (as near as whole
        pixels allow)."""
        scale = 1.0
        if self.maxPixels and width * height > self.maxPixels:
            scale = math.sqrt(self.maxPixels / (width * height))
        if self.minPixels and width * height < self.minPixels:
            scale = math.sqrt(self.minPixels / (width * height))
        if self.maxSide and max(width, height) * scale > self.maxSide:
            scale = self.maxSide / max(width, height)
        if self.minSide and min(width, height) * scale < self.minSide:
            scale = self.minSide / min(width, height)
        if scale == 1.0:
            return width, height
        # Rounded inwards when shrinking, outwards when growing, so the limits hold.
        rounding = math.floor if scale < 1 else math.ceil
        return rounding(width * scale), rounding(height * scale)


class ArkSettings(UpstreamSettings):
    baseUrl: str = BYTEPLUS  # Volcengine: https://ark.cn-beijing.volces.com
    # catalogue model -> upstream model id (or an endpoint id, ep-...)
    models: dict[str, str] = Field(
        default_factory=lambda: {
            "seedream-4.5": "seedream-4-5-251128",
            "seedream-4.0": "seedream-4-0-250828",
            "seedream-3.0": "seedream-3-0-t2i-250415",
        },
        min_length=1,
    )
    watermark: bool = False
    responseFormat: Literal["url", "b64_json"] = "url"
    # Upstream models that batch (sequential_image_generation); others get one call per image.
    sequentialModels: list[str] = Field(
        default_factory=lambda: ["seedream-4-5-251128", "seedream-4-0-250828"]
    )
    # Upstream model -> the sizes it takes (shared/upstreams.md); a catalogue size outside is
    # asked for at the same aspect within them, and the result resampled to the catalogue's.
    sizeLimits: dict[str, SizeLimit] = Field(
        default_factory=lambda: {
            "seedream-3-0-t2i-250415": SizeLimit(minSide=512, maxSide=2048),
            "seedream-4-0-250828": SizeLimit(minPixels=921_600, maxPixels=16_777_216),
            "seedream-4-5-251128": SizeLimit(minPixels=3_686_400, maxPixels=16_777_216),
        }
    )
    maxReferenceBytes: int = Field(10 << 20, ge=1024)  # one reference, as Ark takes it


class ArkEngine:
    Settings = ArkSettings
    image_copies = UPSTREAM_IMAGE_COPIES

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self.settings = ArkSettings.model_validate(dict(settings))
        self.context = context
        key = self.settings.apiKey.get_secret_value()
        self.upstream = Upstream("ark", self.settings, context, {"authorization": f"Bearer {key}"})

    def serves(self, model: Model) -> bool:
        return model.name in self.settings.models

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        deadline = self.upstream.deadline()
        loop = asyncio.get_running_loop()
        limit = self.settings.maxReferenceBytes
        references = await loop.run_in_executor(
            self.context.executor, lambda: [data_url(ref, limit) for ref in request.references]
        )
        done = 0

        async def call(count: int) -> list[Image.Image]:
            nonlocal done
            body = self._body(request, references, count)
            answer = await self.upstream.call(
                "POST", "/api/v3/images/generations", cancel, deadline, json=body
            )
            items = _data(answer)
            made = [item for item in items if not _refused(item)]
            if items and not made:  # every image refused: the first says why
                error = items[0]["error"]
                raise JobFailed(
                    "Upstream refused the request",
                    f"ark: {error.get('code', 'error')}: {error.get('message', '')}",
                )
            # Never more than asked for: each extra would be downloaded and decoded for nothing.
            made = made[:count]
            images = [
                await self.upstream.image(item, request.width, request.height, cancel, deadline)
                for item in made
            ]
            done += len(images)
            progress(min(1.0, done / request.count))
            return images

        images: list[Image.Image] = []
        if request.count > 1 and self._upstream_model(request) in self.settings.sequentialModels:
            images = await call(request.count)
        return await self.upstream.top_up(images, request.count, call)

    def _body(self, request: GenerationRequest, references: list[str], count: int) -> Any:
        model = self._upstream_model(request)
        limit = self.settings.sizeLimits.get(model)
        width, height = (request.width, request.height)
        if limit is not None:
            width, height = limit.fit(width, height)
        body: dict[str, Any] = {
            "model": model,
            "prompt": request.prompt,
            "size": f"{width}x{height}",
            "response_format": self.settings.responseFormat,
            "watermark": self.settings.watermark,
        }
        if references:
            body["image"] = references[0] if len(references) == 1 else references
        if request.seed is not None:
            body["seed"] = request.seed % (SEED_LIMIT + 1)
        if model in self.settings.sequentialModels:
            if count > 1:
                body["sequential_image_generation"] = "auto"
                body["sequential_image_generation_options"] = {"max_images": count}
            else:
                body["sequential_image_generation"] = "disabled"
        return body

    def _upstream_model(self, request: GenerationRequest) -> str:
        return self.settings.models[request.model]

    async def check_address(self) -> None:
        await self.upstream.check_address()

    def describe(self) -> dict[str, Any]:
        return {"kind": "ark", "baseUrl": self.settings.baseUrl, "models": self.settings.models}

    async def close(self) -> None:
        await self.upstream.close()


def _refused(item: Any) -> bool:
    """A batch item that carries an error in place of an image (one refused image)."""
    return isinstance(item, dict) and isinstance(item.get("error"), dict)


def _data(answer: Any) -> list[Any]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise JobFailed("Upstream answered in an unknown shape", "ark: no data list")
    return data
