"""The `gemini` engine: nano-banana through the Google Gemini API.

`POST {baseUrl}/v1beta/models/<model>:generateContent` with the prompt and the references as
inline parts, asking for an image in the aspect ratio nearest the job's size and, on the models
that take one, the smallest `imageSize` that covers the job's pixels; the answer is resampled to
the catalogue's size. Gemini makes one image per call, so `count` is that many concurrent calls.
More references than the upstream model takes fail the job before any call. A blocked prompt or
an answer without an image fails the job with the reason Gemini gives. The defaults and limits
come from docs/catalogue.md (§3.1, §5); docs/engines.md gives the table and the dates.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

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

GOOGLE = "https://generativelanguage.googleapis.com"
# `imageSize` values and their nominal edge: "1K" is about 1024x1024 pixels at any ratio.
IMAGE_SIZE_EDGES = {"512": 512, "1K": 1024, "2K": 2048, "4K": 4096}
# A size covers a job of up to this much more than its nominal square: a ratio's 1K size may
# be a little over 1024x1024 pixels and must still ask "1K" (our margin, not Google's).
IMAGE_SIZE_SLACK = 1.05
GEMINI_3 = ("gemini-3-pro-image", "gemini-3.1-flash-image")


class GeminiSettings(UpstreamSettings):
    baseUrl: str = GOOGLE
    # catalogue model -> Gemini model
    models: dict[str, str] = Field(
        default_factory=lambda: {"nano-banana": "gemini-3-pro-image"}, min_length=1
    )
    aspectRatios: list[str] = Field(
        default_factory=lambda: [
            *("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
        ],
        min_length=1,
    )
    # Gemini model -> ratios it takes besides aspectRatios
    extraAspectRatios: dict[str, list[str]] = Field(
        default_factory=lambda: {"gemini-3.1-flash-image": ["1:4", "4:1", "1:8", "8:1"]}
    )
    # Gemini model -> the imageSize values it takes; a model not listed is sent none
    imageSizes: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "gemini-3-pro-image": ["1K", "2K", "4K"],
            "gemini-3.1-flash-image": ["512", "1K", "2K", "4K"],
        }
    )
    # Gemini model -> the most reference images it takes; a model not listed: no limit here
    referenceLimits: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: {**dict.fromkeys(GEMINI_3, 14), "gemini-2.5-flash-image": 3}
    )
    # The account's own cap, whatever the model (accounts saved before referenceLimits).
    maxReferences: int | None = Field(None, ge=0)

    @field_validator("aspectRatios")
    @classmethod
    def _ratios(cls, value: list[str]) -> list[str]:
        return _checked_ratios(value)

    @field_validator("extraAspectRatios")
    @classmethod
    def _extra_ratios(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for ratios in value.values():
            _checked_ratios(ratios)
        return value

    @field_validator("imageSizes")
    @classmethod
    def _image_sizes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for sizes in value.values():
            if not sizes:
                raise ValueError("a model's list needs a size (leave the model out for none)")
            for size in sizes:
                if size not in IMAGE_SIZE_EDGES:
                    raise ValueError(f"{size!r} is not one of {', '.join(IMAGE_SIZE_EDGES)}")
        return value


def _checked_ratios(value: list[str]) -> list[str]:
    for ratio in value:
        across, _, down = ratio.partition(":")
        if not (across.isdigit() and down.isdigit() and int(across) and int(down)):
            raise ValueError(f"{ratio!r} is not W:H with whole numbers above 0")
    return value


def image_size(sizes: Sequence[str] | None, width: int, height: int) -> str | None:
    """The `imageSize` to ask for a job of width x height: the smallest of `sizes` whose
    nominal square (1K: 1024x1024) holds its pixels, give or take IMAGE_SIZE_SLACK; past the
    largest, the largest. None where the model takes no imageSize."""
    if not sizes:
        return None
    ordered = sorted(sizes, key=IMAGE_SIZE_EDGES.__getitem__)
    for size in ordered:
        if IMAGE_SIZE_EDGES[size] ** 2 * IMAGE_SIZE_SLACK >= width * height:
            return size
    return ordered[-1]


class GeminiEngine:
    Settings = GeminiSettings
    image_copies = UPSTREAM_IMAGE_COPIES

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self.settings = GeminiSettings.model_validate(dict(settings))
        self.context = context
        key = self.settings.apiKey.get_secret_value()
        self.upstream = Upstream("gemini", self.settings, context, {"x-goog-api-key": key})

    def serves(self, model: Model) -> bool:
        return model.name in self.settings.models

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        upstream_model = self.settings.models[request.model]
        self._check_references(upstream_model, len(request.references))
        deadline = self.upstream.deadline()
        loop = asyncio.get_running_loop()
        parts = await loop.run_in_executor(self.context.executor, _parts, request)
        path = f"/v1beta/models/{upstream_model}:generateContent"
        config: dict[str, str] = {
            "aspectRatio": self._ratio(upstream_model, request.width, request.height)
        }
        size = image_size(
            self.settings.imageSizes.get(upstream_model), request.width, request.height
        )
        if size is not None:
            config["imageSize"] = size
        body = {
            "contents": [{"parts": parts}],
            "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": config},
        }
        done = 0

        async def one() -> Image.Image:
            nonlocal done
            answer = await self.upstream.call("POST", path, cancel, deadline, json=body)
            data = self.upstream.decode_inline(_inline_image(answer))
            image = await self.upstream.decode(data, request.width, request.height)
            done += 1
            progress(done / request.count)
            return image

        # one call per image, all at once: `count` calls in flight, never more
        return await first_failure_cancels([one() for _ in range(request.count)])

    def _check_references(self, upstream_model: str, count: int) -> None:
        limit = self.settings.referenceLimits.get(upstream_model)
        if limit is not None and count > limit:
            raise JobFailed(
                "Too many reference images for this account",
                f"gemini: {upstream_model} takes at most {limit}",
            )
        cap = self.settings.maxReferences
        if cap is not None and count > cap:
            raise JobFailed(
                "Too many reference images for this account",
                f"gemini: this account takes at most {cap} (maxReferences)",
            )

    def _ratio(self, upstream_model: str, width: int, height: int) -> str:
        def distance(ratio: str) -> float:
            across, down = (float(side) for side in ratio.split(":"))
            return abs(math.log(across / down) - math.log(width / height))

        extra = self.settings.extraAspectRatios.get(upstream_model, [])
        return min([*self.settings.aspectRatios, *extra], key=distance)

    async def check_address(self) -> None:
        await self.upstream.check_address()

    def describe(self) -> dict[str, Any]:
        return {"kind": "gemini", "baseUrl": self.settings.baseUrl, "models": self.settings.models}

    async def close(self) -> None:
        await self.upstream.close()


def _parts(request: GenerationRequest) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"text": request.prompt}] if request.prompt else []
    for image in request.references:
        data = base64.b64encode(encode_reference(image)).decode()
        parts.append({"inline_data": {"mime_type": "image/jpeg", "data": data}})
    return parts


def _inline_image(answer: Any) -> str:
    """The base64 data of the first image part, or the failure Gemini's answer explains."""
    if not isinstance(answer, dict):
        raise JobFailed("Upstream answered in an unknown shape", "gemini: not an object")
    feedback = answer.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        raise JobFailed("Upstream refused the prompt", f"gemini: {feedback['blockReason']}")
    text: list[str] = []
    reasons: list[str] = []
    for candidate in answer.get("candidates") or []:
        if not isinstance(candidate, dict):
            continue
        reason = candidate.get("finishReason")
        if isinstance(reason, str) and reason != "STOP":
            reasons.append(reason)
        content = candidate.get("content")
        for part in (content.get("parts") if isinstance(content, dict) else None) or []:
            if not isinstance(part, dict):
                continue
            inline = part.get("inlineData") or part.get("inline_data")
            if isinstance(inline, dict) and isinstance(inline.get("data"), str):
                return str(inline["data"])
            if isinstance(part.get("text"), str):
                text.append(part["text"])
    if reasons:
        raise JobFailed("Upstream refused the prompt", f"gemini: {', '.join(reasons)}")
    said = " ".join(text).strip()
    raise JobFailed(
        "Upstream returned no image", f"gemini: {said[:300]}" if said else "gemini: no image"
    )
