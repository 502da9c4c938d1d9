"""bench/scale.py's engine: each job waits (200 ms by default, the account's `seconds` setting)
and returns blank images, using no CPU of its own. Installed as a plugin (an entry point in the
group dreamserve.engines, written by bench/scale.py into a site folder on PYTHONPATH), so that
the real `dreamserve serve` and `dreamserve worker` commands load it as an operator's would."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from PIL import Image

from dreamserve.catalogue import Model
from dreamserve.engines.base import (
    CancelSignal,
    EngineContext,
    EngineSettings,
    GenerationRequest,
    ProgressCallback,
)


class SleepEngine:
    class Settings(EngineSettings):
        seconds: float = 0.2

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self.seconds = float(settings.get("seconds", 0.2))

    def serves(self, model: Model) -> bool:
        return True

    async def generate(
        self, request: GenerationRequest, progress: ProgressCallback, cancel: CancelSignal
    ) -> list[Image.Image]:
        await asyncio.sleep(self.seconds)
        progress(1.0)
        return [Image.new("RGB", (request.width, request.height)) for _ in range(request.count)]

    async def close(self) -> None:
        return None
