"""Fixtures of the fault suite: a rig (a server with the gated engine) on each database the
test is marked for (or on PostgreSQL alone), and a webhook receiver."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from plugin_site import PluginSite
from receiver import Receiver, receiving
from rig import Rig, install_gated_engine


@contextmanager
def _rig(root: Path, url: str | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    site = PluginSite(root / "site", monkeypatch)
    install_gated_engine(site)
    made = Rig(root, url, site.root)
    try:
        yield made
    finally:
        if made.server is not None:  # a check failed with the server up: no leftover process
            made.stop(signal.SIGKILL)
        site.forget()


@pytest.fixture
def rig(tmp_path: Path, database_url: str | None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    with _rig(tmp_path, database_url, monkeypatch) as made:
        yield made


@pytest.fixture
def pg_rig(tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    with _rig(tmp_path, postgres_url, monkeypatch) as made:
        yield made


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as opened:
        yield opened
