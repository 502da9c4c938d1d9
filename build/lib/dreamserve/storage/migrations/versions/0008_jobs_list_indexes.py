"""The user's jobs listed newest first (GET /images): an index on (user_id, created_at, id) and
one on (user_id, status, created_at, id), so that a page is an index range scan.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 00:20:00
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_user_created", ["user_id", "created_at", "id"])
        batch_op.create_index(
            "ix_jobs_user_status_created", ["user_id", "status", "created_at", "id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_user_status_created")
        batch_op.drop_index("ix_jobs_user_created")
