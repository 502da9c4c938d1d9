"""The migrations build exactly the schema of storage/tables.py, on both databases."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, create_engine, text
from support import Harness

from dreamserve.storage.tables import metadata
from dreamserve.storage.webhook_queries import receiver_host

pytestmark = pytest.mark.anyio


async def test_the_migrated_schema_is_the_declared_one(harness: Harness) -> None:
    def differences(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    assert await harness.server.db.read(differences) == []


def test_deliveries_queued_before_the_fairness_migration_get_their_host(tmp_path: Path) -> None:
    """0004 adds each delivery's receiver host, as the code now computes it, to rows already
    in the outbox (SQLite leaves foreign keys unchecked here: the rows stand alone)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    urls = ["https://Hooks.Example/a", "http://hooks.example:8080/b", "http://[::1]/c"]
    with engine.begin() as conn:
        _migrate(conn, "0003")
        conn.execute(
            text(
                "INSERT INTO webhook_deliveries (job_id, user_id, message_id, url, status, "
                "tries, next_at, created_at, updated_at) "
                "VALUES (1, 1, 'msg', :url, 'pending', 0, 0, 0, 0)"
            ),
            [{"url": url} for url in urls],
        )
        _migrate(conn, "head")
        hosts = conn.execute(text("SELECT host FROM webhook_deliveries ORDER BY id")).scalars()
        assert list(hosts) == [receiver_host(url) for url in urls]
        assert receiver_host(urls[0]) == "hooks.example:443"
    engine.dispose()


def _migrate(conn: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("dreamserve") / "storage" / "migrations")
    )
    config.attributes["connection"] = conn
    command.upgrade(config, revision)
