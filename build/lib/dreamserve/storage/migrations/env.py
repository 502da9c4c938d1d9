"""Alembic environment: migrations run on the connection that `Database.migrate` hands over."""

from __future__ import annotations

from alembic import context

from dreamserve.storage.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `dreamserve migrate`, which supplies the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
