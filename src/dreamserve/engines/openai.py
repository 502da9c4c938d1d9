"""The `openai` engine: any OpenAI-compatible images API (OpenAI itself, LocalAI and others).

`POST {baseUrl}/v1/images/generations` (JSON) without references, `POST {baseUrl}/v1/images/edits`
(multipart, `image[]`) with them. `count` goes as `n`, up to the account's `maxImagesPerCall`;
whatever a call did not return is asked for again. Servers that only make a few sizes (OpenAI's
own: 1024x1024, 1536x1024, 1024x1536) are given the nearest in aspect through `sizes`, and the
result is brought to the catalogue's size.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any, Literal

from PIL import Image
from pydantic import Field, field_validator

from dreamserve.catalogue import Model
from dreamserve.engines.base import CancelSignal, EngineContext, GenerationRequest, ProgressCallback
from dreamserve.engines.upstream import (
    UPSTREAM_IMAGE_COPIES,
    Upstream,
    UpstreamSettings,
    encode_reference,
    first_failure_cancels,
)
from dreamserve.errors import JobFailed

OPENAI = "https://api.openai.com"


class OpenAISettings(UpstreamSettings):
    baseUrl: str = OPENAI
    model: str = Field(min_length=1)  # the upstream model, e.g. gpt-image-1
    models: list[str] | None = None  # catalogue models served; None: all of them
    sizes: list[str] | None = Field(None, min_length=1)  # "WxH" the server makes; None: any
    responseFormat: Literal["url", "b64_json"] | None = None  # None: not sent (gpt-image-1)
    maxImagesPerCall: int = Field(4, ge=1, le=10)  # `n`; dall-e-3 takes 1

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: list[str] | None) -> list[str] | None:
        for size in value or []:
            width, _, height = size.partition("x")
            if not (width.isdigit() and height.isdigit() and int(width) and int(height)):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT")
        return value


class OpenAIEngine:
    Settings = OpenAISettings
    image_copies = UPSTREAM_IMAGE_COPIES

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self.settings = OpenAISettings.model_validate(dict(settings))
        self.context = context
        key = self.settings.apiKey.get_secret_value()
        self.upstream = Upstream(
            "openai", self.settings, context, {"authorization": f"Bearer {key}"}
        )

    def serves(self, model: Model) -> bool:
        return self.settings.models is None or model.name in self.settings.models

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        deadline = self.upstream.deadline()
        loop = asyncio.get_running_loop()
        references = await loop.run_in_executor(
            self.context.executor, lambda: [encode_reference(i) for i in request.references]
        )
        done = 0

        async def call(count: int) -> list[Image.Image]:
            nonlocal done
            answer = await self._call(request, references, count, cancel, deadline)
            # Never more than asked for: each extra would be downloaded and decoded for nothing.
            images = [
                await self.upstream.image(item, request.width, request.height, cancel, deadline)
                for item in answer[:count]
            ]
            done += len(images)
            progress(min(1.0, done / request.count))
            return images

        per_call, count = self.settings.maxImagesPerCall, request.count
        sizes = [min(per_call, count - start) for start in range(0, count, per_call)]
        batches = await first_failure_cancels([call(n) for n in sizes])
        images = [image for batch in batches for image in batch]
        return await self.upstream.top_up(images, request.count, call)

    async def _call(
        self,
        request: GenerationRequest,
        references: list[bytes],
        count: int,
        cancel: CancelSignal,
        deadline: float,
    ) -> list[Any]:
        fields: dict[str, Any] = {
            "model": self.settings.model,
            "prompt": request.prompt,
            "n": count,
            "size": self._size(request.width, request.height),
        }
        if self.settings.responseFormat is not None:
            fields["response_format"] = self.settings.responseFormat
        if references:
            files = [
                ("image[]", (f"reference-{n}.jpg", data, "image/jpeg"))
                for n, data in enumerate(references, 1)
            ]
            form = {key: str(value) for key, value in fields.items()}
            answer = await self.upstream.call(
                "POST", "/v1/images/edits", cancel, deadline, data=form, files=files
            )
        else:
            answer = await self.upstream.call(
                "POST", "/v1/images/generations", cancel, deadline, json=fields
            )
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise JobFailed("Upstream answered in an unknown shape", "openai: no data list")
        return data

    def _size(self, width: int, height: int) -> str:
        if self.settings.sizes is None:
            return f"{width}x{height}"

        def distance(size: str) -> float:
            across, _, down = size.partition("x")
            return abs(math.log(int(across) / int(down)) - math.log(width / height))

        return min(self.settings.sizes, key=distance)

    async def check_address(self) -> None:
        await self.upstream.check_address()

    def describe(self) -> dict[str, Any]:
        return {"kind": "openai", "baseUrl": self.settings.baseUrl, "model": self.settings.model}

    async def close(self) -> None:
        await self.upstream.close()
