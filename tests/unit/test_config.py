"""The operator's configuration file: models added to the catalogue, accounts, and errors that
say where and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamserve.config import ConfigError, load_config

GPU = """
[sizes.sdxl.1k]
"1:1" = "1024x1024"
"16:9" = "1344x768"

[[models]]
name = "sdxl-turbo"
resolutions = ["1k"]
sizes = "sdxl"
max_refs = 1
prompt_required = true
auto_ratio = false
forecast_cost = 2

[[models]]
name = "nano-banana"
resolutions = ["1k"]
sizes = "nano-banana"
max_refs = 3
forecast_cost = 0.5

[[accounts]]
account = "LOCAL:gpu0"
engine = "procedural"
maxJobs = 2
models = ["sdxl-turbo"]

[[accounts]]
account = "US:team"
engine = "procedural"
user = 2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dreamserve.toml"
    path.write_text(text)
    return path


def test_models_are_added_and_built_in_ones_replaced(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GPU))
    turbo = config.catalogue["sdxl-turbo"]
    assert turbo.size("1k", "16:9") == (1344, 768)
    assert (turbo.max_refs, turbo.prompt_required, turbo.forecast_cost) == (1, True, 2)
    assert config.catalogue["nano-banana"].forecast_cost == 0.5
    assert "seedream-4.0" in config.catalogue  # the rest of the built-in catalogue stays
    assert config.catalogue.names.index("sdxl-turbo") == len(config.catalogue.names) - 1
    # The file's models (a built-in name it replaces too) are the operator's, not built in.
    assert not turbo.builtin
    assert not config.catalogue["nano-banana"].builtin
    assert config.catalogue["seedream-4.0"].builtin


def test_accounts_are_shared_unless_a_user_is_named(tmp_path: Path) -> None:
    gpu, team = load_config(write(tmp_path, GPU)).accounts
    assert gpu.user is None
    assert gpu.fields == {
        "account": "LOCAL:gpu0",
        "engine": "procedural",
        "maxJobs": 2,
        "models": ["sdxl-turbo"],
    }
    assert team.user == 2
    assert "user" not in team.fields


def test_no_file_is_the_built_in_catalogue(tmp_path: Path) -> None:
    config = load_config(None)
    assert config.accounts == ()
    assert "sdxl-turbo" not in config.catalogue


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models = [", "not valid TOML"),
        ("[things]\nx = 1", "unknown keys ['things']; valid: ['accounts', 'models', 'sizes']"),
        ('[sizes.standard.1k]\n"1:1" = "1x1"', "sizes.standard is built in"),
        ('[[models]]\nname = "m"\nresolutions = ["1k"]\nsizes = "nope"', "unknown size table"),
        ('[sizes.t.1k]\n"1:1" = "big"', "sizes.t.1k.1:1: 'big' is not WIDTHxHEIGHT"),
        ("[[models]]\nresolutions = []", "every model needs a name"),
        ('[[accounts]]\naccount = "LOCAL:x"\nuser = "two"', "accounts.user must be a user"),
        ("accounts = 3", "accounts must be an array of tables"),
    ],
)
def test_errors_name_the_file_and_the_fault(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    assert message in str(error.value)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "absent.toml")
