"""The engine registry: one engine per account, rebuilt only for newer settings; account settings
checked against the engine's model, with the secrets sealed apart."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, SecretStr

from dreamserve.engines.base import EngineContext, EngineSettings
from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import BadRequest, EngineUnavailable
from dreamserve.sealing import SecretBox

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


class Keyed(Recorded):
    """An upstream-like engine: an API key (secret), a base URL and a bounded number."""

    class Settings(EngineSettings):
        apiKey: SecretStr
        baseUrl: str = "https://upstream.example"
        steps: int = Field(4, ge=1, le=50)


BOX = SecretBox(os.urandom(32))


@pytest.fixture
def registry() -> EngineRegistry:
    Recorded.closed = 0
    context = EngineContext(ThreadPoolExecutor(1))
    return EngineRegistry(context, BOX, {"recorded": Recorded, "keyed": Keyed})


def test_secret_settings_are_sealed_apart_and_given_back_to_the_engine(
    registry: EngineRegistry,
) -> None:
    plain, sealed = registry.check_settings("keyed", {"apiKey": "sk-123456", "steps": 8})
    assert plain == {"steps": 8}  # defaults are not frozen into the account
    assert sealed is not None
    assert "sk-123456" not in sealed
    assert BOX.open(sealed) == {"apiKey": "sk-123456"}
    engine = registry.engine("keyed", plain, sealed=sealed, account_id=1, version=(1, 1))
    assert engine.settings == {"steps": 8, "apiKey": "sk-123456"}  # type: ignore[attr-defined]


def test_secrets_sealed_with_another_key_do_not_open() -> None:
    sealed = SecretBox(os.urandom(32)).seal({"apiKey": "x"})
    with pytest.raises(ValueError, match="sealed with another key"):
        BOX.open(sealed)


@pytest.mark.parametrize(
    ("engine", "settings", "message"),
    [
        ("keyed", {}, "Parameter settings.apiKey is required"),
        (
            "keyed",
            {"apiKey": "k", "colour": "red"},
            "Parameter settings.colour not allowed: engine keyed takes apiKey, baseUrl, steps",
        ),
        (
            "keyed",
            {"apiKey": "k", "steps": 99},
            "Parameter settings.steps is invalid: Input should be less than or equal to 50",
        ),
        (
            "keyed",
            {"apiKey": 12345678},
            "Parameter settings.apiKey is invalid: Input should be a valid string",
        ),
        (
            "recorded",
            {"anything": 1},
            "Parameter settings.anything not allowed: engine recorded takes no settings",
        ),
    ],
)
def test_bad_settings_name_the_key_and_never_echo_the_value(
    registry: EngineRegistry, engine: str, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadRequest) as raised:
        registry.check_settings(engine, settings)
    assert raised.value.message == message


def test_one_engine_per_account_and_version(registry: EngineRegistry) -> None:
    first = registry.engine("recorded", {"a": 1}, account_id=1, version=(1, 10))
    assert registry.engine("recorded", {"a": 1}, account_id=1, version=(1, 10)) is first
    assert registry.engine("recorded", {"a": 1}, account_id=2, version=(1, 10)) is not first


def test_newer_settings_build_a_new_engine_and_older_ones_do_not(registry: EngineRegistry) -> None:
    first = registry.engine("recorded", {"a": 1}, account_id=1, version=(1, 10))
    newer = registry.engine("recorded", {"a": 2}, account_id=1, version=(1, 11))
    assert newer is not first
    assert newer.settings == {"a": 2}  # type: ignore[attr-defined]
    assert registry.engine("recorded", {"a": 1}, account_id=1, version=(1, 10)) is newer


def test_an_account_made_again_under_the_same_id_gets_a_new_engine(
    registry: EngineRegistry,
) -> None:
    """SQLite may give a new account the id of a deleted one: another creation time is
    another account, even when its times are older (a clock that stepped back)."""
    first = registry.engine("recorded", {"a": "user A"}, account_id=1, version=(100, 200))
    other = registry.engine("recorded", {"a": "user B"}, account_id=1, version=(50, 60))
    assert other is not first
    assert other.settings == {"a": "user B"}  # type: ignore[attr-defined]


def test_a_retired_account_builds_a_new_engine(registry: EngineRegistry) -> None:
    first = registry.engine("recorded", {}, account_id=1, version=(1, 1))
    registry.retire(1)
    assert registry.engine("recorded", {}, account_id=1, version=(1, 1)) is not first


async def test_a_replaced_engine_is_closed_when_its_last_job_ends(
    registry: EngineRegistry,
) -> None:
    """A new save of an account must not leave its old engine (a model on a GPU) open until
    shutdown, nor close it under a job that still runs on it."""
    old = registry.hold(registry.engine("recorded", {"a": 1}, account_id=1, version=(1, 1)))
    second_job = registry.hold(registry.engine("recorded", {"a": 1}, account_id=1, version=(1, 1)))
    assert second_job is old
    new = registry.hold(registry.engine("recorded", {"a": 2}, account_id=1, version=(1, 2)))
    await registry.release(old)
    assert Recorded.closed == 0  # a job still runs on it
    await registry.release(second_job)
    assert Recorded.closed == 1  # the old one, not the current one
    await registry.release(new)
    assert Recorded.closed == 1
    await registry.close()
    assert Recorded.closed == 2


async def test_an_unused_retired_engine_is_closed_at_the_next_release(
    registry: EngineRegistry,
) -> None:
    registry.engine("recorded", {}, account_id=1, version=(1, 1))  # built by admission only
    registry.retire(1)  # the account was deleted
    other = registry.hold(registry.engine("recorded", {}, account_id=2, version=(1, 1)))
    await registry.release(other)
    assert Recorded.closed == 1


async def test_close_closes_current_and_replaced_engines(registry: EngineRegistry) -> None:
    registry.engine("recorded", {}, account_id=1, version=(1, 1))
    registry.engine("recorded", {}, account_id=1, version=(1, 2))
    registry.engine("recorded", {}, account_id=2, version=(1, 1))
    await registry.close()
    assert Recorded.closed == 3


def test_builtin_engines_are_imported_by_name() -> None:
    registry = EngineRegistry(EngineContext(ThreadPoolExecutor(1)), BOX)
    assert registry.names == ("procedural", "diffusers", "ark", "gemini", "openai")
    engine = registry.engine("procedural", {}, account_id=1, version=(1, 1))
    assert isinstance(engine, ProceduralEngine)


def test_an_engine_whose_module_fails_to_import_is_a_400(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Installed but broken (torch with CUDA libraries it cannot open raises OSError): a clear
    400 when an account chooses it, not a 500."""
    (tmp_path / "broken_engine.py").write_text("raise OSError('libcudart.so.12: not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = EngineRegistry(
        EngineContext(ThreadPoolExecutor(1)), BOX, {"broken": "broken_engine:Engine"}
    )
    with pytest.raises(BadRequest) as broken:
        registry.check_settings("broken", {})
    assert broken.value.message == (
        "Engine broken cannot be loaded on this server (OSError: see the server log)"
    )


def test_an_engine_no_longer_installed_is_a_clear_error_not_a_key_error(
    registry: EngineRegistry,
) -> None:
    """An account saved while a plugin was installed, used after it was uninstalled: its jobs
    fail with `Engine unavailable` and this message (worker.py), not an unexpected KeyError."""
    with pytest.raises(EngineUnavailable) as raised:
        registry.factory("uninstalled")
    assert raised.value.message == "Engine uninstalled is not installed on this server"
    assert raised.value.status == 400
