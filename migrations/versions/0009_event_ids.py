"""Event ids for resumable streams, and one fixed format for an event's `at`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 19:30:00

taskapp_publish() now numbers every event from the sequence `taskapp_event_ids` and puts the
number first in its JSON (`{"id" : 42, "type" : …}`): the same id on every instance, since
every instance hears the same NOTIFY, so a stream client that reconnects to any instance can
say where it stopped (SSE `Last-Event-ID`, `/ws?last_event_id=`) and be sent what it missed
from that instance's ring of recent events (taskapp/events.py). `nextval` is the whole cost on
the claim's path: no table is written. The id leads the JSON text, also when `data` is merged
in (jsonb would sort the keys), so the listener reads it without parsing the event.

`at` is always `YYYY-MM-DDTHH:MM:SS.ffffff+00:00` (RFC 3339, UTC, six fractional digits):
it used to drop the fraction when it was zero, so a client saw two formats.

The function keeps its signature and is replaced in place (CREATE OR REPLACE): the statements
that call it are unchanged.
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_AT = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"
_AT_BEFORE = (
    "replace(to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US'), '.000000', '')"
    " || '+00:00'"
)


def _publish(with_ids: bool) -> str:
    at = _AT if with_ids else _AT_BEFORE
    id_member = "'id', event_id, " if with_ids else ""
    # jsonb's || sorts keys (shortest first): `id` is put back in front by hand.
    merged = (
        """'{"id" : ' || event_id || ', ' || substr(((event::jsonb - 'id') || data)::text, 2)"""
        if with_ids
        else "(event::jsonb || data)::text"
    )
    declare_id = "event_id bigint := nextval('taskapp_event_ids');" if with_ids else ""
    return f"""
CREATE OR REPLACE FUNCTION taskapp_publish(
    event_type text, task_id bigint, status text, instance_id text,
    conversation_id bigint DEFAULT NULL, run_after timestamptz DEFAULT NULL,
    data jsonb DEFAULT NULL
) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    {declare_id}
    at text := {at};
    event json := CASE
        WHEN conversation_id IS NULL THEN json_build_object(
            {id_member}'type', event_type, 'task_id', task_id, 'status', status,
            'instance_id', instance_id, 'at', at)
        ELSE json_build_object(
            {id_member}'type', event_type, 'task_id', task_id, 'status', status,
            'instance_id', instance_id, 'at', at, 'conversation_id', conversation_id)
    END;
BEGIN
    IF data IS NOT NULL THEN
        PERFORM pg_notify('taskapp_events', {merged});
    ELSE
        PERFORM pg_notify('taskapp_events', event::text);
    END IF;
    IF status = 'pending' AND run_after <= now() + interval '1 hour' THEN
        PERFORM pg_notify('taskapp_wakeup', '');
    END IF;
END
$$
"""


def upgrade():
    # CACHE 1 (the default): ids are handed out in the order the statements ask for them,
    # whichever session asks; a per-session cache would send them out of order by hundreds.
    op.execute("CREATE SEQUENCE taskapp_event_ids AS bigint")
    op.execute(_publish(with_ids=True))


def downgrade():
    op.execute(_publish(with_ids=False))
    op.execute("DROP SEQUENCE taskapp_event_ids")
