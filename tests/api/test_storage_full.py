"""A full disk: an upload or a write answers 507 "Storage full" with nothing half-written, and a
job whose images find no space fails saying so, its partial images removed."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, func, select
from support import SMALL, Harness, mounted_tmpfs, open_harness
from test_assets import picture, stored, upload

from dreamserve.settings import Settings
from dreamserve.storage import asset_queries
from dreamserve.storage.tables import assets

pytestmark = pytest.mark.anyio

FULL = {"error": "Storage full"}


def no_space() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class _FillingFile:
    """A file that takes a few bytes, then finds the disk full (as a real one does mid-write)."""

    def __init__(self, file: Any) -> None:
        self.file = file

    def write(self, data: bytes) -> int:
        self.file.write(data[:10])
        self.file.flush()
        raise no_space()

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.file.close()


def blob_files(settings: Settings) -> list[Path]:
    """Every file under the blobs dir, temporary ones included."""
    return [path for path in (settings.data_dir / "blobs").rglob("*") if path.is_file()]


async def test_an_upload_that_finds_the_disk_full_is_507_and_leaves_nothing(
    harness: Harness, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FillingFile(real_fdopen(fd, mode)))
    response = await upload(harness, picture(64, 48))
    monkeypatch.undo()
    assert (response.status_code, response.json()) == (507, FULL)
    assert blob_files(settings) == []
    assert await stored(harness, settings) == (0, [])


async def test_an_upload_whose_row_finds_the_database_full_is_507_and_leaves_no_file(
    harness: Harness, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's own "database or disk is full" (SQLITE_FULL), made real by max_page_count: the
    upload's insert grows the database past it."""
    if not settings.database.startswith("sqlite"):
        pytest.skip("SQLITE_FULL is SQLite's; PostgreSQL's disk_full (53100) maps the same way")
    driver = harness.server.db._conn.connection.driver_connection  # type: ignore[attr-defined]
    driver.execute("CREATE TABLE filler (x BLOB)")
    pages = driver.execute("PRAGMA page_count").fetchone()[0]
    driver.execute(f"PRAGMA max_page_count = {pages + 2}")

    def insert_upload(conn: Connection, **_: Any) -> None:
        conn.exec_driver_sql("INSERT INTO filler VALUES (zeroblob(100000))")

    monkeypatch.setattr(asset_queries, "insert_upload", insert_upload)
    response = await upload(harness, picture(64, 48))
    assert (response.status_code, response.json()) == (507, FULL)
    assert blob_files(settings) == []

    def count(conn: Connection) -> int:
        return int(conn.execute(select(func.count()).select_from(assets)).scalar_one())

    assert await harness.server.db.read(count) == 0
    monkeypatch.undo()
    response = await upload(harness, picture(64, 48))  # the failed write left nothing open
    assert response.status_code == 200


async def test_a_job_whose_images_find_the_disk_full_fails_saying_so_and_keeps_none(
    harness: Harness, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = harness.server.blobs
    real = blobs._write  # type: ignore[attr-defined]
    writes: list[Path] = []

    def write(path: Path, data: bytes) -> None:
        writes.append(path)
        if len(writes) == 2:  # the first image stored, no room for the second
            raise no_space()
        real(path, data)

    monkeypatch.setattr(blobs, "_write", write)
    record = await harness.wait((await harness.post({**SMALL, "count": 2})).json()["jobid"])
    assert len(writes) == 2
    assert record["status"] == "failed"
    assert (record["error"], record["errorDetails"]) == (
        "Storage full",
        "the server has no space left to store the images; try again once its operator has "
        "freed some",
    )
    assert "images" not in record["response"]
    assert blob_files(settings) == []
    assert await harness.slots() == {"LOCAL:procedural": 0}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs); skipped, saying why, where it cannot be mounted."""
    with mounted_tmpfs(tmp_path / "small-disk", "1m") as where:
        yield where


async def test_an_upload_to_a_really_full_disk_is_507_and_leaves_nothing(
    settings: Settings, small_disk: Path
) -> None:
    blobs = small_disk / "blobs"
    settings = settings.model_copy(update={"blob_url": f"file://{blobs}"})
    data = picture(640, 480)  # ~100 KB of PNG gradients
    async with open_harness(settings) as harness:
        # Fill the disk until less than the upload is left.
        (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - len(data) // 2))
        response = await upload(harness, data)
        assert (response.status_code, response.json()) == (507, FULL)
        assert [path for path in blobs.rglob("*") if path.is_file()] == []
        assert (await stored(harness, settings))[0] == 0
