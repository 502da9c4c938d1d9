"""Engine names to implementations, imported lazily so optional dependencies stay optional."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from typing import Any, cast

from dreamserve.engines.base import Engine, EngineContext, EngineFactory

# An engine is named by "module:attribute" (imported on first use) or given as its factory.
EngineSource = str | EngineFactory

BUILTIN: Mapping[str, EngineSource] = {
    "procedural": "dreamserve.engines.procedural:ProceduralEngine",
}


class EngineRegistry:
    """Makes one engine per account and keeps it while the account's settings stay the same."""

    def __init__(
        self, context: EngineContext, engines: Mapping[str, EngineSource] = BUILTIN
    ) -> None:
        self.context = context
        self._paths = dict(engines)
        self._instances: dict[tuple[int, int], Engine] = {}
        self._retired: list[Engine] = []
        self._lock = threading.Lock()  # database threads ask too (admission)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._paths)

    def factory(self, name: str) -> EngineFactory:
        source = self._paths[name]
        if not isinstance(source, str):
            return source
        module_name, _, attribute = source.partition(":")
        return cast(EngineFactory, getattr(importlib.import_module(module_name), attribute))

    def engine(
        self, name: str, settings: Mapping[str, Any], *, account_id: int, version: int
    ) -> Engine:
        """The engine of an account; `version` (its update time) tells when to rebuild it."""
        key = (account_id, version)
        with self._lock:
            if key not in self._instances:
                stale = [old for old in self._instances if old[0] == account_id]
                self._retired.extend(self._instances.pop(old) for old in stale)
                self._instances[key] = self.factory(name)(settings, self.context)
            return self._instances[key]

    async def close(self) -> None:
        engines = [*self._instances.values(), *self._retired]
        self._instances, self._retired = {}, []
        for engine in engines:
            await engine.close()
