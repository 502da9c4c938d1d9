"""The migrations build exactly the schema of storage/tables.py, on both databases."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from support import Harness

from dreamserve.storage.tables import metadata

pytestmark = pytest.mark.anyio


async def test_the_migrated_schema_is_the_declared_one(harness: Harness) -> None:
    def differences(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    assert await harness.server.db.read(differences) == []
