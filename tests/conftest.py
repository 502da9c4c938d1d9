"""Shared fixtures: settings in a temp data dir, and an in-process API harness."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from support import Harness, open_harness

from dreamserve.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        public_url="http://testserver",
        progress_interval_seconds=0.05,
        render_threads=2,
    )


@pytest.fixture
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    async with open_harness(settings) as opened:
        yield opened
