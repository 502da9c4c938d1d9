"""Users and tokens operated from the CLI: a token's shown prefix, revocation and last use; a
user's limits (`max_running`, `max_per_minute`) and the counter of their submissions in the
current minute.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-20 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prefix", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("last_used_at", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_running", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_per_minute", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("minute", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("minute_count", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("minute_count")
        batch_op.drop_column("minute")
        batch_op.drop_column("max_per_minute")
        batch_op.drop_column("max_running")
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_column("last_used_at")
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("prefix")
