"""Engines that other distributions install, found through the entry-point group
`dreamserve.engines` (name = engine name, value = "module:Factory").

Only the installed metadata is read here, once, when the registry is built: a plugin's module is
imported on first use, like a built-in engine's, so a broken plugin fails the accounts that choose
it (a 400 naming the engine) and never the server's start.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

log = logging.getLogger(__name__)

GROUP = "dreamserve.engines"
MAX_NAME = 64  # an account stores its engine's name in a VARCHAR(64)


@dataclass(frozen=True)
class Plugin:
    """An engine of another distribution, not imported yet."""

    name: str
    source: str  # "module:attribute", imported as the registry imports built-in engines
    distribution: str  # "name version", for the log


def discover(builtin: Collection[str]) -> list[Plugin]:
    """The plugin engines installed, by name.

    A plugin never replaces a built-in engine: an account naming a built-in gets what the
    documentation says, whatever else is installed. The built-in is kept and a warning names
    the plugin's distribution. A name two distributions install is nobody's (both are ignored,
    with a warning naming them): which one an account ran would depend on the order of files
    on disk."""
    found: dict[str, list[Plugin]] = {}
    for entry in entry_points(group=GROUP):
        plugin = Plugin(entry.name, entry.value, _distribution(entry))
        found.setdefault(plugin.name, []).append(plugin)
    kept = []
    for name, plugins in sorted(found.items()):
        named = ", ".join(plugin.distribution for plugin in plugins)
        if name in builtin:
            log.warning("engine %s of %s is ignored: a built-in engine has that name", name, named)
        elif len(plugins) > 1:
            log.warning("engine %s is ignored: %s each install one of that name", name, named)
        elif not name or len(name) > MAX_NAME:
            log.warning(
                "engine %r of %s is ignored: a name has 1 to %d characters", name, named, MAX_NAME
            )
        else:
            kept.append(plugins[0])
    return kept


def _distribution(entry: EntryPoint) -> str:
    dist = entry.dist
    return "an unknown distribution" if dist is None else f"{dist.name} {dist.version}"
