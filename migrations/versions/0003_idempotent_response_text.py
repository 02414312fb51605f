"""Keep an idempotent create's first response exactly as it was sent.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 15:20:00

The response is now the JSON text PostgreSQL rendered for the new task; `json` (unlike `jsonb`)
stores that text as it is, so a replay is byte for byte the first response.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("ALTER TABLE idempotency_keys ALTER COLUMN response TYPE json USING response::json")


def downgrade():
    op.execute("ALTER TABLE idempotency_keys ALTER COLUMN response TYPE jsonb USING response::jsonb")
