"""The `gemini` engine: nano-banana through the Google Gemini API.

`POST {baseUrl}/v1beta/models/<model>:generateContent` with the prompt and the references as
inline parts, asking for an image in the aspect ratio nearest the job's size. Gemini makes one
image per call, so `count` is that many concurrent calls. A blocked prompt or an answer without
an image fails the job with the reason Gemini gives.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Mapping
from typing import Any

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


class GeminiSettings(UpstreamSettings):
    baseUrl: str = GOOGLE
    # catalogue model -> Gemini model
    models: dict[str, str] = Field(
        default_factory=lambda: {"nano-banana": "gemini-2.5-flash-image"}, min_length=1
    )
    aspectRatios: list[str] = Field(
        default_factory=lambda: [
            *("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
        ],
        min_length=1,
    )
    maxReferences: int = Field(3, ge=0)

    @field_validator("aspectRatios")
    @classmethod
    def _ratios(cls, value: list[str]) -> list[str]:
        for ratio in value:
            across, _, down = ratio.partition(":")
            if not (across.isdigit() and down.isdigit() and int(across) and int(down)):
                raise ValueError(f"{ratio!r} is not W:H with whole numbers above 0")
        return value


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
        if len(request.references) > self.settings.maxReferences:
            raise JobFailed(
                "Too many reference images for this account",
                f"gemini takes at most {self.settings.maxReferences}",
            )
        deadline = self.upstream.deadline()
        loop = asyncio.get_running_loop()
        parts = await loop.run_in_executor(self.context.executor, _parts, request)
        path = f"/v1beta/models/{self.settings.models[request.model]}:generateContent"
        body = {
            "contents": [{"parts": parts}],
            "generationConfig": {
                "responseModalities": ["IMAGE"],
                "imageConfig": {"aspectRatio": self._ratio(request.width, request.height)},
            },
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

        return await first_failure_cancels([one() for _ in range(request.count)])

    def _ratio(self, width: int, height: int) -> str:
        def distance(ratio: str) -> float:
            across, down = (float(side) for side in ratio.split(":"))
            return abs(math.log(across / down) - math.log(width / height))

        return min(self.settings.aspectRatios, key=distance)

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
