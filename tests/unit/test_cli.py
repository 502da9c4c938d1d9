"""The CLI: tokens, migrations and the first-start banner; settings come from DREAMSERVE_*."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import pytest

from dreamserve.app import open_service
from dreamserve.cli import first_start_banner, main
from dreamserve.settings import Settings


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DREAMSERVE_DATA_DIR", str(tmp_path / "cli-data"))
    return tmp_path / "cli-data"


def tokens_create(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["tokens", "create", *args]) == 0
    return capsys.readouterr().out.strip()


def test_tokens_create_makes_a_new_user_each_time(data_dir: Path, capsys) -> None:
    first = tokens_create(capsys)
    second = tokens_create(capsys)
    assert re.fullmatch(r"user:1-[A-Za-z0-9_-]{40,}", first)
    assert re.fullmatch(r"user:2-[A-Za-z0-9_-]{40,}", second)


def test_tokens_create_for_an_existing_user(data_dir: Path, capsys) -> None:
    tokens_create(capsys)
    again = tokens_create(capsys, "--user", "1")
    assert again.startswith("user:1-")


def test_tokens_create_for_a_missing_user_fails(data_dir: Path, capsys) -> None:
    assert main(["tokens", "create", "--user", "9"]) == 1
    assert capsys.readouterr().err.strip() == "dreamserve: User 9 not found"


def test_only_token_hashes_are_stored(data_dir: Path, capsys) -> None:
    token = tokens_create(capsys)
    database = (data_dir / "dreamserve.db").read_bytes()
    assert token.encode() not in database
    assert token.split("-", 1)[1].encode() not in database
    hashes = sqlite3.connect(data_dir / "dreamserve.db").execute("SELECT token_hash FROM tokens")
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


def test_first_start_creates_user_1_and_the_procedural_account_once(data_dir: Path) -> None:
    settings = Settings()

    async def bootstrap_twice() -> tuple[str | None, str | None]:
        async with open_service(settings) as service:
            first = await service.bootstrap()
        async with open_service(settings) as service:
            return first, await service.bootstrap()

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
