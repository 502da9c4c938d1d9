"""The fault suite's engine, installed as a real plugin (tests/plugin_site.py) in the servers it
starts: a job waits at the stage the test chooses, and every attempt is written to a journal.

A job is named by its prompt (its *tag*). Its attempt waits in `generate` until the file
`<gates>/<tag>.run` exists, then returns images whose encoding waits until `<gates>/<tag>.store`
exists (or, for its image N alone, `<gates>/<tag>.storeN`: a job's first image stored while the
others wait): the test holds a job running, or storing its images, and lets it go by creating a
file.
Each wait also ends when the job's cancel signal is set (a shutdown, a lost lease), as a real
engine's does.

Every step is one JSON line appended to `<gates>/journal.jsonl`: `start`, `end` (generate
returned or raised), `storing` and `stored` (the encoding of an image began and ended), with the
attempt's id, the server's pid and `time.monotonic()` (one clock for every process of the
machine), from which the suite checks that no two attempts of a job ever overlapped.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from dreamserve.catalogue import Model
from dreamserve.engines.base import CancelSignal, EngineContext, EngineSettings, GenerationRequest

POLL_SECONDS = 0.02


def note(gates: Path, event: str, tag: str, attempt: str) -> None:
    """Append one step to the journal (one write of one line: appends do not interleave)."""
    line = {"event": event, "tag": tag, "attempt": attempt, "pid": os.getpid()}
    line["t"] = time.monotonic()  # type: ignore[assignment]
    with open(gates / "journal.jsonl", "a") as journal:
        journal.write(json.dumps(line) + "\n")


class _Stopped(RuntimeError):
    """The job's cancel signal was set while its images waited to be encoded."""


class HeldImage(Image.Image):
    """An image whose encoding (the server calls `save` in its render threads) waits for the
    store gate, and is journalled."""

    gates: Path
    tag: str
    attempt: str
    index: int  # of the job's images
    cancel: CancelSignal

    def save(self, fp: Any, format: Any = None, **params: Any) -> None:
        note(self.gates, "storing", self.tag, self.attempt)
        gates = (self.gates / f"{self.tag}.store", self.gates / f"{self.tag}.store{self.index}")
        try:
            while not any(gate.exists() for gate in gates):
                if self.cancel.is_set:
                    raise _Stopped(self.tag)
                time.sleep(POLL_SECONDS)
            super().save(fp, format, **params)
        finally:
            note(self.gates, "stored", self.tag, self.attempt)


def held_image(
    size: tuple[int, int], gates: Path, tag: str, attempt: str, index: int, cancel: CancelSignal
) -> Image.Image:
    image = Image.new("RGB", size, "teal")
    image.__class__ = HeldImage  # the same pixels and fields; only `save` differs
    assert isinstance(image, HeldImage)
    image.gates, image.tag, image.attempt, image.cancel = gates, tag, attempt, cancel
    image.index = index
    return image


class GatedEngine:
    class Settings(EngineSettings):
        gates: str  # the directory of the gate files and the journal

    def __init__(self, settings: Mapping[str, Any], context: EngineContext) -> None:
        self.gates = Path(settings["gates"])

    def serves(self, model: Model) -> bool:
        return True

    async def generate(
        self, request: GenerationRequest, progress: Callable[[float], None], cancel: CancelSignal
    ) -> list[Image.Image]:
        tag, attempt = request.prompt, uuid.uuid4().hex
        note(self.gates, "start", tag, attempt)
        try:
            while not (self.gates / f"{tag}.run").exists():
                cancel.raise_if_set()
                await asyncio.sleep(POLL_SECONDS)
            progress(1.0)
            size = (request.width, request.height)
            return [
                held_image(size, self.gates, tag, attempt, index, cancel)
                for index in range(request.count)
            ]
        finally:
            note(self.gates, "end", tag, attempt)

    async def close(self) -> None:
        return None
