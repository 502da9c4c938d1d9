"""A database with no space left: a real full disk under SQLite (a small tmpfs holding the data
dir; skipped, saying why, where this machine cannot mount one), PostgreSQL's disk_full error on
PostgreSQL. Writes are refused with 507, reads are answered, and a job whose end met the full
disk keeps its images and ends once, when space is back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest
from invariants import database_is_sound, ended, never_twice_at_once, probe, slots, stray_files
from rig import Rig
from support import fill, mounted_tmpfs

pytestmark = [pytest.mark.faults, pytest.mark.blackbox]

FULL = {"error": "Storage full"}
NOT_WRITTEN = "its end was not written, the database has no space left"
CHECKPOINT_FAILED = "WAL checkpoint failed"
# What the server prints when a job's runner or one of its threads died of the full disk.
CRASHES = ("runner crashed", "Exception in thread")


@pytest.mark.both_databases
def test_a_job_whose_end_finds_the_database_full_ends_once_when_space_is_back(
    rig: Rig, tmp_path: Path
) -> None:
    if rig.database_url is None:
        with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
            rig.data_dir = disk / "data"  # the database; the images elsewhere, with room
            rig.extra["DREAMSERVE_BLOB_URL"] = f"file://{rig.blobs}"
            run_out_of_space(rig, disk)
    else:
        run_out_of_space(rig, None)


def run_out_of_space(rig: Rig, disk: Path | None) -> None:
    rig.start()
    with rig.client() as client:
        running = rig.submit(client, "running")
        rig.wait_journalled("running", "start")
        with rig.no_space_left(disk):
            if disk is not None:
                use_up_the_wal(client)
            refused = client.post("/v1/dreamina/images", json=rig.body("refused"))
            assert (refused.status_code, refused.json()) == (507, FULL)
            probe(client, [running])
            rig.open("running", "run", "store")
            rig.wait_for(
                lambda: NOT_WRITTEN in rig.output or bool(crashes(rig)),
                "the job's end meets the full disk",
            )
            assert not crashes(rig), rig.output
            probe(client, [running])
        [record] = ended(client, [running]).values()
        assert record["status"] == "completed", record
        assert set(slots(client).values()) == {0}
        again = rig.submit(client, "again")
        rig.open("again", "run", "store")
        assert ended(client, [again])[again]["status"] == "completed"
    rig.stop()
    assert not crashes(rig), rig.output
    assert never_twice_at_once(rig) == {"running": 1, "again": 1}
    assert stray_files(rig) == []
    database_is_sound(rig)


def use_up_the_wal(client: httpx.Client) -> None:
    """Save accounts until one is refused for space: the WAL may have room left from its
    earlier use, which these harmless rows fill."""
    for n in range(200):
        body = {"account": f"LOCAL:slack{n}", "engine": "procedural", "maxJobs": 1}
        reply = client.post("/v1/dreamina/accounts", json=body)
        if reply.status_code != 200:
            assert (reply.status_code, reply.json()) == (507, FULL)
            return
    raise AssertionError("the database never ran out of space")


def test_a_data_dir_whose_disk_fills_fails_the_job_saying_so_and_keeps_nothing(
    tmp_path: Path, rig: Rig
) -> None:
    """The default layout, database and images in the data dir, on a small disk that fills
    while a job runs: its images find no space and it fails saying so (its end written once
    space is back), keeping no file; later jobs complete."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        rig.data_dir = disk / "data"
        rig.blobs = rig.data_dir / "blobs"
        rig.start()
        with rig.client() as client:
            running = rig.submit(client, "running")
            rig.wait_journalled("running", "start")
            with rig.no_space_left(disk):
                rig.open("running", "run", "store")
                rig.wait_journalled("running", "stored")
                probe(client, [running])
                rig.wait_for(lambda: NOT_WRITTEN in rig.output, "the job's end meets the full disk")
            [record] = ended(client, [running]).values()
            assert (record["status"], record["error"]) == ("failed", "Storage full"), record
            assert set(slots(client).values()) == {0}
            again = rig.submit(client, "again")
            rig.open("again", "run", "store")
            assert ended(client, [again])[again]["status"] == "completed"
        rig.stop()
        assert not crashes(rig), rig.output
        assert never_twice_at_once(rig) == {"running": 1, "again": 1}
        assert stray_files(rig) == []
        database_is_sound(rig)


def test_a_checkpoint_that_finds_the_disk_full_is_tried_again(tmp_path: Path, rig: Rig) -> None:
    """WAL frames of new pages, held from the checkpoint by a reader until the disk is full:
    the checkpoint that must then grow the database file fails, and is tried again (the
    checkpoints stop for good if its thread dies: the WAL grows until a restart); once space is
    back the server writes and runs jobs as before."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        rig.data_dir = disk / "data"
        rig.blobs = rig.data_dir / "blobs"
        rig.start()
        database = rig.sqlite_path
        with rig.client() as client, sqlite3.connect(database, isolation_level=None) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM jobs").fetchall()  # no checkpoint past this
            for n in range(40):  # rows on new pages, in the WAL only
                body = {"account": f"LOCAL:grow{n}", "engine": "procedural", "email": "x" * 200}
                assert client.post("/v1/dreamina/accounts", json=body).status_code == 200
            filler = fill(disk)
            before = database.stat().st_size
            reader.execute("ROLLBACK")  # the next checkpoint must grow the database file
            rig.wait_for(
                lambda: CHECKPOINT_FAILED in rig.output or bool(crashes(rig)),
                "a checkpoint meets the full disk",
            )
            assert not crashes(rig), rig.output
            filler.unlink()
            # Checkpoints go on: the WAL's pages reach the database file.
            rig.wait_for(lambda: database.stat().st_size > before, "a checkpoint after the fault")
            probe(client)
            rig.open("after", "run", "store")
            after = rig.submit(client, "after")
            assert ended(client, [after])[after]["status"] == "completed"
        rig.stop()
        database_is_sound(rig)


def crashes(rig: Rig) -> list[str]:
    return [line for line in rig.output.splitlines() if line.startswith(CRASHES)]
