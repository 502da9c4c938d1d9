"""Webhook fairness: each delivery's receiver host and in-flight hold, and the receiver hosts
cooling down after tries without an answer.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _host(url: str) -> str:
    """webhook_queries.receiver_host as of this revision (a migration keeps its own copy)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return parts.netloc.lower()
    name = (parts.hostname or "").lower()
    if ":" in name:
        name = f"[{name}]"
    return f"{name}:{port or (443 if parts.scheme.lower() == 'https' else 80)}"


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host", sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column("held_until", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_webhook_deliveries_held_until", ["held_until"], unique=False)
    deliveries = sa.table(
        "webhook_deliveries", sa.column("id", sa.Integer()), sa.column("url", sa.String())
    )
    conn = op.get_bind()
    rows = conn.execute(sa.select(deliveries.c.id, deliveries.c.url)).all()
    if rows:
        conn.execute(
            sa.text("UPDATE webhook_deliveries SET host = :host WHERE id = :id"),
            [{"id": row.id, "host": _host(row.url)} for row in rows],
        )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.alter_column("host", existing_type=sa.String(length=1024), nullable=False)
    op.create_table(
        "webhook_hosts",
        sa.Column("host", sa.String(length=1024), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("cooldown_until", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("host", name=op.f("pk_webhook_hosts")),
    )


def downgrade() -> None:
    op.drop_table("webhook_hosts")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_held_until")
        batch_op.drop_column("held_until")
        batch_op.drop_column("host")
