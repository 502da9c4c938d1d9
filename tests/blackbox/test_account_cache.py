"""Black box: two `dreamserve serve` processes on one PostgreSQL. An account added, changed or
deleted through one is seen by the other's admission within its account cache's staleness
(`DREAMSERVE_ACCOUNT_CACHE_SECONDS`, 2 s), without a restart."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from servers import DREAMSERVE_SERVE, Server
from support import free_port

pytestmark = pytest.mark.blackbox

SMALL = {"prompt": "a small test picture", "model": "nano-banana", "ratio": "1:1", "count": 1}
ADDED = {"account": "LOCAL:added", "engine": "procedural", "maxJobs": 2}
# A bound for "eventually": far beyond the 2 s staleness, on a loaded machine.
WAIT_SECONDS = 20.0


@pytest.fixture
def two_apis(tmp_path: Path, postgres_url: str) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    data_dir = tmp_path / "data"
    env = {"DREAMSERVE_ACCESS_LOG": "false"}
    with ExitStack() as stack:
        servers = []
        for _ in range(2):  # the first alone: it migrates and prints the token
            server = Server(data_dir, free_port(), postgres_url, env, DREAMSERVE_SERVE)
            stack.callback(server.stop, signal.SIGKILL)
            servers.append(server)
        token = servers[0].token
        assert token, servers[0].output
        headers = {"Authorization": f"Bearer {token}"}
        one, two = (
            stack.enter_context(httpx.Client(base_url=s.url, headers=headers, timeout=30))
            for s in servers
        )
        yield one, two


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"never {what} (after {WAIT_SECONDS:g} s)"
        time.sleep(0.1)


def submitted(client: httpx.Client, account: str) -> int:
    """The status of a submission on `account` (a job that runs at once, if admitted)."""
    return client.post("/v1/dreamina/images", json={**SMALL, "account": account}).status_code


def test_account_changes_through_one_api_process_reach_the_other(
    two_apis: tuple[httpx.Client, httpx.Client],
) -> None:
    one, two = two_apis
    # The second process reads the user's accounts (its cache now holds them).
    assert submitted(two, "LOCAL:procedural") == 200
    assert submitted(two, "LOCAL:added") == 404

    # Added through the first: the second admits jobs on it once its list is read again.
    assert one.post("/v1/dreamina/accounts", json=ADDED).status_code == 200
    eventually(lambda: submitted(two, "LOCAL:added") == 200, "the added account admitted")

    # Its models changed through the first: the second refuses the model it no longer serves.
    changed = one.post("/v1/dreamina/accounts", json={**ADDED, "models": ["seedream-4.0"]})
    assert changed.status_code == 200, changed.text
    eventually(lambda: submitted(two, "LOCAL:added") == 400, "the changed account refusing")

    # Deleted through the first: the second says it does not exist.
    assert one.delete("/v1/dreamina/accounts/LOCAL:added").status_code == 200
    eventually(lambda: submitted(two, "LOCAL:added") == 404, "the deleted account unknown")
