"""A real `dreamserve serve` for the tests of the Python client and its commands: a shared
`LOCAL:procedural` (as a first start makes it without a configuration file), and a shared
`LOCAL:gated` account whose jobs (model `tiny`, 64x64) wait in the fault suite's gated engine
(tests/faults/gated_engine.py, installed as a real plugin) until the test opens their gate or
cancels them: a job that runs as long as the test needs."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from plugin_site import PluginSite
from servers import DREAMSERVE_SERVE, ROOT, Server, serving
from support import free_port

GATED = "LOCAL:gated"
RETRY_AFTER = 7  # the server's Retry-After on a 429 (DREAMSERVE_RETRY_AFTER_SECONDS)
WAIT_SECONDS = 60.0  # the bound of every wait for a state

CONFIG = """
[sizes.tiny.1k]
"1:1" = "64x64"

[[models]]
name = "tiny"
resolutions = ["1k"]
sizes = "tiny"
max_refs = 0
prompt_required = true
auto_ratio = false

[[accounts]]
account = "LOCAL:procedural"
engine = "procedural"
maxJobs = 10

[[accounts]]
account = "{account}"
engine = "gated"
maxJobs = 10
models = ["tiny"]
settings = {{ gates = "{gates}" }}
"""


@contextmanager
def client_server(root: Path) -> Iterator[Server]:
    """The server, its data, plugin site and gates under `root`."""
    gates = root / "gates"
    gates.mkdir(parents=True)
    (gates / "journal.jsonl").touch()
    (root / "dreamserve.toml").write_text(CONFIG.format(account=GATED, gates=gates))
    with pytest.MonkeyPatch.context() as monkeypatch:
        site = PluginSite(root / "site", monkeypatch)
        source = (ROOT / "tests" / "faults" / "gated_engine.py").read_text()
        site.install(
            "dreamserve-fault-engine",
            {"gated": "fault_engine:GatedEngine"},
            {"fault_engine": source},
        )
        settings = {
            "DREAMSERVE_CONFIG": str(root / "dreamserve.toml"),
            "DREAMSERVE_RETRY_AFTER_SECONDS": str(RETRY_AFTER),
            "DREAMSERVE_WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on 127.0.0.1
            "PYTHONPATH": os.pathsep.join([str(site.root), *python_path()]),
        }
        try:
            with serving(
                root / "data", free_port(), extra=settings, command=DREAMSERVE_SERVE
            ) as server:
                yield server
        finally:
            site.forget()


def python_path() -> list[str]:
    """This process's PYTHONPATH, each entry absolute (the CLI runs in other directories)."""
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return [str(Path(entry).resolve()) for entry in entries if entry]


def command_environment(server: Server) -> dict[str, str]:
    """The environment a `dreamserve` client command runs in: the server and token in
    DREAMSERVE_URL and DREAMSERVE_TOKEN, nothing else of dreamserve's."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DREAMSERVE_")}
    env |= {"DREAMSERVE_URL": server.url, "DREAMSERVE_TOKEN": server.token or ""}
    env["PYTHONPATH"] = os.pathsep.join(python_path())
    env.pop("COLUMNS", None)  # rich's width where it is not a terminal: its default, 80
    return env


DREAMSERVE = (sys.executable, "-m", "dreamserve")  # the `dreamserve` command itself


def eventually(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what} (after {seconds:g} s)")
        time.sleep(0.05)
