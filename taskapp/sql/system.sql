-- What an instance reports about itself and the cluster, and the plain utilities.
-- Each statement starts with "-- name: NAME" and a one-line purpose (taskapp/statements.py).

-- name: ping
-- Whether the database answers (GET /health).
SELECT 1;

-- name: schema_version
-- The revision the schema is at (GET /readyz compares it with this code's head).
SELECT version_num FROM alembic_version;

-- name: autovacuum_on
-- Whether the server runs autovacuum: the hot tables bloat without it (the housekeeper warns).
SELECT current_setting('autovacuum') = 'on' AS running;

-- name: notify
-- An empty NOTIFY on a channel, sent at once.
SELECT pg_notify(:channel, '');

-- name: announce_streams
-- "A stream is open here": PostgreSQL sends events for :seconds more (the gate in front of
-- taskapp_publish(), migration 0011), and every listener hears it on :channel.
SELECT taskapp_watch_events(:seconds) AS until, pg_notify(:channel, '') AS notified;

-- name: queue_counts
-- Tasks by status, from the counts the triggers keep (cheap at any table size).
SELECT status, CAST(sum(n) AS bigint) AS n FROM task_counts GROUP BY status;

-- name: oldest_pending_age
-- Seconds since the oldest due pending task became claimable (0 when none).
SELECT coalesce(extract(epoch FROM now() - min(run_after)), 0) AS seconds
FROM tasks
WHERE status = 'pending' AND run_after <= now();
