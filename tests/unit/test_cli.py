"""The CLI: tokens, accounts, migrations and the first-start banner; settings come from
DREAMSERVE_*."""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import logging
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from dreamserve import cli
from dreamserve.app import open_server
from dreamserve.cli import first_start_banner, main
from dreamserve.config import load_config
from dreamserve.engines.base import EngineContext, EngineSettings
from dreamserve.engines.registry import BUILTIN
from dreamserve.settings import Settings

ENGINES = "procedural, diffusers, ark, gemini, openai"  # the built-in engines, in order


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DREAMSERVE_DATA_DIR", str(tmp_path / "cli-data"))
    return tmp_path / "cli-data"


@pytest.fixture
def migrated(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A data dir whose database was made (`dreamserve migrate`), with no user yet."""
    assert main(["migrate"]) == 0
    capsys.readouterr()
    return data_dir


def tokens_create(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["tokens", "create", *args]) == 0
    return capsys.readouterr().out.strip()


def test_tokens_create_makes_a_new_user_each_time(migrated: Path, capsys) -> None:
    first = tokens_create(capsys)
    second = tokens_create(capsys)
    assert re.fullmatch(r"user:1-[A-Za-z0-9_-]{40,}", first)
    assert re.fullmatch(r"user:2-[A-Za-z0-9_-]{40,}", second)


def test_tokens_create_for_an_existing_user(migrated: Path, capsys) -> None:
    tokens_create(capsys)
    again = tokens_create(capsys, "--user", "1")
    assert again.startswith("user:1-")


def test_tokens_create_for_a_missing_user_fails(migrated: Path, capsys) -> None:
    assert main(["tokens", "create", "--user", "9"]) == 1
    assert capsys.readouterr().err.strip() == "dreamserve: User 9 not found"


def test_only_token_hashes_are_stored(migrated: Path, capsys) -> None:
    token = tokens_create(capsys)
    database = (migrated / "dreamserve.db").read_bytes()
    assert token.encode() not in database
    assert token.split("-", 1)[1].encode() not in database
    hashes = sqlite3.connect(migrated / "dreamserve.db").execute("SELECT token_hash FROM tokens")
    assert [len(row[0]) for row in hashes] == [64]


def test_migrate_creates_the_database_in_wal_mode(data_dir: Path, capsys) -> None:
    assert main(["migrate"]) == 0
    assert "is up to date" in capsys.readouterr().out
    connection = sqlite3.connect(data_dir / "dreamserve.db")
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert {"users", "tokens", "accounts", "jobs", "assets", "alembic_version"} <= tables
    assert main(["migrate"]) == 0  # idempotent


def test_the_secret_key_file_is_private(data_dir: Path) -> None:
    assert main(["migrate"]) == 0
    assert (data_dir / "secret.key").stat().st_mode & 0o777 == 0o600


def test_the_data_dir_and_the_database_are_the_owners_only(data_dir: Path) -> None:
    def modes() -> dict[str, int]:
        return {path.name: path.stat().st_mode & 0o777 for path in data_dir.iterdir()}

    async def first_start() -> dict[str, int]:
        async with open_server(Settings()) as server:
            await server.service.tokens.bootstrap()  # writes: the WAL and its index are there
            await server.db.lock_runner()
            return modes()

    files = asyncio.run(first_start())
    assert (data_dir.stat().st_mode & 0o777, files) == (
        0o700,
        {
            name: 0o600
            for name in (
                "dreamserve.db",
                "dreamserve.db-wal",
                "dreamserve.db-shm",
                "dreamserve.db.runner",
                "secret.key",
                "secrets.key",
            )
        },
    )


def test_a_data_dir_that_cannot_be_made_stops_the_start_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Under a file, as a directory without write permission would (tests run as root, whom
    permissions do not stop)."""
    (tmp_path / "file").write_text("")
    data_dir = tmp_path / "file" / "data"
    monkeypatch.setenv("DREAMSERVE_DATA_DIR", str(data_dir))
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == (
        f"dreamserve: data directory {data_dir}: cannot be used (Not a directory)\n"
    )


def test_a_database_that_cannot_be_opened_stops_the_start_in_one_line(
    data_dir: Path, capsys
) -> None:
    (data_dir / "dreamserve.db").mkdir(parents=True)  # what SQLite says of a read-only directory
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == (
        f"dreamserve: {data_dir / 'dreamserve.db'}: the SQLite database cannot be opened "
        "(unable to open database file)\n"
    )


def test_any_file_error_of_the_setup_is_one_line(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (data_dir.parent / "file").write_text("")
    database = data_dir.parent / "file" / "db" / "dreamserve.db"
    monkeypatch.setenv("DREAMSERVE_DATABASE_URL", f"sqlite:///{database}")
    assert main(["migrate"]) == 1
    assert capsys.readouterr().err == (
        f"dreamserve: [Errno 20] Not a directory: '{database.parent}'\n"
    )


def test_first_start_creates_user_1_and_the_procedural_account_once(data_dir: Path) -> None:
    settings = Settings()

    async def bootstrap_twice() -> tuple[str | None, str | None]:
        async with open_server(settings) as server:
            first = await server.service.tokens.bootstrap()
        async with open_server(settings) as server:
            return first, await server.service.tokens.bootstrap()

    first, second = asyncio.run(bootstrap_twice())
    assert first is not None
    assert first.startswith("user:1-")
    assert second is None
    rows = sqlite3.connect(data_dir / "dreamserve.db").execute(
        "SELECT name, owner, engine, max_jobs, models FROM accounts"
    )
    assert list(rows) == [("LOCAL:procedural", 0, "procedural", 10, None)]


def test_the_banner_has_the_token_and_a_ready_curl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMSERVE_PORT", "9123")
    banner = first_start_banner(Settings(), "user:1-" + "a" * 43)
    assert "API token for user 1 (shown only now; keep it): user:1-" + "a" * 43 in banner
    assert "curl -X POST http://127.0.0.1:9123/v1/dreamina/images" in banner
    assert '-H "Authorization: Bearer user:1-' + "a" * 43 + '"' in banner
    assert '"resolution": "2k"' in banner


def test_settings_come_from_dreamserve_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert (defaults.host, defaults.port, defaults.data_dir) == ("127.0.0.1", 8000, Path("data"))
    assert defaults.base_url == "http://127.0.0.1:8000"
    assert defaults.database == "sqlite:///data/dreamserve.db"
    monkeypatch.setenv("DREAMSERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("DREAMSERVE_PORT", "9000")
    monkeypatch.setenv("DREAMSERVE_DATA_DIR", "/srv/dream")
    assert Settings().base_url == "http://127.0.0.1:9000"
    assert Settings().database == "sqlite:////srv/dream/dreamserve.db"
    monkeypatch.setenv("DREAMSERVE_PUBLIC_URL", "https://images.example.com/")
    monkeypatch.setenv("DREAMSERVE_DATABASE_URL", "postgresql://u@db/dream")
    assert Settings().base_url == "https://images.example.com"
    assert Settings().database == "postgresql://u@db/dream"


def test_openapi_prints_the_document(capsys) -> None:
    assert main(["openapi"]) == 0
    assert '"/v1/dreamina/images"' in capsys.readouterr().out


# accounts add | list | remove: the service behind POST/GET/DELETE /accounts, from the shell


class Keyed:
    """An upstream-like engine: an API key (secret) and plain settings of several JSON types."""

    class Settings(EngineSettings):
        apiKey: SecretStr  # the API's spelling
        baseUrl: str = "https://upstream.example"
        label: str = ""
        steps: int = 4
        extra: dict[str, Any] | None = None

    def __init__(self, settings: Any, context: EngineContext) -> None:
        pass

    def serves(self, model: Any) -> bool:
        return True

    async def generate(self, request: Any, progress: Any, cancel: Any) -> list[Any]:
        return []

    async def close(self) -> None:
        pass


def accounts(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """The JSON `dreamserve accounts ...` prints (it must succeed)."""
    assert main(["accounts", *args]) == 0
    return json.loads(capsys.readouterr().out)


def accounts_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """What a failing `dreamserve accounts ...` says on stderr (it prints nothing else)."""
    assert main(["accounts", *args]) == 1
    output = capsys.readouterr()
    assert output.out == ""
    return output.err.strip()


@pytest.fixture
def started(migrated: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A data dir past its first start (user 1 and LOCAL:procedural), its banner read."""
    accounts(capsys, "list")
    return migrated


def test_the_first_accounts_command_on_a_migrated_database_makes_user_1_and_shows_its_token_once(
    migrated: Path, capsys
) -> None:
    assert main(["accounts", "list"]) == 0
    first = capsys.readouterr()
    assert list(json.loads(first.out)) == ["LOCAL:procedural"]  # stdout stays JSON
    token = re.search(r"API token for user 1 \(shown only now; keep it\): (user:1-\S+)", first.err)
    assert token is not None
    assert main(["accounts", "list"]) == 0
    assert capsys.readouterr().err == ""
    assert tokens_create(capsys).startswith("user:2-")  # user 1 is the bootstrap's


def test_accounts_add_prints_the_summary_and_list_shows_it(started: Path, capsys) -> None:
    expected = {
        "account": "LOCAL:gpu0",
        "email": "me@example.com",
        "region": "LOCAL",
        "maxJobs": 3,
        "priority": 2,
        "engine": "procedural",
        "models": {"image": ["seedream-4.0", "nano-banana"]},
        "settings": {},
        "shared": False,
        "running": 0,
        "lastHour": {"completed": 0, "failed": 0},
    }
    added = accounts(
        capsys,
        *("add", "LOCAL:gpu0", "--engine", "procedural", "--max-jobs", "3", "--priority", "2"),
        *("--models", "seedream-4.0,nano-banana", "--email", "me@example.com"),
    )
    assert added == expected
    listed = accounts(capsys, "list")
    assert list(listed) == ["LOCAL:procedural", "LOCAL:gpu0"]
    assert listed["LOCAL:gpu0"] == expected
    assert listed == accounts(capsys, "list", "--user", "1")  # user 1 is the default


def test_accounts_output_is_json_indented_by_2(started: Path, capsys) -> None:
    assert main(["accounts", "add", "LOCAL:gpu0", "--engine", "procedural"]) == 0
    out = capsys.readouterr().out
    assert out == json.dumps(json.loads(out), indent=2) + "\n"


def test_a_users_own_account_is_not_seen_by_another_user(started: Path, capsys) -> None:
    accounts(capsys, "add", "LOCAL:gpu0", "--engine", "procedural")
    assert tokens_create(capsys).startswith("user:2-")
    assert list(accounts(capsys, "list", "--user", "2")) == ["LOCAL:procedural"]
    assert list(accounts(capsys, "list", "--shared")) == ["LOCAL:procedural"]


def test_a_shared_account_is_marked_shared_and_every_user_sees_it(started: Path, capsys) -> None:
    added = accounts(capsys, "add", "LOCAL:gpu1", "--engine", "procedural", "--shared")
    assert added["shared"] is True
    assert tokens_create(capsys).startswith("user:2-")
    for whose in (["--user", "1"], ["--user", "2"], ["--shared"]):
        listed = accounts(capsys, "list", *whose)
        assert list(listed) == ["LOCAL:procedural", "LOCAL:gpu1"]
        assert listed["LOCAL:gpu1"] == added


def test_accounts_remove_prints_the_reply_and_list_no_longer_has_it(started: Path, capsys) -> None:
    accounts(capsys, "add", "LOCAL:gpu0", "--engine", "procedural")
    removed = accounts(capsys, "remove", "LOCAL:gpu0")
    assert removed == {"account": "LOCAL:gpu0", "deleted": True, "remaining": 1}
    assert list(accounts(capsys, "list")) == ["LOCAL:procedural"]


def test_the_operator_removes_a_shared_account_with_shared(started: Path, capsys) -> None:
    removed = accounts(capsys, "remove", "LOCAL:procedural", "--shared")
    assert removed == {"account": "LOCAL:procedural", "deleted": True, "remaining": 0}
    assert accounts(capsys, "list") == {}


def test_removing_a_shared_account_without_shared_fails(started: Path, capsys) -> None:
    assert accounts_error(capsys, "remove", "LOCAL:procedural") == (
        "dreamserve: Account LOCAL:procedural is shared and managed by the operator"
    )
    assert list(accounts(capsys, "list")) == ["LOCAL:procedural"]


def test_removing_a_missing_account_fails(started: Path, capsys) -> None:
    assert accounts_error(capsys, "remove", "LOCAL:nope") == (
        "dreamserve: Unable to find configuration for account LOCAL:nope"
    )


def test_an_unknown_engine_fails_naming_the_valid_ones(started: Path, capsys) -> None:
    assert accounts_error(capsys, "add", "LOCAL:gpu0", "--engine", "nope") == (
        f"dreamserve: Parameter engine (nope) valid values: {ENGINES}"
    )
    assert accounts_error(capsys, "add", "LOCAL:gpu0") == (
        f"dreamserve: Parameter engine is required, valid values: {ENGINES}"
    )
    assert list(accounts(capsys, "list")) == ["LOCAL:procedural"]


def test_max_jobs_is_checked_by_the_service(started: Path, capsys) -> None:
    for value in ("0", "abc"):
        assert accounts_error(
            capsys, "add", "LOCAL:gpu0", "--engine", "procedural", "--max-jobs", value
        ) == (f"dreamserve: Parameter maxJobs ({value}) valid values: integer 1-50")


def test_a_setting_the_engine_does_not_take_fails(started: Path, capsys) -> None:
    assert accounts_error(
        capsys, "add", "LOCAL:gpu0", "--engine", "procedural", "--setting", "colour=red"
    ) == ("dreamserve: Parameter settings.colour not allowed: engine procedural takes no settings")


def test_a_setting_without_equals_is_a_usage_error(started: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["accounts", "add", "LOCAL:gpu0", "--engine", "procedural", "--setting", "colour"])
    assert exited.value.code == 2
    assert "argument --setting: 'colour' is not KEY=VALUE" in capsys.readouterr().err


def test_accounts_of_a_missing_user_fail(started: Path, capsys) -> None:
    message = "dreamserve: User 9 not found"
    assert accounts_error(capsys, "add", "LOCAL:gpu0", "--engine", "procedural", "--user", "9") == (
        message
    )
    assert accounts_error(capsys, "list", "--user", "9") == message
    tokens_create(capsys)  # user 2: nothing was left behind for a user to inherit
    assert list(accounts(capsys, "list", "--user", "2")) == ["LOCAL:procedural"]


@pytest.fixture
def keyed(started: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's service with one more engine, `keyed`, that takes a secret."""
    engines = {**BUILTIN, "keyed": Keyed}
    monkeypatch.setattr(cli, "open_server", functools.partial(open_server, engines=engines))


def test_settings_values_are_json_when_they_parse_else_text(keyed: None, capsys) -> None:
    added = accounts(
        capsys,
        *("add", "US:upstream", "--engine", "keyed", "--setting", "apiKey=sk-1"),
        *("--setting", "steps=8", "--setting", 'extra={"a": [1, true]}'),
        *("--setting", "baseUrl=https://up.example/v1?x=1", "--setting", "label=NaN"),
    )
    assert added["settings"] == {
        "baseUrl": "https://up.example/v1?x=1",
        "label": "NaN",  # not JSON the API would take: the text
        "steps": 8,
        "extra": {"a": [1, True]},
    }
    args = ("add", "US:upstream", "--engine", "keyed", "--setting", "apiKey=sk-1")
    quoted = accounts(capsys, *args, "--setting", 'label="8"')
    assert quoted["settings"] == {"label": "8"}  # a JSON string, without its quotes


def test_secrets_are_never_printed(keyed: None, capsys) -> None:
    secret = "sk-very-secret-0123456789"
    args = ("--engine", "keyed", "--setting", f"apiKey={secret}", "--setting", "steps=8")
    assert main(["accounts", "add", "US:upstream", *args]) == 0
    added = capsys.readouterr()
    assert json.loads(added.out)["settings"] == {"steps": 8}
    assert main(["accounts", "list"]) == 0
    listed = capsys.readouterr()
    assert json.loads(listed.out)["US:upstream"]["settings"] == {"steps": 8}
    assert secret not in added.out + added.err + listed.out + listed.err


def test_tokens_create_on_an_empty_database_is_the_first_start(migrated: Path, capsys) -> None:
    token = tokens_create(capsys)
    assert token.startswith("user:1-")
    listed = accounts(capsys, "list")
    assert list(listed) == ["LOCAL:procedural"]
    assert capsys.readouterr().err == ""  # no second first start (and no second token)


def test_request_urls_stay_out_of_the_log(data_dir: Path) -> None:
    """httpx logs each request's URL at info; a replyUrl may carry a receiver's credentials."""
    assert main(["migrate"]) == 0
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING


CONFIG = """
[sizes.sdxl.1k]
"1:1" = "1024x1024"
"16:9" = "1344x768"

[[models]]
name = "sdxl-turbo"
resolutions = ["1k"]
sizes = "sdxl"
max_refs = 1

[[accounts]]
account = "LOCAL:gpu0"
engine = "procedural"
maxJobs = 2
models = ["sdxl-turbo"]
"""


def test_serve_applies_the_config_file_at_every_start(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path = tmp_path / "dreamserve.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("DREAMSERVE_CONFIG", str(path))
    settings = Settings()
    token, placeholder, routing = asyncio.run(cli._bootstrap(settings))
    assert token is not None  # the first start
    # The file declares accounts: no placeholder, and the routing says who serves what.
    assert placeholder is False
    assert "model sdxl-turbo: LOCAL:gpu0" in routing
    assert "model seedream-4.0: no shared account" in routing
    assert len(routing) == len(load_config(path).catalogue.models)
    assert asyncio.run(cli._bootstrap(settings))[0] is None  # a later one: the same accounts
    assert main(["accounts", "list", "--shared"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(listed) == ["LOCAL:gpu0"]
    assert listed["LOCAL:gpu0"]["models"] == {"image": ["sdxl-turbo"]}
    assert listed["LOCAL:gpu0"]["maxJobs"] == 2

    async def generate() -> dict[str, Any]:
        async with open_server(settings) as server:
            service = server.service
            assert "sdxl-turbo" in [model["model"] for model in service.submissions.models()]
            body = {
                "prompt": "a turbo",
                "model": "sdxl-turbo",
                "ratio": "16:9",
                "account": "LOCAL:gpu0",
            }
            submitted = await service.submissions.image(1, {**body, "count": 1})
            for _ in range(600):
                record = await service.records.get(1, submitted["jobid"])
                if record["status"] != "created":
                    return dict(record)
                await asyncio.sleep(0.05)
            raise AssertionError("the job did not end")

    record = asyncio.run(generate())
    assert record["status"] == "completed"
    [image] = record["response"]["images"]
    assert (image["width"], image["height"]) == (1344, 768)
    assert image["assetId"].startswith("LOCAL:gpu0:")


def test_the_placeholder_never_serves_a_model_the_operator_adds(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A first start without a file made LOCAL:procedural; the operator then adds a GPU.
    settings = Settings()
    token, placeholder, routing = asyncio.run(cli._bootstrap(settings))
    assert token is not None
    assert placeholder is True
    assert "model seedream-4.0: LOCAL:procedural" in routing
    path = tmp_path / "dreamserve.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("DREAMSERVE_CONFIG", str(path))
    settings = Settings()
    token, _, routing = asyncio.run(cli._bootstrap(settings))
    assert token is None
    assert "model sdxl-turbo: LOCAL:gpu0" in routing  # not LOCAL:procedural too
    assert "model seedream-4.0: LOCAL:procedural" in routing

    async def submit() -> tuple[list[str], list[str]]:
        config = load_config(path)
        async with open_server(settings, catalogue=config.catalogue) as server:
            service = server.service
            served = (await service.accounts.listing(None))["LOCAL:procedural"]["models"]
            gpu = {"account": "LOCAL:gpu0", "engine": "procedural", "models": ["sdxl-turbo"]}
            await service.accounts.put(None, {**gpu, "maxJobs": 50})  # room for every job
            ids = []
            for index in range(20):  # none names an account: admission chooses
                body = {"prompt": f"turbo {index}", "model": "sdxl-turbo", "count": 1}
                ids.append((await service.submissions.image(1, body))["jobid"])
            return served["image"], ids

    served, ids = asyncio.run(submit())
    assert "sdxl-turbo" not in served
    assert "seedream-4.0" in served
    assert all("-LOCAL:gpu0-" in jobid for jobid in ids), ids


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[oops", "not valid TOML"),
        (
            '[[accounts]]\naccount = "LOCAL:bad"\nengine = "nope"',
            f"dreamserve: account LOCAL:bad: Parameter engine (nope) valid values: {ENGINES}",
        ),
    ],
)
def test_serve_stops_at_once_on_a_bad_config_file(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
    text: str,
    message: str,
) -> None:
    path = tmp_path / "dreamserve.toml"
    path.write_text(text)
    monkeypatch.setenv("DREAMSERVE_CONFIG", str(path))
    assert main(["serve"]) == 1
    assert message in capsys.readouterr().err


def test_serve_stops_at_once_on_an_unsupported_blob_url(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("DREAMSERVE_BLOB_URL", "gs://x")
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == (
        "dreamserve: Blob store URL gs://x is not supported: use file:///<absolute dir>, "
        "file:<relative dir>, memory:// or s3://<bucket>[/<prefix>]\n"
    )
    assert not (data_dir / "dreamserve.db").exists()  # it stopped before opening the database


def test_serve_freezes_the_startup_heap_and_collects_young_objects_less_often() -> None:
    threshold = gc.get_threshold()
    try:
        cli.settle_heap()
        assert gc.get_freeze_count() > 10_000  # the modules and app objects made so far
        assert gc.get_threshold() == (10_000, 20, 20)
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


ACCESS_FORMAT = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access log call


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        (
            "/v1/dreamina/files/images/2026/12/06/1.jpg?expires=1796601600&signature=aB-_9",
            "/v1/dreamina/files/images/2026/12/06/1.jpg?expires=1796601600",
        ),
        ("/f?signature=abc&expires=1", "/f?expires=1"),
        ("/f?sig%6Eature=abc&expires=1", "/f?expires=1"),  # the name as the server decodes it
        ("/f?signature=a&signature=b", "/f"),
        ("/f?signatures=a", "/f?signatures=a"),
        ("/v1/dreamina/assets/A:b?count=2&offset=4", "/v1/dreamina/assets/A:b?count=2&offset=4"),
        ("/v1/dreamina/models", "/v1/dreamina/models"),
    ],
)
def test_the_access_log_leaves_out_link_signatures(target: str, logged: str) -> None:
    args = ("127.0.0.1:50000", "GET", target, "1.1", 200)
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, ACCESS_FORMAT, args, None)
    assert cli.UnsignedLinks().filter(record) is True
    assert record.getMessage() == f'127.0.0.1:50000 - "GET {logged} HTTP/1.1" 200'


def test_serve_runs_uvicorn_with_signatures_out_of_its_access_log(
    uvicorn_loggers: None, capsys
) -> None:
    import uvicorn

    uvicorn.Config(app="unused:app", **cli.uvicorn_options(Settings()))  # configures logging
    target = "/v1/dreamina/files/images/1.jpg?expires=1796601600&signature=aB-_9"
    logging.getLogger("uvicorn.access").info(
        ACCESS_FORMAT, "127.0.0.1:50000", "GET", target, "1.1", 200
    )
    assert capsys.readouterr().out == (
        'INFO:     127.0.0.1:50000 - "GET /v1/dreamina/files/images/1.jpg?expires=1796601600 '
        'HTTP/1.1" 200 OK\n'
    )


def test_the_shutdown_bound_is_uvicorns_graceful_timeout() -> None:
    """SIGTERM cancels what still runs after DREAMSERVE_SHUTDOWN_SECONDS (default 10)."""
    assert cli.uvicorn_options(Settings())["timeout_graceful_shutdown"] == 10
    options = cli.uvicorn_options(Settings(shutdown_seconds=2.5))
    assert options["timeout_graceful_shutdown"] == 2.5


def test_worker_needs_postgresql(data_dir: Path, capsys) -> None:
    assert main(["worker", "--accounts", "LOCAL:gpu0"]) == 1
    assert capsys.readouterr().err == (
        "dreamserve: dreamserve worker needs PostgreSQL (DREAMSERVE_DATABASE_URL): on SQLite, "
        "`dreamserve serve` runs the jobs itself\n"
    )


def test_serve_that_runs_no_jobs_needs_postgresql(
    data_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DREAMSERVE_RUN_JOBS", "false")
    assert main(["serve"]) == 1
    assert capsys.readouterr().err == (
        "dreamserve: DREAMSERVE_RUN_JOBS=false needs PostgreSQL (DREAMSERVE_DATABASE_URL): on "
        "SQLite the server runs the jobs itself, and no worker can take them\n"
    )


# users and tokens; no database made outside serve, migrate and worker


@pytest.mark.parametrize(
    "command",
    [
        ["tokens", "create"],
        ["tokens", "list"],
        ["tokens", "revoke", "1"],
        ["users", "list"],
        ["users", "create"],
        ["users", "set", "1", "--max-running", "2"],
        ["accounts", "list"],
    ],
)
def test_commands_other_than_serve_refuse_to_make_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, command: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the default data dir, ./data, is where the command runs
    assert main(command) == 1
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err == (
        f"dreamserve: No dreamserve database at {tmp_path / 'data' / 'dreamserve.db'}; "
        "set DREAMSERVE_DATA_DIR or run dreamserve serve there\n"
    )
    assert list(tmp_path.iterdir()) == []  # no data dir, no file


def test_a_postgresql_database_without_dreamserves_tables_is_no_database(
    monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    psycopg = pytest.importorskip("psycopg")
    from support import POSTGRES_SERVER

    try:
        admin = psycopg.connect(POSTGRES_SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        pytest.skip(f"no PostgreSQL server at {POSTGRES_SERVER}")
    name = f"dreamserve_empty_{tmp_path.name[-8:].replace('-', '_')}".lower()
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            monkeypatch.setenv(
                "DREAMSERVE_DATABASE_URL", f"postgresql://postgres:s3cret@127.0.0.1:5432/{name}"
            )
            monkeypatch.setenv("DREAMSERVE_DATA_DIR", str(tmp_path / "data"))
            assert main(["users", "list"]) == 1
            assert capsys.readouterr().err == (
                f"dreamserve: No dreamserve database at postgresql://postgres@127.0.0.1:5432/"
                f"{name}; set DREAMSERVE_DATA_DIR or run dreamserve serve there\n"
            )
            with psycopg.connect(POSTGRES_SERVER.rsplit("/", 1)[0] + f"/{name}") as conn:
                tables = conn.execute(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                ).fetchone()
            assert tables == (0,)
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_users_create_list_and_set_limits(started: Path, capsys) -> None:
    made = cli_json(capsys, "users", "create")
    assert made["id"] == 2
    assert re.fullmatch(r"user:2-[A-Za-z0-9_-]{40,}", made["token"])
    limited = cli_json(capsys, "users", "set", "2", "--max-running", "3", "--max-per-minute", "60")
    assert (limited["maxRunning"], limited["maxPerMinute"]) == (3, 60)
    listed = cli_json(capsys, "users", "list")
    assert [(u["id"], u["tokens"], u["maxRunning"], u["maxPerMinute"]) for u in listed] == [
        (1, 1, None, None),
        (2, 1, 3, 60),
    ]
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", u["createdAt"]) for u in listed
    )
    removed = cli_json(capsys, "users", "set", "2", "--max-running", "none")
    assert (removed["maxRunning"], removed["maxPerMinute"]) == (None, 60)
    assert main(["users", "set", "9", "--max-running", "1"]) == 1
    assert capsys.readouterr().err == "dreamserve: User 9 not found\n"
    with pytest.raises(SystemExit) as usage:  # argparse's usage error
        main(["users", "set", "2", "--max-running", "0"])
    assert usage.value.code == 2
    assert "'0' is not 1 or more (or 'none')" in capsys.readouterr().err


def test_tokens_list_and_revoke(started: Path, capsys) -> None:
    token = tokens_create(capsys, "--user", "1")
    listed = cli_json(capsys, "tokens", "list", "--user", "1")
    assert [each["id"] for each in listed] == [1, 2]
    assert listed[1]["prefix"] == token[:13]
    assert set(listed[1]) == {"id", "user", "prefix", "createdAt", "lastUsedAt", "revokedAt"}
    assert token[13:] not in json.dumps(listed)
    assert main(["tokens", "revoke", token[:13]]) == 0
    output = capsys.readouterr()
    assert json.loads(output.out)["revokedAt"] is not None
    assert output.err == (
        f"dreamserve: token 2 ({token[:13]}...) revoked; running servers refuse it within 60 s "
        "(their token cache, DREAMSERVE_TOKEN_CACHE_SECONDS)\n"
    )
    assert [u["tokens"] for u in cli_json(capsys, "users", "list")] == [1]  # usable ones
    assert main(["tokens", "revoke", "user:1-"]) == 1
    assert capsys.readouterr().err == "dreamserve: Token prefix user:1- names 2 tokens (ids 1, 2)\n"
    assert main(["tokens", "revoke", "99"]) == 1
    assert capsys.readouterr().err == "dreamserve: Token 99 not found\n"


def test_a_bad_config_file_stops_the_first_start_before_user_1_is_made(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dreamserve.toml"
    path.write_text('[[accounts]]\naccount = "LOCAL:bad"\nengine = "nope"')
    monkeypatch.setenv("DREAMSERVE_CONFIG", str(path))
    with pytest.raises(cli.ConfigError):
        asyncio.run(cli._bootstrap(Settings()))
    users = sqlite3.connect(data_dir / "dreamserve.db").execute("SELECT count(*) FROM users")
    assert list(users) == [(0,)]
    path.write_text(CONFIG)  # fixed: the next start is the first start, its token shown
    token, _, routing = asyncio.run(cli._bootstrap(Settings()))
    assert token is not None
    assert token.startswith("user:1-")
    assert cli.NO_TOKEN not in routing


def test_a_start_that_finds_user_1_without_a_token_says_how_to_make_one(
    data_dir: Path, capsys
) -> None:
    token, _, routing = asyncio.run(cli._bootstrap(Settings()))
    assert token is not None
    assert cli.NO_TOKEN not in routing
    with sqlite3.connect(data_dir / "dreamserve.db") as conn:  # as a lost first start left it
        conn.execute("DELETE FROM tokens")
    token, _, routing = asyncio.run(cli._bootstrap(Settings()))
    assert token is None
    assert routing[0] == (
        "dreamserve: user 1 has no API token (none was ever made for it); make one with: "
        "dreamserve tokens create --user 1"
    )
    assert tokens_create(capsys, "--user", "1").startswith("user:1-")
    assert cli.NO_TOKEN not in asyncio.run(cli._bootstrap(Settings()))[2]


def test_a_config_account_of_user_1_is_applied_on_the_first_start(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path = tmp_path / "dreamserve.toml"
    path.write_text('[[accounts]]\naccount = "LOCAL:mine"\nengine = "procedural"\nuser = 1\n')
    monkeypatch.setenv("DREAMSERVE_CONFIG", str(path))
    token, _, _ = asyncio.run(cli._bootstrap(Settings()))
    assert token is not None
    assert token.startswith("user:1-")
    assert "LOCAL:mine" in cli_json(capsys, "accounts", "list", "--user", "1")


def test_a_bad_config_account_of_a_user_shows_the_first_starts_token_before_stopping(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path = tmp_path / "dreamserve.toml"
    path.write_text('[[accounts]]\naccount = "LOCAL:mine"\nengine = "nope"\nuser = 1\n')
    monkeypatch.setenv("DREAMSERVE_CONFIG", str(path))
    with pytest.raises(cli.ConfigError, match="account LOCAL:mine: Parameter engine"):
        asyncio.run(cli._bootstrap(Settings()))
    shown = capsys.readouterr().err
    assert "API token for user 1 (shown only now; keep it): user:1-" in shown


@pytest.mark.parametrize(
    ("engine", "models", "served"),
    [
        ("ark", {"seedream-4.6": "ep-20261206-abc"}, ["seedream-4.6"]),
        ("openai", {"gpt-image-2": "gpt-image-2-2026-04-21"}, ["gpt-image-2"]),
    ],
)
def test_an_upstream_engines_model_ids_are_a_setting_of_the_cli(
    started: Path, capsys, engine: str, models: dict[str, str], served: list[str]
) -> None:
    """Every default model id of ark and openai is the account's `models` setting."""
    added = accounts(
        capsys,
        *("add", "CA:upstream", "--shared", "--engine", engine, "--setting", "apiKey=sk-1"),
        *("--setting", "baseUrl=http://127.0.0.1:9", "--setting", f"models={json.dumps(models)}"),
    )
    assert added["settings"] == {"baseUrl": "http://127.0.0.1:9", "models": models}
    assert added["models"] == {"image": served}


def test_an_upstream_engines_model_ids_are_a_setting_of_the_config_file(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    path = tmp_path / "dreamserve.toml"
    path.write_text(
        '[[accounts]]\naccount = "SG:ark"\nengine = "ark"\n'
        '[accounts.settings]\napiKey = "sk-1"\nbaseUrl = "http://127.0.0.1:9"\n'
        '[accounts.settings.models]\n"seedream-4.0" = "ep-20261206-abc"\n'
    )
    monkeypatch.setenv("DREAMSERVE_CONFIG", str(path))
    asyncio.run(cli._bootstrap(Settings()))
    listed = accounts(capsys, "list", "--shared")
    assert listed["SG:ark"]["settings"] == {
        "baseUrl": "http://127.0.0.1:9",
        "models": {"seedream-4.0": "ep-20261206-abc"},
    }
    assert listed["SG:ark"]["models"] == {"image": ["seedream-4.0"]}


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_start_on_every_interface_without_a_public_url_says_where_links_point(
    data_dir: Path, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listening on every interface, the links default to 127.0.0.1, which the machines the
    server now answers cannot open: the start says so, and what to set."""
    monkeypatch.setenv("DREAMSERVE_HOST", host)
    monkeypatch.setenv("DREAMSERVE_PORT", "9000")
    routing = asyncio.run(cli._bootstrap(Settings()))[2]
    assert routing[0] == (
        "dreamserve: listening on every interface, but the links in job records (the images) "
        "point at http://127.0.0.1:9000, which other machines cannot open: set "
        "DREAMSERVE_PUBLIC_URL to the address they use (http://<this machine>:9000)"
    )
    monkeypatch.setenv("DREAMSERVE_PUBLIC_URL", "http://studio.lan:9000")
    assert not asyncio.run(cli._bootstrap(Settings()))[2][0].startswith("dreamserve:")
    monkeypatch.delenv("DREAMSERVE_PUBLIC_URL")
    monkeypatch.setenv("DREAMSERVE_HOST", "127.0.0.1")
    assert not asyncio.run(cli._bootstrap(Settings()))[2][0].startswith("dreamserve:")
