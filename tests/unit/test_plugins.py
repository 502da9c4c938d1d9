"""Engines of other distributions (entry-point group dreamserve.engines): found by name when the
registry is built, imported on first use, never in place of a built-in engine, and the
operator's unless they say otherwise."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from plugin_site import FLAT_ENGINE, PluginSite

from dreamserve.engines.base import EngineContext
from dreamserve.engines.procedural import ProceduralEngine
from dreamserve.engines.registry import BUILTIN, EngineRegistry
from dreamserve.errors import BadRequest
from dreamserve.sealing import SecretBox

BOX = SecretBox(os.urandom(32))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginSite]:
    installed = PluginSite(tmp_path / "site", monkeypatch)
    yield installed
    installed.forget()


def registry() -> EngineRegistry:
    return EngineRegistry(EngineContext(ThreadPoolExecutor(1)), BOX)


def test_a_plugin_engine_is_known_by_name_and_imported_on_first_use(site: PluginSite) -> None:
    site.install(
        "dreamserve-flat", {"flat": "flat_engine:FlatEngine"}, {"flat_engine": FLAT_ENGINE}
    )
    engines = registry()
    assert engines.names == (*BUILTIN, "flat")
    assert "flat_engine" not in sys.modules  # a broken plugin must not stop the start
    plain, sealed = engines.check_settings("flat", {"colour": "red"})
    assert (plain, sealed) == ({"colour": "red"}, None)
    engine = engines.engine("flat", plain, account_id=1, version=(1, 1))
    assert type(engine).__name__ == "FlatEngine"
    assert engine.colour == "red"  # type: ignore[attr-defined]


def test_an_entry_point_may_name_an_attribute_of_a_class(site: PluginSite) -> None:
    source = FLAT_ENGINE + "\nclass Engines:\n    flat = FlatEngine\n"
    site.install("dreamserve-flat", {"flat": "flat_engine:Engines.flat"}, {"flat_engine": source})
    assert registry().factory("flat").__name__ == "FlatEngine"  # type: ignore[attr-defined]


def test_a_plugin_may_not_replace_a_built_in_engine(
    site: PluginSite, caplog: pytest.LogCaptureFixture
) -> None:
    """An account on `procedural` must get the engine the documentation describes, whatever
    else is installed: the built-in is kept, and the log names the distribution that tried."""
    site.install(
        "dreamserve-impostor",
        {"procedural": "flat_engine:FlatEngine"},
        {"flat_engine": FLAT_ENGINE},
    )
    with caplog.at_level(logging.WARNING, logger="dreamserve.engines.plugins"):
        engines = registry()
    assert engines.names == tuple(BUILTIN)
    assert engines.factory("procedural") is ProceduralEngine
    assert "flat_engine" not in sys.modules
    assert caplog.messages == [
        "engine procedural of dreamserve-impostor 0.1 is ignored: a built-in engine has that name"
    ]


def test_a_name_two_distributions_install_is_neither_ones(
    site: PluginSite, caplog: pytest.LogCaptureFixture
) -> None:
    """Which one an account ran would depend on the order of files on disk."""
    site.install(
        "dreamserve-flat", {"flat": "flat_engine:FlatEngine"}, {"flat_engine": FLAT_ENGINE}
    )
    site.install("dreamserve-other", {"flat": "flat_engine:FlatEngine", "other": "x:Y"})
    with caplog.at_level(logging.WARNING, logger="dreamserve.engines.plugins"):
        engines = registry()
    assert engines.names == (*BUILTIN, "other")
    [message] = caplog.messages
    assert message.startswith("engine flat is ignored: ")
    assert "dreamserve-flat 0.1" in message
    assert "dreamserve-other 0.1" in message


def test_a_name_longer_than_an_account_stores_is_ignored(
    site: PluginSite, caplog: pytest.LogCaptureFixture
) -> None:
    site.install("dreamserve-long", {"x" * 65: "flat_engine:FlatEngine", "x" * 64: "m:F"})
    with caplog.at_level(logging.WARNING, logger="dreamserve.engines.plugins"):
        engines = registry()
    assert engines.names == (*BUILTIN, "x" * 64)
    assert caplog.messages == [
        f"engine '{'x' * 65}' of dreamserve-long 0.1 is ignored: a name has 1 to 64 characters"
    ]


def test_plugin_engines_are_the_operators_unless_their_factory_says_otherwise(
    site: PluginSite,
) -> None:
    """The server cannot know what another distribution's code reads or takes (files, GPUs,
    the network behind it): users' own accounts may use it only when it says they may."""
    site.install(
        "dreamserve-flat",
        {"flat": "flat_engine:FlatEngine", "users-flat": "flat_engine:UsersFlatEngine"},
        {"flat_engine": FLAT_ENGINE},
    )
    engines = registry()
    assert engines.operator_only("flat")
    assert not engines.operator_only("users-flat")
    assert not engines.operator_only("procedural")  # built-ins keep their own rule


@pytest.mark.parametrize(
    ("module", "value", "message"),
    [
        (
            "import dreamserve_flat_needs_this\n",
            "flat_engine:FlatEngine",
            "Engine flat needs dreamserve_flat_needs_this, which is not installed on this "
            "server: pip install dreamserve_flat_needs_this",
        ),
        (
            "raise RuntimeError('no GPU driver')\n",
            "flat_engine:FlatEngine",
            "Engine flat cannot be loaded on this server (RuntimeError: see the server log)",
        ),
        (
            FLAT_ENGINE,
            "flat_engine:Absent",
            "Engine flat cannot be loaded on this server (AttributeError: see the server log)",
        ),
        (
            FLAT_ENGINE,
            "absent_module:FlatEngine",
            "Engine flat needs absent_module, which is not installed on this server: "
            "pip install absent_module",
        ),
    ],
)
def test_a_plugin_that_cannot_be_imported_is_a_400_naming_the_engine(
    site: PluginSite,
    caplog: pytest.LogCaptureFixture,
    module: str,
    value: str,
    message: str,
) -> None:
    site.install("dreamserve-flat", {"flat": value}, {"flat_engine": module})
    engines = registry()  # found, not imported: the server starts
    assert "flat" in engines.names
    with caplog.at_level(logging.WARNING), pytest.raises(BadRequest) as raised:
        engines.check_settings("flat", {})
    assert raised.value.message == message
    assert "engine flat of dreamserve-flat 0.1 cannot be imported" in caplog.text
