"""The `openai` engine: any OpenAI-compatible images API (OpenAI itself, LocalAI and others).

`POST {baseUrl}/v1/images/generations` (JSON) without references, `POST {baseUrl}/v1/images/edits`
(multipart, `image[]`) with them. `count` goes as `n`, up to the account's `maxImagesPerCall`;
whatever a call did not return is asked for again. The size is the catalogue's, brought within
the upstream model's `sizeLimits` (gpt-image-2's by default); servers that only make a few sizes
are given the nearest in aspect through `sizes`. Either way the result is brought to the
catalogue's size.

Which catalogue model is which upstream model: `models` as a map (the default serves
`gpt-image-2` with `gpt-image-2`), or, the shape accounts were first saved with, one upstream
`model` for every catalogue model `models` lists (all of them when it is absent).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any, Literal

from PIL import Image
from pydantic import Field, ValidationInfo, field_validator

from dreamserve.catalogue import Model
from dreamserve.engines.base import CancelSignal, EngineContext, GenerationRequest, ProgressCallback
from dreamserve.engines.upstream import (
    UPSTREAM_IMAGE_COPIES,
    SizeLimit,
    Upstream,
    UpstreamSettings,
    encode_reference,
    first_failure_cancels,
    fitted_size,
)
from dreamserve.errors import JobFailed

OPENAI = "https://api.openai.com"
DEFAULT_MODELS = {"gpt-image-2": "gpt-image-2"}  # catalogue model -> upstream model


class OpenAISettings(UpstreamSettings):
    """Defaults checked against docs/catalogue.md §3.2 and §5 (O1, O2; gpt-image-2's sizes from
    four agreeing third parties); docs/engines.md has the table. gpt-image-1 and gpt-image-1.5
    are shut down: no default names them."""

    baseUrl: str = OPENAI
    # The first shape: the upstream model for every catalogue model served (`models` a list,
    # or absent: all of them). Unset: `models` maps each catalogue model to its upstream model.
    model: str | None = Field(None, min_length=1)
    models: dict[str, str] | list[str] | None = None
    sizes: list[str] | None = Field(None, min_length=1)  # "WxH" the server makes; None: any
    # Upstream model -> the sizes it takes (unused with `sizes`): a catalogue size outside is
    # asked for at the same aspect within them, and the result resampled to the catalogue's.
    sizeLimits: dict[str, SizeLimit] = Field(
        default_factory=lambda: {
            "gpt-image-2": SizeLimit(
                multipleOf=16,
                maxSide=3840,
                maxRatio=3,
                minPixels=655_360,
                maxPixels=8_294_400,
            )
        }
    )
    responseFormat: Literal["url", "b64_json"] | None = None  # None: not sent (gpt-image-*)
    maxImagesPerCall: int = Field(4, ge=1, le=10)  # `n`; dall-e-3 takes 1

    @field_validator("models")
    @classmethod
    def _models(
        cls, value: dict[str, str] | list[str] | None, info: ValidationInfo
    ) -> dict[str, str] | list[str] | None:
        model = info.data.get("model")
        if isinstance(value, dict):
            if model is not None:
                raise ValueError("a map of catalogue model to upstream model takes no model")
            if not value or not all(value.values()):
                raise ValueError("a map needs at least one catalogue model and its upstream model")
        elif isinstance(value, list) and model is None:
            raise ValueError("a list of catalogue models needs model (the upstream model)")
        return value

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: list[str] | None) -> list[str] | None:
        for size in value or []:
            width, _, height = size.partition("x")
            if not (width.isdigit() and height.isdigit() and int(width) and int(height)):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT")
        return value

    def upstream_model(self, name: str) -> str | None:
        """The upstream model for catalogue model `name`; None: not served."""
        if self.model is not None:
            served = self.models is None or name in self.models
            return self.model if served else None
        models = DEFAULT_MODELS if self.models is None else self.models
        assert isinstance(models, dict)  # a list comes with `model` (the validator)
        return models.get(name)


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
        return self.settings.upstream_model(model.name) is not None

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        model = self.settings.upstream_model(request.model)
        if model is None:  # admission routes only what `serves`
            raise JobFailed("Model not served by this account", f"openai: {request.model}")
        # A size the model cannot take fails the job here, before any call.
        size = self._size(model, request.width, request.height)
        deadline = self.upstream.deadline()
        loop = asyncio.get_running_loop()
        references = await loop.run_in_executor(
            self.context.executor, lambda: [encode_reference(i) for i in request.references]
        )
        done = 0

        async def call(count: int) -> list[Image.Image]:
            nonlocal done
            answer = await self._call(request, model, size, references, count, cancel, deadline)
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
        model: str,
        size: str,
        references: list[bytes],
        count: int,
        cancel: CancelSignal,
        deadline: float,
    ) -> list[Any]:
        fields: dict[str, Any] = {
            "model": model,
            "prompt": request.prompt,
            "n": count,
            "size": size,
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

    def _size(self, model: str, width: int, height: int) -> str:
        if self.settings.sizes is None:
            fitted = fitted_size("openai", model, self.settings.sizeLimits, width, height)
            return f"{fitted[0]}x{fitted[1]}"

        def distance(size: str) -> float:
            across, _, down = size.partition("x")
            return abs(math.log(int(across) / int(down)) - math.log(width / height))

        return min(self.settings.sizes, key=distance)

    async def check_address(self) -> None:
        await self.upstream.check_address()

    def describe(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"kind": "openai", "baseUrl": self.settings.baseUrl}
        if self.settings.model is not None:
            shown["model"] = self.settings.model
        else:
            shown["models"] = (
                DEFAULT_MODELS if self.settings.models is None else self.settings.models
            )
        return shown

    async def close(self) -> None:
        await self.upstream.close()
