"""Retention: an index to find finished tasks past their time, oldest first.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:20:00

The housekeeper prunes `completed`, `failed` and `cancelled` tasks older than their
RETENTION_*_SECONDS (sql/retention.sql). This partial index holds only finished tasks, by
status and time, so each batch reads just the rows it deletes however large the history.
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade():
    op.execute(
        "CREATE INDEX ix_tasks_finished ON tasks (status, updated_at)"
        " WHERE status IN ('completed', 'failed', 'cancelled')"
    )


def downgrade():
    op.drop_index("ix_tasks_finished", table_name="tasks")
