"""One definition of an event: taskapp_publish(), called by every statement that changes a task.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 23:30:00

Every change of a task or conversation sends one JSON event on `taskapp_events`, inside the
changing transaction (so it goes out only on commit). Its shape used to be spelled out in
Python and five times in the queue's SQL; now it exists here alone. Given the `run_after` of a
`pending` task due within the hour, it also wakes idle workers on `taskapp_wakeup`: they claim
it if it is due, or else sleep until it instead of for a whole poll interval (a task due later
is found by their regular polls). `at` has the API's time format: microseconds only when
non-zero.
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    op.execute(
        """
CREATE FUNCTION taskapp_publish(
    event_type text, task_id bigint, status text, instance_id text,
    conversation_id bigint DEFAULT NULL, run_after timestamptz DEFAULT NULL
) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    at text := replace(to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'),
                       '.000000', '') || '+00:00';
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
    )


def downgrade():
    op.execute("DROP FUNCTION taskapp_publish(text, bigint, text, text, bigint, timestamptz)")
