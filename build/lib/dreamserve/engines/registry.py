"""Engine names to implementations, imported lazily so optional dependencies stay optional: the
built-in ones and those other distributions install (`plugins.py`).

The registry also owns account settings on their way to an engine: it validates them against the
engine's `Settings` model when an account is saved, splits out the secrets (sealed before they
are stored) and opens them again when it builds the account's engine.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Protocol, cast

from pydantic import SecretStr, ValidationError

from dreamserve.engines.base import Engine, EngineContext, EngineFactory, EngineSettings
from dreamserve.engines.plugins import discover
from dreamserve.errors import (
    BadRequest,
    EngineBroken,
    EngineNotInstalled,
    EngineUnavailable,
    MissingParameter,
)
from dreamserve.sealing import SecretBox

log = logging.getLogger(__name__)

# An engine is named by "module:attribute" (imported on first use) or given as its factory.
EngineSource = str | EngineFactory

BUILTIN: Mapping[str, EngineSource] = {
    "procedural": "dreamserve.engines.procedural:ProceduralEngine",
    "diffusers": "dreamserve.engines.diffusers:DiffusersEngine",
    "ark": "dreamserve.engines.ark:ArkEngine",
    "gemini": "dreamserve.engines.gemini:GeminiEngine",
    "openai": "dreamserve.engines.openai:OpenAIEngine",
}

# What to install for an engine whose module needs an optional dependency.
EXTRAS: Mapping[str, str] = {"diffusers": "dreamserve[diffusers]"}


class EngineAccount(Protocol):
    """What the registry needs of a stored account (storage's `Account` has it)."""

    @property
    def id(self) -> int: ...
    @property
    def engine(self) -> str: ...
    @property
    def settings(self) -> Mapping[str, Any]: ...
    @property
    def sealed(self) -> str | None: ...
    @property
    def version(self) -> tuple[int, int]: ...
    @property
    def is_shared(self) -> bool: ...


class EngineRegistry:
    """Makes one engine per account and keeps it while the account's settings stay the same."""

    def __init__(
        self,
        context: EngineContext,
        box: SecretBox,
        engines: Mapping[str, EngineSource] = BUILTIN,
    ) -> None:
        self.context = context
        self.box = box
        self._paths = dict(engines)
        # Engines of other distributions (entry points), read once: names only, imported on
        # first use like the built-in ones.
        plugins = discover(self._paths)
        self._paths.update({plugin.name: plugin.source for plugin in plugins})
        self._origins = {plugin.name: plugin.distribution for plugin in plugins}  # for the log
        # account id -> ((created, updated), engine)
        self._instances: dict[int, tuple[tuple[int, int], Engine]] = {}
        self._retired: list[Engine] = []  # replaced or deleted, closed once unused
        self._uses: dict[int, int] = {}  # id(engine) -> jobs running on it (hold/release)
        self._lock = threading.Lock()  # database threads ask too (admission)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._paths)

    def factory(self, name: str) -> EngineFactory:
        source = self._paths.get(name)
        if source is None:  # an account saved when its engine was installed
            raise EngineNotInstalled(name)
        if not isinstance(source, str):
            return source
        module_name, _, attribute = source.partition(":")
        try:
            module = importlib.import_module(module_name)
            # "module:Class.attribute", as entry points may say
            return cast(EngineFactory, functools.reduce(getattr, attribute.split("."), module))
        except ImportError as error:
            origin = self._origins.get(name, "dreamserve")
            log.warning("engine %s of %s cannot be imported: %s", name, origin, error)
            raise EngineUnavailable(name, error.name or str(error), EXTRAS.get(name)) from error
        except Exception as error:  # installed but broken (torch's CUDA libraries, say)
            origin = self._origins.get(name, "dreamserve")
            log.exception("engine %s of %s cannot be imported", name, origin)
            raise EngineBroken(name, type(error).__name__) from error

    def operator_only(self, name: str) -> bool:
        """Whether only the operator's shared accounts may use engine `name`: its factory says
        `operator_only = True` (it runs on the server's own hardware and files). A plugin's
        engine is unless its factory says `operator_only = False`: the server cannot know what
        another distribution's code reads or takes."""
        return bool(getattr(self.factory(name), "operator_only", name in self._origins))

    def settings_model(self, name: str) -> type[EngineSettings]:
        model = getattr(self.factory(name), "Settings", EngineSettings)
        return cast(type[EngineSettings], model)

    def check_settings(
        self, name: str, settings: Mapping[str, Any]
    ) -> tuple[dict[str, Any], str | None]:
        """An account's settings for engine `name`, validated: the plain ones as given, and the
        secret ones sealed (None when there are none). BadRequest names the first bad key."""
        model = self.settings_model(name)
        try:
            parsed = model.model_validate(dict(settings))
        except ValidationError as error:
            raise _settings_error(name, model, error) from None
        values = parsed.model_dump(by_alias=True, exclude_unset=True)
        as_json = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
        secrets = {
            key: value.get_secret_value()
            for key, value in values.items()
            if isinstance(value, SecretStr)
        }
        plain = {key: value for key, value in as_json.items() if key not in secrets}
        return plain, self.box.seal(secrets)

    def engine(
        self,
        name: str,
        settings: Mapping[str, Any],
        *,
        sealed: str | None = None,
        account_id: int,
        version: tuple[int, int],
        shared: bool = False,
    ) -> Engine:
        """The engine of an account, given its plain settings and its sealed secrets.

        `version` is the account's (creation, update) time. Another creation time is another
        account (ids can be reused after a delete): a new engine. Within one account a newer
        update builds a new engine, an older one (a caller holding a stale copy of the account)
        gets the current engine rather than churning it.

        A `shared` account is the operator's: its engine may connect to private addresses (a
        model server on the same host or network). A user's own account may only where the
        server allows it, so that a user cannot point an engine at the server's neighbours."""
        with self._lock:
            current = self._instances.get(account_id)
            if current is not None:
                (created, updated), engine = current
                if created == version[0] and updated >= version[1]:
                    return engine
                self._retired.append(engine)  # closed once no job runs on it (release)
            merged = {**settings, **self.box.open(sealed)}
            context = replace(self.context, allow_private=True) if shared else self.context
            engine = self.factory(name)(merged, context)
            self._instances[account_id] = (version, engine)
            return engine

    def for_account(self, account: EngineAccount) -> Engine:
        """`engine` for a stored account."""
        return self.engine(
            account.engine,
            account.settings,
            sealed=account.sealed,
            account_id=account.id,
            version=account.version,
            shared=account.is_shared,
        )

    def hold(self, engine: Engine) -> Engine:
        """`engine`, for one job, which must `release` it when it ends: an engine retired
        meanwhile (its account saved with new settings, or deleted) stays open until its last
        job is over, then is closed (a GPU model is not kept twice)."""
        with self._lock:
            self._uses[id(engine)] = self._uses.get(id(engine), 0) + 1
        return engine

    async def release(self, engine: Engine) -> None:
        """A job held `engine` and is over; close the retired engines no job runs on."""
        with self._lock:
            left = self._uses.pop(id(engine)) - 1
            if left:
                self._uses[id(engine)] = left
            idle = [old for old in self._retired if id(old) not in self._uses]
            self._retired = [old for old in self._retired if id(old) in self._uses]
        for old in idle:
            try:
                await old.close()
            except Exception:
                log.exception("closing a retired engine failed")

    def retire(self, account_id: int) -> None:
        """The account is gone: its engine is built no more (closed when no job runs on it:
        at the next release, or at shutdown)."""
        with self._lock:
            current = self._instances.pop(account_id, None)
            if current is not None:
                self._retired.append(current[1])

    def probe(self, name: str, settings: Mapping[str, Any], sealed: str | None) -> Engine:
        """A fresh engine for settings not stored yet (to ask what it serves); the caller
        closes it. Engines are cheap to build: they load models on first use."""
        return self.factory(name)({**settings, **self.box.open(sealed)}, self.context)

    async def close(self) -> None:
        engines = [engine for _, engine in self._instances.values()] + self._retired
        self._instances, self._retired = {}, []
        for engine in engines:
            await engine.close()


def _settings_error(name: str, model: type[EngineSettings], error: ValidationError) -> BadRequest:
    """The first problem, naming the key and what is valid; never the value (it may be a
    secret)."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in ("settings", *first["loc"]))
    if first["type"] == "missing":
        return MissingParameter(key)
    if first["type"] == "extra_forbidden":
        known = [field.alias or field_name for field_name, field in model.model_fields.items()]
        takes = ", ".join(known) if known else "no settings"
        return BadRequest(f"Parameter {key} not allowed: engine {name} takes {takes}")
    if first["type"] in ("model_type", "model_attributes_type"):
        return BadRequest("Parameter settings must be an object")
    return BadRequest(f"Parameter {key} is invalid: {first['msg']}")
