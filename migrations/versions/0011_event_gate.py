"""Events only while someone watches: a cluster-wide gate in front of taskapp_publish().

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 13:00:00

Events reach clients only through streams (GET /events, /ws), and instances listen to them
only while a stream is open somewhere in the cluster and LINGER_SECONDS after
(taskapp/events.py). Yet every change built and sent its event all the same: in a drain, two
per task in the claim's own statement, where a pgbench of that statement ran 15 % faster
without them, and every listening instance's backend read each one off the notification queue
to drop it. Now the instances that hold streams say so here too, every ANNOUNCE_SECONDS
(taskapp_watch_events(), the row's `watched_until`), and taskapp_publish() sends an event only
until then. Wake-ups (`taskapp_wakeup`) are sent as before: they are not events.

A client that LISTENs on `taskapp_events` itself (a test, a bench) calls
taskapp_watch_events(seconds) first, as the instances do. Without its row the gate reads as
open: events are never lost to a missing row, only sent in vain.
"""

from alembic import context, op
from alembic.script import ScriptDirectory

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_AT = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"

_EVENT = """json_build_object(
            'id', event_id, 'type', event_type, 'task_id', task_id, 'status', status,
            'instance_id', instance_id, 'at', at{conversation})"""

_MERGED = """'{"id" : ' || event_id || ', ' || substr(((event::jsonb - 'id') || data)::text, 2)"""

_SIGNATURE = """taskapp_publish(
    event_type text, task_id bigint, status text, instance_id text,
    conversation_id bigint DEFAULT NULL, run_after timestamptz DEFAULT NULL,
    data jsonb DEFAULT NULL
) RETURNS void LANGUAGE plpgsql VOLATILE AS $$"""

_EVENT_CASE = f"""CASE
        WHEN conversation_id IS NULL THEN {_EVENT.format(conversation="")}
        ELSE {_EVENT.format(conversation=", 'conversation_id', conversation_id")}
    END"""

_GATED_PUBLISH = f"""
CREATE OR REPLACE FUNCTION {_SIGNATURE}
DECLARE
    event_id bigint;
    at text;
    event json;
BEGIN
    IF status = 'pending' AND run_after <= now() + interval '1 hour' THEN
        PERFORM pg_notify('taskapp_wakeup', '');
    END IF;
    IF NOT taskapp_events_watched() THEN
        RETURN;
    END IF;
    event_id := nextval('taskapp_event_ids');
    at := {_AT};
    event := {_EVENT_CASE};
    IF data IS NOT NULL THEN
        PERFORM pg_notify('taskapp_events', {_MERGED});
    ELSE
        PERFORM pg_notify('taskapp_events', event::text);
    END IF;
END
$$
"""

def _publish_of_revision_0009() -> str:
    """The function as revision 0009 made it, from that revision's own script."""
    scripts = ScriptDirectory.from_config(context.config)
    return scripts.get_revision("0009").module._publish(with_ids=True)


def upgrade():
    op.execute("""
        CREATE TABLE event_watch (
            only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
            watched_until timestamptz NOT NULL DEFAULT '-infinity'
        )""")
    # Closed until an instance with a stream opens it. During a rolling upgrade the streams of
    # instances still on the revision before (which don't open it) go quiet; their clients
    # reconnect, reach an upgraded instance, and are told to re-fetch (`stream.reset`).
    op.execute("INSERT INTO event_watch DEFAULT VALUES")
    op.execute("""
        CREATE FUNCTION taskapp_events_watched() RETURNS boolean LANGUAGE sql STABLE AS $$
            SELECT coalesce((SELECT watched_until > now() FROM event_watch), true)
        $$""")
    op.execute("""
        CREATE FUNCTION taskapp_watch_events(seconds double precision)
        RETURNS timestamptz LANGUAGE sql VOLATILE AS $$
            UPDATE event_watch
            SET watched_until = greatest(watched_until, now() + make_interval(secs => seconds))
            RETURNING watched_until
        $$""")
    op.execute(_GATED_PUBLISH)


def downgrade():
    op.execute(_publish_of_revision_0009())
    op.execute("DROP FUNCTION taskapp_watch_events(double precision)")
    op.execute("DROP FUNCTION taskapp_events_watched()")
    op.execute("DROP TABLE event_watch")
