"""Fixtures of the fault suite: a rig (a server with the gated engine) on each database the
test is marked for, and a webhook receiver."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_site import PluginSite
from receiver import Receiver, receiving
from rig import Rig, install_gated_engine


@pytest.fixture
def rig(tmp_path: Path, database_url: str | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    site = PluginSite(tmp_path / "site", monkeypatch)
    install_gated_engine(site)
    made = Rig(tmp_path, database_url, site.root)
    yield made
    if made.server is not None:  # a check failed with the server up: no leftover process
        made.stop(signal.SIGKILL)
    site.forget()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as opened:
        yield opened
