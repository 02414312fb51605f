-- Retention: finished tasks deleted once they are older than their status's retention
-- (taskapp/housekeeper.py runs it; RETENTION_*_SECONDS, 0 keeps them for ever).

-- name: prune_finished
-- Delete up to :batch tasks of one finished :status not changed for :keep_seconds, oldest
-- first (their conversations and errors cascade; the counts' trigger follows). SKIP LOCKED:
-- instances pruning at once take different rows, and none waits on a task being changed.
-- No events: a pruned task was finished long ago.
WITH expired AS (
    SELECT id FROM tasks
    WHERE status = :status AND updated_at < now() - make_interval(secs => :keep_seconds)
    ORDER BY updated_at
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
DELETE FROM tasks AS t
USING expired
WHERE t.id = expired.id
RETURNING t.id;
