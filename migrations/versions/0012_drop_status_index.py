"""Drop ix_tasks_status: the partial indexes already find each status, and every claim and
every completion paid for it.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 13:30:00

A task's status change is never a HOT update (status is in the claim's partial indexes), so
each one added an entry to every index whose predicate the new row meets, and to this one
always: two entries per task run, on the drain's hottest path (a pgbench of the claim
statement, 100 tasks a round: 34,000 -> 37,000 tasks/s without it). Every query by status has
a partial index of its own: pending (ix_tasks_claim, ix_tasks_pending_run_after), processing
(ix_tasks_lease_expiry, ix_tasks_running_keys), completed, failed and cancelled
(ix_tasks_finished); counts by status come from task_counts.
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade():
    op.drop_index("ix_tasks_status", table_name="tasks")


def downgrade():
    op.create_index("ix_tasks_status", "tasks", ["status"])
