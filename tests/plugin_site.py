"""Engine plugins installed for real: a module and its `<name>-<version>.dist-info` folder
(METADATA, entry_points.txt) in a folder on sys.path, where importlib.metadata finds them as it
finds what pip installed. Nothing is mocked: the registry discovers and imports them itself."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

# A plugin engine that paints every image one colour (its `colour` setting) with Pillow.
FLAT_ENGINE = '''
from PIL import Image

from dreamserve.engines.base import EngineSettings


class FlatEngine:
    class Settings(EngineSettings):
        colour: str = "teal"

    def __init__(self, settings, context):
        self.colour = settings.get("colour", "teal")

    def serves(self, model):
        return True

    async def generate(self, request, progress, cancel):
        progress(1.0)
        size = (request.width, request.height)
        return [Image.new("RGB", size, self.colour) for _ in range(request.count)]

    async def close(self):
        pass


class UsersFlatEngine(FlatEngine):
    """Declares that users' own accounts may use it."""

    operator_only = False
'''


class PluginSite:
    """A site folder of test distributions; what it imported is forgotten at teardown."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._modules: list[str] = []
        monkeypatch.syspath_prepend(str(root))

    def install(
        self,
        distribution: str,
        engines: Mapping[str, str],
        modules: Mapping[str, str] | None = None,
    ) -> None:
        """Install `distribution` (version 0.1) with its `modules` (name -> source) and
        `engines` (engine name -> "module:Factory") in the group dreamserve.engines."""
        for name, source in (modules or {}).items():
            (self.root / f"{name}.py").write_text(source)
            self._modules.append(name)
        info = self.root / f"{distribution.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n"
        )
        lines = "".join(f"{name} = {value}\n" for name, value in engines.items())
        (info / "entry_points.txt").write_text(f"[dreamserve.engines]\n{lines}")
        importlib.invalidate_caches()  # the import system and importlib.metadata cache listings

    def forget(self) -> None:
        for name in self._modules:
            sys.modules.pop(name, None)
