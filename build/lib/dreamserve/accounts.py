"""Accounts as the API and the CLI see them: the POST /accounts body checked, and the summary.

Checks that need an engine (its settings, the models it serves) go through the engine registry;
the rest is plain validation with the contract's messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dreamserve.catalogue import Catalogue
from dreamserve.engines.base import Engine
from dreamserve.engines.registry import EngineRegistry
from dreamserve.errors import BadRequest, InvalidParameter
from dreamserve.fields import given, integer, text
from dreamserve.ids import is_account_id, is_region, iso_millis
from dreamserve.replies import AccountSummary
from dreamserve.storage.account_queries import Account

DEFAULT_REGION = "US"
DEFAULT_MAX_JOBS = 10
MAX_JOBS = 50
MAX_PRIORITY = 1000  # priorities are -1000 to 1000
ACCOUNT_ID = "an account id REGION:name (letters, digits or _ before the colon; no spaces or /)"


@dataclass(frozen=True)
class AccountSpec:
    """A checked POST /accounts body: what the account row will hold."""

    name: str
    email: str
    region: str
    engine: str
    max_jobs: int
    priority: int
    models: tuple[str, ...] | None
    settings: Mapping[str, Any]
    sealed: str | None  # the secret settings, sealed


def parse_account(
    fields: Mapping[str, Any], catalogue: Catalogue, engines: EngineRegistry
) -> AccountSpec:
    """Check a POST /accounts body (`account` or `region`+`email`, `engine`, `maxJobs`,
    `models`, `settings`); BadRequest with the contract's message on the first problem."""
    name, region, email = _identity(fields)
    engine = _engine(fields, engines)
    max_jobs = integer(fields, "maxJobs", 1, MAX_JOBS)
    priority = integer(fields, "priority", -MAX_PRIORITY, MAX_PRIORITY)
    raw_settings = fields.get("settings")
    if raw_settings is None:
        raw_settings = {}
    if not isinstance(raw_settings, dict):
        raise BadRequest("Parameter settings must be an object")
    settings, sealed = engines.check_settings(engine, raw_settings)
    return AccountSpec(
        name=name,
        email=email,
        region=region,
        engine=engine,
        max_jobs=DEFAULT_MAX_JOBS if max_jobs is None else max_jobs,
        priority=priority or 0,
        models=_models(fields, catalogue),
        settings=settings,
        sealed=sealed,
    )


def _identity(fields: Mapping[str, Any]) -> tuple[str, str, str]:
    """(account id, region, email): the id given, or made as `<region>:<email>`."""
    email = text(fields, "email", 200)
    region = text(fields, "region", 32)
    if region is not None and not is_region(region):
        raise InvalidParameter("region", region, "letters, digits or _ (at most 32)")
    name = given(fields, "account")
    if name is None:
        if email is None:
            raise BadRequest("Parameter account or email is required")
        name = f"{region or DEFAULT_REGION}:{email}"
        if not is_account_id(name):
            raise InvalidParameter("email", email, "an email or name without spaces or /")
        return name, region or DEFAULT_REGION, email
    if not isinstance(name, str) or not is_account_id(name):
        raise InvalidParameter("account", name, ACCOUNT_ID)
    prefix, _, rest = name.partition(":")
    if region is not None and region != prefix:
        raise InvalidParameter("region", region, f"{prefix}, the region of account {name}")
    return name, prefix, email or rest


def _engine(fields: Mapping[str, Any], engines: EngineRegistry) -> str:
    names = ", ".join(engines.names)
    value = given(fields, "engine")
    if value is None:
        # Also what a body in the hosted API's login shape (email + password) gets.
        raise BadRequest(f"Parameter engine is required, valid values: {names}")
    if value not in engines.names:
        raise InvalidParameter("engine", value, names)
    return str(value)


def _models(fields: Mapping[str, Any], catalogue: Catalogue) -> tuple[str, ...] | None:
    value = given(fields, "models")
    if value is None:
        return None
    valid = ", ".join(catalogue.names)
    if isinstance(value, str):  # "a, b" from a form or the CLI
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not value:
        raise InvalidParameter("models", value, f"a list of catalogue models: {valid}")
    for model in value:
        if not isinstance(model, str) or model not in catalogue:
            raise InvalidParameter("models", model, valid)
    return tuple(dict.fromkeys(value))


def models_served(
    engine: Engine, listed: Sequence[str] | None, catalogue: Catalogue, region: str
) -> list[str]:
    """The catalogue models an account serves: its own list, else all its engine can, of
    those offered in its region."""
    if listed is not None:
        models = [catalogue[name] for name in listed if name in catalogue]
    else:
        models = [model for model in catalogue.models if engine.serves(model)]
    return [model.name for model in models if model.offered_in(region)]


def check_models(spec: AccountSpec, engine: Engine, catalogue: Catalogue) -> None:
    """Every model the account lists must be offered in its region and be one its engine
    can run."""
    if spec.models is None:
        return
    for name in spec.models:
        model = catalogue[name]
        if not model.offered_in(spec.region):
            assert model.regions is not None
            offered = ", ".join(model.regions)
            raise BadRequest(
                f"Parameter models ({name}) is offered to region {offered} accounts only, "
                f"not to region {spec.region}"
            )
    can_run = getattr(engine, "can_run", engine.serves)
    for name in spec.models:
        if not can_run(catalogue[name]):
            valid = ", ".join(model.name for model in catalogue.models if can_run(model))
            served = f"{valid or 'none'} (what engine {spec.engine} serves)"
            raise InvalidParameter("models", name, served)


def summary(
    account: Account,
    models: Sequence[str],
    now: int,
    outcomes: Mapping[str, int] | None = None,
) -> AccountSummary:
    """An account as GET /accounts shows it at `now` (epoch ms), with its jobs that ended in
    the last hour (`outcomes`): never its secrets."""
    body: AccountSummary = {
        "account": account.name,
        "email": account.email,
        "region": account.region,
        "maxJobs": account.max_jobs,
        "priority": account.priority,
        "engine": account.engine,
        "models": {"image": list(models)},
        "settings": dict(account.settings),
        "shared": account.is_shared,
        "running": account.running,
        "lastHour": {
            "completed": (outcomes or {}).get("completed", 0),
            "failed": (outcomes or {}).get("failed", 0),
        },
    }
    if account.error is not None:
        body["error"] = account.error
    if account.cooldown_until is not None and account.cooling(now):
        body["cooldownUntil"] = iso_millis(account.cooldown_until)
    if account.last_error is not None and account.last_error_at is not None:
        body["lastError"] = account.last_error
        body["lastErrorAt"] = iso_millis(account.last_error_at)
    return body
