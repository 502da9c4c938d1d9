"""The optional queue: a job may wait for a slot of its account (`queueSeconds`); the account
serves its waiting users in turn.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue_deadline", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue_cursor", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("queue_cursor")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("queue_deadline")
