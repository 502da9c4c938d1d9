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
        self._instances: dict[int, tuple[int, Engine]] = {}  # account id -> (version, engine)
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
        """The engine of an account. `version` (the account's update time) tells when its
        settings changed: a newer one builds a new engine, an older one (a caller holding a
        stale copy of the account) gets the current engine rather than churning it."""
        with self._lock:
            current = self._instances.get(account_id)
            if current is not None and current[0] >= version:
                return current[1]
            if current is not None:
                self._retired.append(current[1])  # jobs may still use it: closed at shutdown
            engine = self.factory(name)(settings, self.context)
            self._instances[account_id] = (version, engine)
            return engine

    async def close(self) -> None:
        engines = [engine for _, engine in self._instances.values()] + self._retired
        self._instances, self._retired = {}, []
        for engine in engines:
            await engine.close()
