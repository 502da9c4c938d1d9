"""The catalogue holds the contract's model table and pixel sizes exactly."""

from __future__ import annotations

import pytest

from dreamserve.catalogue import AUTO, CatalogueError, default_catalogue, parse_catalogue

CATALOGUE = default_catalogue()
RATIOS = ("1:1", "3:4", "16:9", "4:3", "9:16", "2:3", "3:2", "21:9")

# The contract's table: width x height per ratio, for tiers 1k, 2k and 4k.
STANDARD = {
    "1:1": ("1328x1328", "2048x2048", "4096x4096"),
    "4:3": ("1472x1104", "2304x1728", "4693x3520"),
    "3:4": ("1104x1472", "1728x2304", "3520x4693"),
    "16:9": ("1664x936", "2560x1440", "5404x3040"),
    "9:16": ("936x1664", "1440x2560", "3040x5404"),
    "3:2": ("1584x1056", "2496x1664", "4992x3328"),
    "2:3": ("1056x1584", "1664x2496", "3328x4992"),
    "21:9": ("2016x864", "3024x1296", "6197x2656"),
}
NANO = {
    "1:1": "1024x1024",
    "16:9": "1344x768",
    "9:16": "768x1344",
    "4:3": "1184x864",
    "3:4": "864x1184",
    "3:2": "1248x832",
    "2:3": "832x1248",
    "21:9": "1536x672",
}


def size(text: str) -> tuple[int, int]:
    width, height = text.split("x")
    return int(width), int(height)


# The hosted API's model list as its source gives it (docs/catalogue.md, U1: useapi.net's
# Postman collection, updated April 17, 2026): the order, the default and the CA-only models.
HOSTED_ORDER = (
    "seedream-5.0-lite",
    "seedream-4.7",
    "seedream-4.6",
    "seedream-4.5",
    "seedream-4.1",
    "seedream-4.0",
    "nano-banana",
    "seedream-3.0",
    "gpt-image-2",
)


def test_models_in_the_hosted_order_with_seedream_4_6_the_default() -> None:
    assert CATALOGUE.names == HOSTED_ORDER
    assert CATALOGUE.default_model == "seedream-4.6"


# Rows: the seed page's (contract.md) for the five older models; for the new ones what U1
# states (gpt-image-2: 1k, 3 references, ratios 1:1, 2:3, 3:2) and, where no source states a
# cell, the inferred values docs/catalogue.md marks as such (the Seedream 4.5 row).
@pytest.mark.parametrize(
    ("name", "resolutions", "default", "max_refs", "prompt_required", "auto_ratio"),
    [
        ("seedream-5.0-lite", ("2k", "4k"), "2k", 6, False, True),
        ("seedream-4.7", ("2k", "4k"), "2k", 6, False, True),
        ("seedream-4.6", ("2k", "4k"), "2k", 6, False, True),
        ("seedream-4.5", ("2k", "4k"), "2k", 6, False, True),
        ("seedream-4.1", ("2k", "4k"), "2k", 6, False, True),
        ("seedream-4.0", ("2k", "4k"), "2k", 6, False, True),
        ("nano-banana", ("1k",), "1k", 3, True, True),
        ("seedream-3.0", ("1k", "2k"), "1k", 1, True, False),
        ("gpt-image-2", ("1k",), "1k", 3, True, False),
    ],
)
def test_model_rows_match_the_sources(
    name: str,
    resolutions: tuple[str, ...],
    default: str,
    max_refs: int,
    prompt_required: bool,
    auto_ratio: bool,
) -> None:
    model = CATALOGUE[name]
    assert model.resolutions == resolutions
    assert model.default_resolution == default
    assert model.max_refs == max_refs
    assert model.prompt_required is prompt_required
    assert model.auto_ratio is auto_ratio
    assert model.forecast_cost == 0


@pytest.mark.parametrize("name", HOSTED_ORDER)
def test_only_seedream_4_7_and_gpt_image_2_are_limited_to_ca(name: str) -> None:
    model = CATALOGUE[name]
    limited = name in ("seedream-4.7", "gpt-image-2")
    assert model.regions == (("CA",) if limited else None)
    assert model.offered_in("CA")
    assert model.offered_in("LOCAL")  # this server's own engines serve every model
    assert model.offered_in("US") is not limited
    assert model.describe()["regions"] == (["CA"] if limited else None)


def test_gpt_image_2_takes_three_ratios_at_1k_without_auto() -> None:
    model = CATALOGUE["gpt-image-2"]
    assert model.ratios("1k") == ("1:1", "2:3", "3:2")
    assert model.default_ratio == "1:1"
    assert model.sizes["1k"] == {"1:1": (1024, 1024), "2:3": (1024, 1536), "3:2": (1536, 1024)}


@pytest.mark.parametrize("name", ["seedream-5.0-lite", "seedream-4.7", "seedream-4.6"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_new_seedream_models_use_the_standard_table(name: str, ratio: str) -> None:
    for column, tier in ((1, "2k"), (2, "4k")):
        assert CATALOGUE[name].size(tier, ratio) == size(STANDARD[ratio][column])


def test_regions_must_be_a_list_of_names() -> None:
    row = {"name": "x", "resolutions": ["1k"], "sizes": "s", "regions": "CA"}
    data = {"default_model": "x", "sizes": {"s": {"1k": {"1:1": "64x64"}}}, "models": [row]}
    with pytest.raises(CatalogueError, match="model x: regions must be a list of account regions"):
        parse_catalogue(data)


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize(("tier", "column"), [("1k", 0), ("2k", 1), ("4k", 2)])
def test_standard_pixel_sizes(ratio: str, tier: str, column: int) -> None:
    model = CATALOGUE["seedream-3.0"] if tier == "1k" else CATALOGUE["seedream-4.0"]
    assert model.size(tier, ratio) == size(STANDARD[ratio][column])


@pytest.mark.parametrize("ratio", RATIOS)
def test_nano_banana_pixel_sizes(ratio: str) -> None:
    assert CATALOGUE["nano-banana"].size("1k", ratio) == size(NANO[ratio])


def test_the_two_sizes_the_contract_calls_out() -> None:
    assert CATALOGUE["seedream-4.0"].size("2k", "16:9") == (2560, 1440)
    assert CATALOGUE["seedream-4.5"].size("4k", "21:9") == (6197, 2656)


def test_ratios_are_listed_in_contract_order_with_auto_first_where_supported() -> None:
    assert CATALOGUE["seedream-4.0"].ratios("2k") == (AUTO, *RATIOS)
    assert CATALOGUE["seedream-3.0"].ratios("1k") == RATIOS
    assert CATALOGUE["seedream-4.0"].default_ratio == AUTO
    assert CATALOGUE["seedream-3.0"].default_ratio == "1:1"


@pytest.mark.parametrize(
    ("aspect", "expected"),
    [
        (1.0, "1:1"),
        (685 / 900, "3:4"),
        (16 / 9, "16:9"),
        (2.5, "21:9"),
        (0.5, "9:16"),
        (1.45, "3:2"),
    ],
)
def test_nearest_ratio_to_an_aspect(aspect: float, expected: str) -> None:
    assert CATALOGUE["seedream-4.0"].nearest_ratio("2k", aspect) == expected


def test_operators_can_add_a_model_row() -> None:
    catalogue = parse_catalogue(
        {
            "default_model": "tiny",
            "ratios": ["1:1", "16:9"],
            "sizes": {"small": {"1k": {"16:9": "64x36", "1:1": "64x64"}}},
            "models": [{"name": "tiny", "resolutions": ["1k"], "sizes": "small", "max_refs": 2}],
        }
    )
    tiny = catalogue["tiny"]
    assert tiny.ratios("1k") == ("1:1", "16:9")
    assert tiny.size("1k", "16:9") == (64, 36)
    assert tiny.prompt_required is True
    assert tiny.describe()["sizes"] == {"1k": {"1:1": "64x64", "16:9": "64x36"}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"default_model": "x", "models": [{"name": "x", "sizes": "s"}]},
            "resolutions is required",
        ),
        (
            {"default_model": "x", "models": [{"name": "x", "resolutions": ["1k"], "sizes": "s"}]},
            "unknown size table 's'",
        ),
        (
            {
                "default_model": "x",
                "sizes": {"s": {"1k": {"1:1": "ten"}}},
                "models": [{"name": "x", "resolutions": ["1k"], "sizes": "s"}],
            },
            "is not WIDTHxHEIGHT",
        ),
        ({"default_model": "nope", "models": []}, "default_model 'nope' is not in the catalogue"),
    ],
)
def test_malformed_catalogue_data_is_refused_with_a_message(data: dict, message: str) -> None:
    with pytest.raises(CatalogueError, match=message):
        parse_catalogue(data)
