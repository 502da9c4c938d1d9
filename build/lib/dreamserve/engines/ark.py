"""The `ark` engine: Seedream through BytePlus ModelArk or Volcengine Ark.

`POST {baseUrl}/api/v3/images/generations`, synchronous. The size is the catalogue's pixel size
(`<W>x<H>`) brought within the model's `sizeLimits`, references go as `data:` URLs (no more than
the model's `maxReferences`, checked before any call), the watermark is off unless the account
asks for it, and `count` > 1 uses Seedream's own batching (`sequential_image_generation`, as many
as references + images <= 15 allow), with single calls for whatever it did not return. Which
catalogue model is which upstream model id is the account's `models` map, so new model revisions
need no code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Literal

from PIL import Image
from pydantic import Field, field_validator

from dreamserve.catalogue import Model
from dreamserve.engines.base import CancelSignal, EngineContext, GenerationRequest, ProgressCallback
from dreamserve.engines.upstream import (
    UPSTREAM_IMAGE_COPIES,
    SizeLimit,
    Upstream,
    UpstreamSettings,
    data_url,
    fitted_size,
)
from dreamserve.errors import JobFailed

BYTEPLUS = "https://ark.ap-southeast.bytepluses.com"
SEED_LIMIT = 2147483647  # the API takes -1 (random) to this
CALL_IMAGES = 15  # references + images made, in one call (docs/engines.md)


class ArkSettings(UpstreamSettings):
    """Every default is checked against docs/catalogue.md §3.3 and §5 (third-party sources: no
    stored copy of BytePlus's own page); docs/engines.md has the table."""

    baseUrl: str = BYTEPLUS  # Volcengine: https://ark.cn-beijing.volces.com
    # catalogue model -> upstream model id (or an endpoint id, ep-...). seedream-4.7, 4.6 and
    # 4.1 have no ModelArk id in any source: an operator maps them if one exists.
    models: dict[str, str] = Field(
        default_factory=lambda: {
            "seedream-5.0-lite": "seedream-5-0-260128",
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
        default_factory=lambda: [
            "seedream-5-0-260128",
            "seedream-4-5-251128",
            "seedream-4-0-250828",
        ]
    )
    # Upstream model -> the sizes it takes; a catalogue size outside is asked for at the same
    # aspect within them, and the result resampled to the catalogue's. 5.0 Lite's upper bound:
    # sources say 10,404,496 or 16,777,216; the stricter, so that no call is refused.
    sizeLimits: dict[str, SizeLimit] = Field(
        default_factory=lambda: {
            "seedream-5-0-260128": SizeLimit(minPixels=3_686_400, maxPixels=10_404_496),
            "seedream-4-5-251128": SizeLimit(minPixels=3_686_400, maxPixels=16_777_216),
            "seedream-4-0-250828": SizeLimit(minPixels=921_600, maxPixels=16_777_216),
            "seedream-3-0-t2i-250415": SizeLimit(minSide=512, maxSide=2048),
        }
    )
    # Upstream model -> the reference images one call takes (a job with more fails before any
    # call); a model not named takes what references + images <= 15 leaves. 4.5 and 4.0:
    # sources say 10 or 14, the stricter. 3.0 (t2i) takes none.
    maxReferences: dict[str, int] = Field(
        default_factory=lambda: {
            "seedream-5-0-260128": 14,
            "seedream-4-5-251128": 10,
            "seedream-4-0-250828": 10,
            "seedream-3-0-t2i-250415": 0,
        }
    )
    maxReferenceBytes: int = Field(10 << 20, ge=1024)  # one reference, as Ark takes it

    @field_validator("maxReferences")
    @classmethod
    def _references(cls, value: dict[str, int]) -> dict[str, int]:
        for model, limit in value.items():
            if not 0 <= limit < CALL_IMAGES:
                raise ValueError(f"{model}: {limit} is not 0 to {CALL_IMAGES - 1}")
        return value


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
        model = self._upstream_model(request)
        # What the model cannot take fails the job here, before any call: never a 400 later.
        self._check_references(model, len(request.references))
        size = fitted_size("ark", model, self.settings.sizeLimits, request.width, request.height)
        deadline = self.upstream.deadline()
        loop = asyncio.get_running_loop()
        limit = self.settings.maxReferenceBytes
        references = await loop.run_in_executor(
            self.context.executor, lambda: [data_url(ref, limit) for ref in request.references]
        )
        done = 0

        async def call(count: int) -> list[Image.Image]:
            nonlocal done
            body = self._body(request, model, size, references, count)
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
        # One batch of as many as the call's 15 leave beside the references; the rest (and
        # whatever the batch did not bring) one call each.
        batch = min(request.count, CALL_IMAGES - len(references))
        if batch > 1 and model in self.settings.sequentialModels:
            images = await call(batch)
        return await self.upstream.top_up(images, request.count, call)

    def _check_references(self, model: str, count: int) -> None:
        limit = min(self.settings.maxReferences.get(model, CALL_IMAGES - 1), CALL_IMAGES - 1)
        if count > limit:
            raise JobFailed(
                f"Too many reference images for ark model {model}",
                f"{count} given; it takes at most {limit}"
                if limit
                else f"{count} given; it takes none",
            )

    def _body(
        self,
        request: GenerationRequest,
        model: str,
        size: tuple[int, int],
        references: list[str],
        count: int,
    ) -> Any:
        body: dict[str, Any] = {
            "model": model,
            "prompt": request.prompt,
            "size": f"{size[0]}x{size[1]}",
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
