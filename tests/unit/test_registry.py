"""The engine registry: one engine per account, rebuilt only for newer settings."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from dreamserve.engines.base import EngineContext
from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.engines.registry import EngineRegistry

pytestmark = pytest.mark.anyio


class Recorded:
    closed = 0

    def __init__(self, settings: Any, context: EngineContext) -> None:
        self.settings = settings

    def serves(self, model: Any) -> bool:
        return True

    async def generate(self, request: Any, progress: Any, cancel: Any) -> list[Any]:
        return []

    async def close(self) -> None:
        Recorded.closed += 1


@pytest.fixture
def registry() -> EngineRegistry:
    Recorded.closed = 0
    return EngineRegistry(EngineContext(ThreadPoolExecutor(1)), {"recorded": Recorded})


def test_one_engine_per_account_and_version(registry: EngineRegistry) -> None:
    first = registry.engine("recorded", {"a": 1}, account_id=1, version=10)
    assert registry.engine("recorded", {"a": 1}, account_id=1, version=10) is first
    assert registry.engine("recorded", {"a": 1}, account_id=2, version=10) is not first


def test_newer_settings_build_a_new_engine_and_older_ones_do_not(registry: EngineRegistry) -> None:
    first = registry.engine("recorded", {"a": 1}, account_id=1, version=10)
    newer = registry.engine("recorded", {"a": 2}, account_id=1, version=11)
    assert newer is not first
    assert newer.settings == {"a": 2}  # type: ignore[attr-defined]
    assert registry.engine("recorded", {"a": 1}, account_id=1, version=10) is newer


async def test_close_closes_current_and_replaced_engines(registry: EngineRegistry) -> None:
    registry.engine("recorded", {}, account_id=1, version=1)
    registry.engine("recorded", {}, account_id=1, version=2)
    registry.engine("recorded", {}, account_id=2, version=1)
    await registry.close()
    assert Recorded.closed == 3


def test_builtin_engines_are_imported_by_name() -> None:
    registry = EngineRegistry(EngineContext(ThreadPoolExecutor(1)))
    assert registry.names == ("procedural",)
    engine = registry.engine("procedural", {}, account_id=1, version=1)
    assert isinstance(engine, ProceduralEngine)
