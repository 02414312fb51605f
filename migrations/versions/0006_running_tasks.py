"""Running tasks: progress, timeouts, deferrals, and events that carry data.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 05:00:00

`tasks.progress` keeps the processor's last report ({"done", "total", "message", "at"});
`tasks.timeout_seconds` a task's own timeout (NULL: the TASK_TIMEOUT_SECONDS setting);
`tasks.deferrals` how often its processor asked to run later (bounded by MAX_DEFERRALS).

taskapp_publish() gains a last argument, `data`, merged into the event: a progress report or a
chunk of live output rides in the event itself, since live output is not stored. The function
is dropped and made again (not replaced): an overload with one more defaulted argument would
make every existing call ambiguous.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_AT = (
    "replace(to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), '.000000', '')"
    " || '+00:00'"
)

_PUBLISH_WITH_DATA = f"""
CREATE FUNCTION taskapp_publish(
    event_type text, task_id bigint, status text, instance_id text,
    conversation_id bigint DEFAULT NULL, run_after timestamptz DEFAULT NULL,
    data jsonb DEFAULT NULL
) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    at text := {_AT};
    event json := CASE
        WHEN conversation_id IS NULL THEN json_build_object(
            'type', event_type, 'task_id', task_id, 'status', status,
            'instance_id', instance_id, 'at', at)
        ELSE json_build_object(
            'type', event_type, 'task_id', task_id, 'status', status,
            'instance_id', instance_id, 'at', at, 'conversation_id', conversation_id)
    END;
BEGIN
    IF data IS NOT NULL THEN
        event := (event::jsonb || data)::json;
    END IF;
    PERFORM pg_notify('taskapp_events', event::text);
    IF status = 'pending' AND run_after <= now() + interval '1 hour' THEN
        PERFORM pg_notify('taskapp_wakeup', '');
    END IF;
END
$$
"""

_PUBLISH_WITHOUT_DATA = f"""
CREATE FUNCTION taskapp_publish(
    event_type text, task_id bigint, status text, instance_id text,
    conversation_id bigint DEFAULT NULL, run_after timestamptz DEFAULT NULL
) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    at text := {_AT};
BEGIN
    PERFORM pg_notify('taskapp_events', CASE
        WHEN conversation_id IS NULL THEN json_build_object(
            'type', event_type, 'task_id', task_id, 'status', status,
            'instance_id', instance_id, 'at', at)
        ELSE json_build_object(
            'type', event_type, 'task_id', task_id, 'status', status,
            'instance_id', instance_id, 'at', at, 'conversation_id', conversation_id)
    END::text);
    IF status = 'pending' AND run_after <= now() + interval '1 hour' THEN
        PERFORM pg_notify('taskapp_wakeup', '');
    END IF;
END
$$
"""


def upgrade():
    op.add_column("tasks", sa.Column("progress", JSONB(), nullable=True))
    op.add_column("tasks", sa.Column("timeout_seconds", sa.Integer(), nullable=True))
    op.add_column("tasks", sa.Column("deferrals", sa.Integer(), server_default="0", nullable=False))
    op.create_check_constraint(
        "timeout_seconds_positive", "tasks", "timeout_seconds > 0"
    )
    op.execute("DROP FUNCTION taskapp_publish(text, bigint, text, text, bigint, timestamptz)")
    op.execute(_PUBLISH_WITH_DATA)


def downgrade():
    op.execute(
        "DROP FUNCTION taskapp_publish(text, bigint, text, text, bigint, timestamptz, jsonb)"
    )
    op.execute(_PUBLISH_WITHOUT_DATA)
    op.drop_constraint("timeout_seconds_positive", "tasks")
    op.drop_column("tasks", "deferrals")
    op.drop_column("tasks", "timeout_seconds")
    op.drop_column("tasks", "progress")
