"""Results and checkpoints: what a processor returned, per task and per conversation.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 00:20:00

`tasks.result` keeps the processor's return value; `conversations.result` and
`conversations.processed_at` keep a conversation's checkpoint (or its completion).
`conversations.revision` counts content edits: a claim keeps the revision of each conversation
it hands the processor in `tasks.claim_snapshot` ({"conversation id": revision}), and that
attempt may mark `processed` only a conversation still at that revision, so one added or
edited after the claim is never reported processed with content the processor never saw.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("tasks", sa.Column("result", JSONB(), nullable=True))
    op.add_column("tasks", sa.Column("claim_snapshot", JSONB(), nullable=True))
    op.add_column("conversations", sa.Column("result", JSONB(), nullable=True))
    op.add_column(
        "conversations", sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "conversations",
        sa.Column("revision", sa.Integer(), server_default="0", nullable=False),
    )
    # Conversations already processed before this migration: processed when their task was.
    op.execute(
        "UPDATE conversations AS c SET processed_at = coalesce(t.processed_at, c.updated_at)"
        " FROM tasks AS t WHERE t.id = c.task_id AND c.status = 'processed'"
    )


def downgrade():
    op.drop_column("conversations", "revision")
    op.drop_column("conversations", "processed_at")
    op.drop_column("conversations", "result")
    op.drop_column("tasks", "claim_snapshot")
    op.drop_column("tasks", "result")
