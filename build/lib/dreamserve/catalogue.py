"""The model catalogue: models, their resolution tiers and ratios, and the pixel size of each.

Pure: plain dataclasses built from data (`catalogue.toml` ships the contract's table; operators may
add rows). Nothing here knows about HTTP, SQL or engines.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

AUTO = "auto"
LOCAL_REGION = "LOCAL"  # the region of accounts on this server's own engines


class CatalogueError(ValueError):
    """The catalogue data is malformed; the message names the row and field."""


@dataclass(frozen=True)
class Model:
    """One catalogue row.

    `prompt_required` False means a prompt may be left out when at least one reference is given.
    `sizes` maps a resolution tier to `{ratio: (width, height)}`, ratios in catalogue order.
    """

    name: str
    resolutions: tuple[str, ...]
    default_resolution: str
    max_refs: int
    prompt_required: bool
    auto_ratio: bool
    sizes: Mapping[str, Mapping[str, tuple[int, int]]]
    forecast_cost: float = 0
    # False for a model of the operator's configuration file (a built-in name it replaces
    # included): the built-in placeholder engine leaves those to the operator's accounts.
    builtin: bool = True
    # The account regions the hosted API offers the model to; None: every region. An account of
    # region LOCAL (one of this server's own engines) may serve any model.
    regions: tuple[str, ...] | None = None

    def offered_in(self, region: str) -> bool:
        """Whether an account of `region` may serve this model."""
        return self.regions is None or region == LOCAL_REGION or region in self.regions

    def ratios(self, resolution: str) -> tuple[str, ...]:
        """The ratios valid at `resolution`, with `auto` first where the model supports it."""
        fixed = tuple(self.sizes[resolution])
        return (AUTO, *fixed) if self.auto_ratio else fixed

    @property
    def default_ratio(self) -> str:
        return AUTO if self.auto_ratio else next(iter(self.sizes[self.default_resolution]))

    def size(self, resolution: str, ratio: str) -> tuple[int, int]:
        """Pixel size (width, height) of a fixed ratio at a tier."""
        return self.sizes[resolution][ratio]

    def nearest_ratio(self, resolution: str, aspect: float) -> str:
        """The fixed ratio at `resolution` whose aspect (width / height) is nearest `aspect`."""

        def distance(ratio: str) -> float:
            width, height = self.sizes[resolution][ratio]
            return abs(math.log(width / height) - math.log(aspect))

        return min(self.sizes[resolution], key=distance)

    def describe(self) -> dict[str, Any]:
        """The row as GET /models shows it."""
        return {
            "model": self.name,
            "resolutions": list(self.resolutions),
            "defaultResolution": self.default_resolution,
            "maxRefs": self.max_refs,
            "promptRequired": self.prompt_required,
            "autoRatio": self.auto_ratio,
            "forecastCost": self.forecast_cost,
            "regions": list(self.regions) if self.regions is not None else None,
            "sizes": {
                tier: {ratio: f"{w}x{h}" for ratio, (w, h) in ratios.items()}
                for tier, ratios in self.sizes.items()
            },
        }


UPSCALE_TIERS = ("2k", "4k", "8k")


@dataclass(frozen=True)
class Catalogue:
    models: tuple[Model, ...]
    default_model: str
    # Upscale targets: tier -> {ratio: (width, height)}; 8k is twice 4k on each side.
    upscale_sizes: Mapping[str, Mapping[str, tuple[int, int]]] = field(default_factory=dict)
    _by_name: dict[str, Model] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {model.name: model for model in self.models}
        if len(by_name) != len(self.models):
            raise CatalogueError("model names must be unique")
        if self.default_model not in by_name:
            raise CatalogueError(f"default_model {self.default_model!r} is not in the catalogue")
        object.__setattr__(self, "_by_name", by_name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(model.name for model in self.models)

    def get(self, name: str) -> Model | None:
        return self._by_name.get(name)

    def __getitem__(self, name: str) -> Model:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def upscale_size(self, tier: str, aspect: float) -> tuple[int, int]:
        """The upscale target at `tier` for the ratio nearest `aspect` (width / height)."""
        sizes = self.upscale_sizes[tier]

        def distance(ratio: str) -> float:
            width, height = sizes[ratio]
            return abs(math.log(width / height) - math.log(aspect))

        return sizes[min(sizes, key=distance)]


def default_catalogue() -> Catalogue:
    """The catalogue of the contract (`catalogue.toml` in this package)."""
    return parse_catalogue(builtin_catalogue_data())


def builtin_catalogue_data() -> dict[str, Any]:
    """`catalogue.toml` of this package, as TOML data (config.py adds the operator's rows)."""
    text = resources.files("dreamserve").joinpath("catalogue.toml").read_text("utf-8")
    return tomllib.loads(text)


def parse_catalogue(data: Mapping[str, Any], operator: Set[str] = frozenset()) -> Catalogue:
    """Build a Catalogue from its TOML form; raise CatalogueError naming what is wrong. The
    models named in `operator` are the operator's (`Model.builtin` False)."""
    order = list(data.get("ratios", []))
    tables = {
        name: _parse_size_table(f"sizes.{name}", table, order)
        for name, table in dict(data.get("sizes", {})).items()
    }
    models = tuple(
        _parse_model(row, tables, builtin=str(row.get("name", "")) not in operator)
        for row in data.get("models", [])
    )
    return Catalogue(
        models=models,
        default_model=str(data.get("default_model", "")),
        upscale_sizes=_upscale_sizes(data.get("upscale_sizes"), tables),
    )


def _upscale_sizes(
    name: Any, tables: Mapping[str, Mapping[str, Mapping[str, tuple[int, int]]]]
) -> dict[str, dict[str, tuple[int, int]]]:
    """2k and 4k from the named size table, 8k twice 4k; empty when no table is named."""
    if name is None:
        return {}
    table = tables.get(str(name))
    if table is None or "2k" not in table or "4k" not in table:
        raise CatalogueError(f"upscale_sizes: {name!r} must name a size table with 2k and 4k")
    eight = {ratio: (2 * w, 2 * h) for ratio, (w, h) in table["4k"].items()}
    return {"2k": dict(table["2k"]), "4k": dict(table["4k"]), "8k": eight}


def _parse_size_table(
    where: str, table: Mapping[str, Mapping[str, str]], order: list[str]
) -> dict[str, dict[str, tuple[int, int]]]:
    parsed: dict[str, dict[str, tuple[int, int]]] = {}
    for tier, ratios in table.items():
        unordered = {
            ratio: _parse_size(f"{where}.{tier}.{ratio}", v) for ratio, v in ratios.items()
        }
        ranked = sorted(unordered, key=lambda r: order.index(r) if r in order else len(order))
        parsed[tier] = {ratio: unordered[ratio] for ratio in ranked}
    return parsed


def _parse_size(where: str, value: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in str(value).lower().split("x"))
    except ValueError:
        raise CatalogueError(f"{where}: {value!r} is not WIDTHxHEIGHT") from None
    if width < 1 or height < 1:
        raise CatalogueError(f"{where}: {value!r} must be positive")
    return width, height


def _parse_model(row: Mapping[str, Any], tables: Mapping[str, Any], *, builtin: bool) -> Model:
    name = str(row.get("name", ""))
    if not name:
        raise CatalogueError("every model needs a name")
    resolutions = tuple(str(tier) for tier in _required(row, name, "resolutions"))
    sizes_name = str(_required(row, name, "sizes"))
    if sizes_name not in tables:
        raise CatalogueError(f"model {name}: unknown size table {sizes_name!r}")
    table = tables[sizes_name]
    missing = [tier for tier in resolutions if tier not in table]
    if not resolutions or missing:
        raise CatalogueError(f"model {name}: size table {sizes_name!r} lacks tiers {missing}")
    default_resolution = str(row.get("default_resolution", resolutions[0]))
    if default_resolution not in resolutions:
        raise CatalogueError(f"model {name}: default_resolution must be one of {resolutions}")
    return Model(
        name=name,
        resolutions=resolutions,
        default_resolution=default_resolution,
        max_refs=int(row.get("max_refs", 0)),
        prompt_required=bool(row.get("prompt_required", True)),
        auto_ratio=bool(row.get("auto_ratio", False)),
        sizes={tier: table[tier] for tier in resolutions},
        forecast_cost=_number(row.get("forecast_cost", 0)),
        builtin=builtin,
        regions=_regions(name, row.get("regions")),
    )


def _regions(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(region, str) and region for region in value)
    ):
        raise CatalogueError(f"model {name}: regions must be a list of account regions")
    return tuple(value)


def _number(value: Any) -> float:
    """Keep integers as integers so `forecastCost: 0` stays `0` in JSON."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CatalogueError(f"forecast_cost must be a number, not {value!r}")
    return value


def _required(row: Mapping[str, Any], name: str, key: str) -> Any:
    if key not in row:
        raise CatalogueError(f"model {name}: {key} is required")
    return row[key]
