"""compose.yaml read for the tests: the dreamserve processes a deployment starts (its services
whose command is `dreamserve ...`), each with its command and its DREAMSERVE_* and AWS_*
variables, and the same processes on this machine: only hosts, ports, paths, the bucket and the
credentials replaced by the test's own (its PostgreSQL database, its moto store, its folders).

So the multi-process test (tests/faults/test_scaleout.py) starts what the compose file starts,
and a change to the compose file changes the test."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
PREFIXES = ("DREAMSERVE_", "AWS_")
# What names a place or a secret of the deployment: the test's processes have their own.
REPLACED = {
    "DREAMSERVE_DATABASE_URL",
    "DREAMSERVE_HOST",
    "DREAMSERVE_PORT",
    "DREAMSERVE_PUBLIC_URL",
    "DREAMSERVE_DATA_DIR",
    "DREAMSERVE_BLOB_URL",  # its bucket only
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
_INTERPOLATED = re.compile(r"\$\{[^}]*\}")


@dataclass(frozen=True)
class Service:
    name: str
    command: tuple[str, ...]  # ("dreamserve", "serve"), ("dreamserve", "worker", ...)
    environment: dict[str, str]  # its DREAMSERVE_* and AWS_* variables, as written
    mounts: dict[str, str]  # container path -> named volume (or host path)

    @property
    def role(self) -> str:
        return self.command[1]


@dataclass(frozen=True)
class Local:
    """What the test has in place of the deployment's hosts, paths and secrets."""

    database_url: str
    endpoint: str  # the S3 store's URL
    bucket: str
    access_key: str
    secret_key: str
    volumes: Path  # a named volume is the folder of its name here
    containers: Path  # a container's own disk: a folder per process here


def read_compose(path: Path = COMPOSE) -> dict[str, Any]:
    with open(path) as file:
        document: dict[str, Any] = yaml.safe_load(file)
    return document


def dreamserve_services(compose: Mapping[str, Any]) -> list[Service]:
    """The services that run `dreamserve`, in the file's order."""
    found = []
    for name, service in compose["services"].items():
        command = service.get("command")
        if not isinstance(command, list) or command[:1] != ["dreamserve"]:
            continue
        found.append(
            Service(
                name,
                tuple(str(part) for part in command),
                _environment(service.get("environment") or {}),
                _mounts(service.get("volumes") or []),
            )
        )
    return found


def _environment(raw: Mapping[str, Any] | list[str]) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in raw) if isinstance(raw, list) else dict(raw)
    return {
        key: "" if value is None else str(value)
        for key, value in pairs.items()
        if key.startswith(PREFIXES)
    }


def _mounts(volumes: list[Any]) -> dict[str, str]:
    mounts = {}
    for volume in volumes:
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts[target] = source
    return mounts


def local_environment(
    service: Service, local: Local, instance: str, port: int, public_url: str
) -> dict[str, str]:
    """The service's variables for one of its processes on this machine (`instance` names it:
    a container's own disk is its own folder). Only what names a place or a secret is replaced;
    every other value is the compose file's, and must be a value already (no `${...}` left)."""
    values = {
        "DREAMSERVE_DATABASE_URL": local.database_url,
        "DREAMSERVE_HOST": "127.0.0.1",
        "DREAMSERVE_PORT": str(port),
        "DREAMSERVE_PUBLIC_URL": public_url,
        "AWS_ENDPOINT_URL": local.endpoint,
        "AWS_ACCESS_KEY_ID": local.access_key,
        "AWS_SECRET_ACCESS_KEY": local.secret_key,
    }
    environment = {}
    for key, value in service.environment.items():
        if key in values:
            environment[key] = values[key]
        elif key == "DREAMSERVE_DATA_DIR":
            environment[key] = str(local_path(service, value, local, instance))
        elif key == "DREAMSERVE_BLOB_URL":
            parts = urlsplit(value)
            assert parts.scheme == "s3", f"{service.name}: {key}={value} is not an S3 store"
            environment[key] = f"s3://{local.bucket}{parts.path}"
        else:
            assert not _INTERPOLATED.search(value), f"{service.name}: {key}={value}"
            environment[key] = value
    return environment


def local_path(service: Service, path: str, local: Local, instance: str) -> Path:
    """Where a path of the service's container is on this machine: in the folder of the volume
    mounted over it (shared by every process that mounts that volume), else in the process's
    own folder (a container's disk is its own)."""
    inside = Path(path)
    for target, source in service.mounts.items():
        if inside == Path(target) or Path(target) in inside.parents:
            assert "/" not in source, f"{service.name}: {source} is a host path, not a volume"
            return local.volumes / source / inside.relative_to(target)
    return local.containers / instance / inside.relative_to(inside.anchor)
