"""Task counts by status, kept by triggers, so counting stays cheap with millions of rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 13:55:00

Counting a status with count(*) reads every matching row: 40 ms at a million completed
tasks, on every /status, /metrics scrape and list page. Statement-level triggers keep a
running count per status instead, spread over 16 rows per status (chosen by backend pid)
so that concurrent transactions seldom wait on the same counter row.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SHARDS = 16


def _add(source: str, sign: str) -> str:
    return f"""
        INSERT INTO task_counts AS c (status, shard, n)
        SELECT status, pg_backend_pid() % {SHARDS}, {sign}count(*)
        FROM {source} GROUP BY status ORDER BY status
        ON CONFLICT (status, shard) DO UPDATE SET n = c.n + excluded.n;"""


def upgrade():
    op.create_table(
        "task_counts",
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("status", "shard"),
    )
    # No task may change while the counts are taken and the triggers put in place.
    op.execute("LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        "INSERT INTO task_counts (status, shard, n) SELECT status, 0, count(*) FROM tasks"
        " GROUP BY status"
    )
    op.execute(f"""
        CREATE FUNCTION taskapp_count_inserted_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {_add("new_rows", "")} RETURN NULL; END $$""")
    op.execute(f"""
        CREATE FUNCTION taskapp_count_deleted_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {_add("old_rows", "-")} RETURN NULL; END $$""")
    # Most updates leave the status alone (lease renewals, edits): they write nothing.
    op.execute(f"""
        CREATE FUNCTION taskapp_count_updated_tasks() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO task_counts AS c (status, shard, n)
            SELECT status, pg_backend_pid() % {SHARDS}, sum(delta)
            FROM (SELECT status, 1 AS delta FROM new_rows
                  UNION ALL SELECT status, -1 FROM old_rows) AS changes
            GROUP BY status HAVING sum(delta) <> 0 ORDER BY status
            ON CONFLICT (status, shard) DO UPDATE SET n = c.n + excluded.n;
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE FUNCTION taskapp_reset_task_counts() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN DELETE FROM task_counts; RETURN NULL; END $$""")
    op.execute("""
        CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks
        REFERENCING NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION taskapp_count_inserted_tasks()""")
    op.execute("""
        CREATE TRIGGER tasks_count_update AFTER UPDATE ON tasks
        REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
        FOR EACH STATEMENT EXECUTE FUNCTION taskapp_count_updated_tasks()""")
    op.execute("""
        CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks
        REFERENCING OLD TABLE AS old_rows
        FOR EACH STATEMENT EXECUTE FUNCTION taskapp_count_deleted_tasks()""")
    op.execute("""
        CREATE TRIGGER tasks_count_truncate AFTER TRUNCATE ON tasks
        FOR EACH STATEMENT EXECUTE FUNCTION taskapp_reset_task_counts()""")


def downgrade():
    for trigger in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER tasks_count_{trigger} ON tasks")
    for function in ("inserted", "deleted", "updated"):
        op.execute(f"DROP FUNCTION taskapp_count_{function}_tasks()")
    op.execute("DROP FUNCTION taskapp_reset_task_counts()")
    op.drop_table("task_counts")
