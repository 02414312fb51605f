"""The claim's plan: taskapp_admit() returns a handful of rows, not a thousand.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:30:00

A set-returning function is estimated at 1,000 rows unless it says otherwise. The claim
(complete_and_claim, sql/queue.sql) joins taskapp_admit()'s rows to `tasks` to update them;
at 1,000 the planner hashed the whole table (a sequential scan of every task, history
included, on every claim: the drain of 20,000 tasks fell from ~9,000 to ~700 tasks/s), where a
claim admits at most its free slots and an index probe per row is what it needs.
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_SIGNATURE = "taskapp_admit(bigint[], text[], text[])"


def upgrade():
    op.execute(f"ALTER FUNCTION {_SIGNATURE} ROWS 10")


def downgrade():
    op.execute(f"ALTER FUNCTION {_SIGNATURE} ROWS 1000")
