"""The deployment examples against the settings: every DREAMSERVE_* variable that compose.yaml and
docs/deploy/ set is a setting, with a value the setting takes (a renamed or retyped setting
fails here, not at an operator's start), and the dreamserve processes of the compose file share
their keys and their stores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from composefile import (
    REPLACED,
    ROOT,
    Local,
    Service,
    dreamserve_services,
    local_environment,
    read_compose,
)
from pydantic import ValidationError

from dreamserve.settings import Settings

INTERPOLATED = re.compile(r"\$\{[^}]*\}")
ENV_EXAMPLE = ROOT / "docs" / "deploy" / "dreamserve.env"
UNITS = sorted((ROOT / "docs" / "deploy").glob("*.service"))


def _unknown_and_invalid(variables: dict[str, str]) -> tuple[list[str], list[str]]:
    """The DREAMSERVE_* names that are no setting, and those whose value the setting refuses
    (values still to be interpolated are not judged)."""
    unknown, invalid = [], []
    for name, value in variables.items():
        if not name.startswith("DREAMSERVE_"):
            continue
        field = name.removeprefix("DREAMSERVE_").lower()
        if field not in Settings.model_fields:
            unknown.append(name)
        elif not INTERPOLATED.search(value):
            try:
                Settings(**{field: value})
            except ValidationError:
                invalid.append(f"{name}={value}")
    return unknown, invalid


def _services() -> list[Service]:
    return dreamserve_services(read_compose())


def test_compose_runs_two_api_processes_and_a_worker() -> None:
    commands = sorted(service.command for service in _services())
    assert commands == [("dreamserve", "serve"), ("dreamserve", "serve"), ("dreamserve", "worker")]


@pytest.mark.parametrize("service", _services(), ids=lambda service: service.name)
def test_compose_sets_only_settings_that_exist(service: Service) -> None:
    assert _unknown_and_invalid(service.environment) == ([], [])


def test_the_check_finds_a_renamed_setting() -> None:
    variables = {"DREAMSERVE_RUN_JOB": "false", "DREAMSERVE_BLOB_LINKS": "presign"}
    assert _unknown_and_invalid(variables) == (
        ["DREAMSERVE_RUN_JOB"],
        ["DREAMSERVE_BLOB_LINKS=presign"],
    )


def test_compose_processes_share_the_database_the_store_and_the_keys() -> None:
    """Every process on the same database and blob store, with the same S3 variables, and the
    same volume at its data dir (the link-signing and sealing keys live there)."""
    services = _services()
    shared = [
        "DREAMSERVE_DATABASE_URL",
        "DREAMSERVE_BLOB_URL",
        "DREAMSERVE_DATA_DIR",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]
    for name in shared:
        assert len({service.environment.get(name) for service in services}) == 1, name
    assert services[0].environment["DREAMSERVE_BLOB_URL"].startswith("s3://")
    volumes = {
        service.mounts.get(service.environment["DREAMSERVE_DATA_DIR"]) for service in services
    }
    assert None not in volumes, "a data dir on a container's own disk: its keys its own"
    assert len(volumes) == 1, volumes


def test_the_api_processes_run_no_jobs() -> None:
    for service in _services():
        if service.role == "serve":
            assert service.environment["DREAMSERVE_RUN_JOBS"] == "false", service.name


def test_the_multi_process_test_changes_only_places_and_secrets(tmp_path: Path) -> None:
    """tests/faults/test_scaleout.py runs each service with its variables: the same names,
    the same values but for places and secrets; the data dirs in the folder of their volume."""
    local = Local(
        "postgresql://postgres@127.0.0.1:5432/test",
        "http://127.0.0.1:5000",
        "test-bucket",
        "testing",
        "testing",
        tmp_path / "volumes",
        tmp_path / "containers",
    )
    for service in _services():
        ours = local_environment(service, local, service.name, 8123, "http://127.0.0.1:8123")
        assert ours.keys() == service.environment.keys()
        changed = {name for name, value in ours.items() if value != service.environment[name]}
        assert changed <= REPLACED, service.name
        assert "${" not in str(ours)
        assert ours["DREAMSERVE_BLOB_URL"].startswith("s3://test-bucket/")
        data_dir = Path(ours["DREAMSERVE_DATA_DIR"])
        assert data_dir.parent == local.volumes, data_dir


def _env_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    pairs = [line.split("=", 1) for line in lines if line and not line.startswith("#")]
    return {name: value for name, value in pairs}


def _unit_environment(path: Path) -> dict[str, str]:
    """A unit's Environment= assignments (the instance's %i taken as 8000)."""
    found = {}
    for line in path.read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            found[name] = value.replace("%i", "8000")
    return found


def test_the_systemd_examples_set_only_settings_that_exist() -> None:
    assert UNITS, "docs/deploy/ has the unit examples"
    assert _unknown_and_invalid(_env_file(ENV_EXAMPLE)) == ([], [])
    for unit in UNITS:
        assert _unknown_and_invalid(_unit_environment(unit)) == ([], []), unit.name
        assert "EnvironmentFile=/etc/dreamserve/dreamserve.env" in unit.read_text(), unit.name


DOCKERFILE = ROOT / "Dockerfile"


def _healthcheck_command() -> list[str]:
    """The exec form of the Dockerfile's HEALTHCHECK (its continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = re.findall(r"^HEALTHCHECK (.*)$", text, flags=re.MULTILINE)
    assert len(found) == 1, found
    options, cmd, exec_form = found[0].partition(" CMD ")
    assert cmd, found[0]
    assert "--timeout=5s" in options.split()
    command: list[str] = json.loads(exec_form)
    return command


class _Probed(BaseHTTPRequestHandler):
    status = 200
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_image_healthcheck_asks_healthz_on_the_port_it_serves(
    status: int, healthy: bool
) -> None:
    """The command as Docker runs it (the image's python, no curl), against a stand-in server on
    DREAMSERVE_PORT: healthy on a 200 from /healthz, not on another status."""
    command = _healthcheck_command()
    assert command[:2] == ["python", "-c"]
    handler = type("Handler", (_Probed,), {"status": status, "paths": []})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "DREAMSERVE_PORT": str(server.server_address[1])}
        ran = subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False
        )
    finally:
        server.shutdown()
        server.server_close()
    assert (ran.returncode == 0) is healthy, ran.stderr
    assert handler.paths == ["/healthz"]


def test_the_image_runs_as_a_user_with_a_data_volume() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    assert "USER dreamserve" in lines
    assert "VOLUME /var/lib/dreamserve" in lines
    assert "DREAMSERVE_DATA_DIR=/var/lib/dreamserve \\" in [line.strip() for line in lines]


def test_compose_checks_the_api_is_ready_and_not_the_worker() -> None:
    services = read_compose()["services"]
    for name in ("api-1", "api-2"):
        test = services[name]["healthcheck"]["test"]
        assert "http://127.0.0.1:8000/readyz" in test[-1]
    assert services["worker"]["healthcheck"] == {"disable": True}


def test_the_license_is_the_apache_2_0_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in pyproject.splitlines()
