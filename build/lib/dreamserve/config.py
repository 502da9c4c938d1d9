"""The operator's configuration file (`DREAMSERVE_CONFIG`, TOML): catalogue models of their own
and accounts, applied at every start.

    [sizes.sdxl.1k]              # a size table: tier -> ratio -> WIDTHxHEIGHT
    "1:1" = "1024x1024"

    [[models]]                   # as in catalogue.toml; a built-in name replaces that model
    name = "sdxl-turbo"
    resolutions = ["1k"]
    sizes = "sdxl"
    max_refs = 1

    [[accounts]]                 # the body of POST /accounts; shared unless `user` is given
    account = "LOCAL:gpu0"
    engine = "procedural"
    maxJobs = 2
    models = ["sdxl-turbo"]

Accounts are saved (upserted) on every start, so the file stays the truth for them: a change
made through the API to a user's configured account lasts until the next start.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamserve.catalogue import (
    Catalogue,
    CatalogueError,
    builtin_catalogue_data,
    parse_catalogue,
)

_KEYS = {"sizes", "models", "accounts"}


class ConfigError(ValueError):
    """The operator's configuration (this file, or a setting such as the blob store URL) cannot
    be used, or a place it names (the data directory, the SQLite file) cannot; the message says
    where and why, and the CLI prints it as it is."""


@dataclass(frozen=True)
class ConfiguredAccount:
    user: int | None  # None: shared by every user
    fields: Mapping[str, Any]  # as POST /accounts takes them


@dataclass(frozen=True)
class OperatorConfig:
    catalogue: Catalogue
    accounts: tuple[ConfiguredAccount, ...] = ()


def load_config(path: Path | None) -> OperatorConfig:
    """The built-in catalogue with the file's models, and the file's accounts (none without a
    file)."""
    base = builtin_catalogue_data()
    if path is None:
        return OperatorConfig(parse_catalogue(base))
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid: {sorted(_KEYS)}")
    try:
        mine = {str(row.get("name")) for row in data.get("models", []) if isinstance(row, Mapping)}
        catalogue = parse_catalogue(_merged(base, data), operator=mine)
    except CatalogueError as error:
        raise ConfigError(f"{path}: {error}") from None
    return OperatorConfig(catalogue, tuple(_account(path, row) for row in _rows(data)))


def _merged(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    sizes = dict(base.get("sizes", {}))
    for name, table in dict(extra.get("sizes", {})).items():
        if name in sizes:
            raise CatalogueError(f"sizes.{name} is built in: give your table another name")
        sizes[name] = table
    models = {row["name"]: row for row in base.get("models", [])}
    for row in extra.get("models", []):
        if not isinstance(row, Mapping) or not row.get("name"):
            raise CatalogueError("every model needs a name")
        models[str(row["name"])] = row  # a built-in name: the operator's row replaces it
    return {**base, "sizes": sizes, "models": list(models.values())}


def _rows(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows = data.get("accounts", [])
    if not isinstance(rows, list) or not all(isinstance(row, Mapping) for row in rows):
        raise ConfigError("accounts must be an array of tables ([[accounts]])")
    return rows


def _account(path: Path, row: Mapping[str, Any]) -> ConfiguredAccount:
    fields = dict(row)
    user = fields.pop("user", None)
    if user is not None and (isinstance(user, bool) or not isinstance(user, int) or user < 1):
        raise ConfigError(f"{path}: accounts.user must be a user number, not {user!r}")
    return ConfiguredAccount(user, fields)
