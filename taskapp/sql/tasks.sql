-- The API's reads and writes of tasks and conversations (taskapp/services.py runs them).
-- Each statement starts with "-- name: NAME" and a one-line purpose (taskapp/statements.py).
-- {{ task_json(t) }} and its siblings are the API's JSON of a row, generated from the output
-- schemas (taskapp/representation.py). Events go out through taskapp_publish() (migration
-- 0004), on commit; given the run_after of a pending task due soon, it wakes idle workers.

-- name: get_task
-- One task with its conversations and error history, as GET /tasks/{id} shows it.
SELECT t.id, {{ task_json(t) }}::text AS json FROM tasks AS t WHERE t.id = :task_id;

-- name: lock_task
-- A task as GET /tasks/{id} shows it, its row locked until the transaction ends: what a
-- conditional write (If-Match) compares with, the row unchanged by any other writer meanwhile.
SELECT t.id, {{ task_json(t) }}::text AS json FROM tasks AS t WHERE t.id = :task_id FOR UPDATE;

-- name: task_status
-- A task's status (no row: no such task), for a 409's message.
SELECT status FROM tasks WHERE id = :task_id;

-- name: list_tasks
-- A page of tasks ordered by id, of one status and/or queue, and the total from the counts
-- the triggers keep (migrations 0002, 0007): the same cost at any table size.
SELECT (SELECT coalesce(sum(n), 0) FROM task_counts
        WHERE (CAST(:status AS text) IS NULL OR status = :status)
          AND (CAST(:queue AS text) IS NULL OR queue = :queue)) AS total,
       (SELECT coalesce(json_agg(item ORDER BY id), '[]')::text
        FROM (SELECT t.id, {{ task_list_item_json(t) }} AS item
              FROM tasks AS t
              WHERE (CAST(:status AS text) IS NULL OR t.status = :status)
                AND (CAST(:queue AS text) IS NULL OR t.queue = :queue)
              ORDER BY t.id
              LIMIT :limit OFFSET :offset) AS page) AS json;

-- name: create_task
-- Insert a pending task and its conversations, send task.created, return the task's JSON.
WITH t AS (
    INSERT INTO tasks (title, description, priority, scheduled_for, run_after, max_attempts,
                       timeout_seconds, queue, concurrency_key)
    VALUES (:title, :description, :priority, :scheduled_for,
            coalesce(CAST(:scheduled_for AS timestamptz), now()), :max_attempts,
            :timeout_seconds, :queue, :concurrency_key)
    RETURNING *
), c AS (
    INSERT INTO conversations (task_id, content)
    SELECT t.id, x.content
    FROM t, unnest(CAST(:contents AS text[])) WITH ORDINALITY AS x(content, n)
    ORDER BY x.n
    RETURNING *
)
SELECT t.id, {{ task_json(t, c) }}::text AS json,
       taskapp_publish('task.created', t.id, t.status, :instance_id, NULL, t.run_after) AS notified
FROM t;

-- name: claim_idempotency_key
-- Take an Idempotency-Key for this request (no row: another request has it).
INSERT INTO idempotency_keys (key, fingerprint, response) VALUES (:key, :fingerprint, 'null')
ON CONFLICT (key) DO NOTHING
RETURNING key;

-- name: idempotent_response
-- The first response stored for an Idempotency-Key, with the body's fingerprint.
SELECT fingerprint, CAST(response ->> 'id' AS bigint) AS task_id, response::text AS json
FROM idempotency_keys
WHERE key = :key;

-- name: store_idempotent_response
-- Keep the first response to an Idempotency-Key, to replay it byte for byte.
UPDATE idempotency_keys SET task_id = :task_id, response = CAST(:json AS json) WHERE key = :key;

-- name: update_task
-- Change the fields flagged set_*; a new scheduled_for also moves a pending task's run time.
-- A processing task keeps its queue and key (no row: the task is processing, or missing), so
-- what runs per key is always what its claims admitted.
WITH u AS (
    UPDATE tasks
    SET title = CASE WHEN :set_title THEN :title ELSE title END,
        description = CASE WHEN :set_description THEN :description ELSE description END,
        priority = CASE WHEN :set_priority THEN CAST(:priority AS integer) ELSE priority END,
        scheduled_for = CASE WHEN :set_scheduled_for
                             THEN CAST(:scheduled_for AS timestamptz) ELSE scheduled_for END,
        -- Only a pending task waits on run_after; for the others it belongs to the worker.
        run_after = CASE WHEN :set_scheduled_for AND status = 'pending'
                         THEN coalesce(CAST(:scheduled_for AS timestamptz), now())
                         ELSE run_after END,
        max_attempts = CASE WHEN :set_max_attempts
                            THEN CAST(:max_attempts AS integer) ELSE max_attempts END,
        timeout_seconds = CASE WHEN :set_timeout_seconds
                               THEN CAST(:timeout_seconds AS integer) ELSE timeout_seconds END,
        queue = CASE WHEN :set_queue THEN CAST(:queue AS text) ELSE queue END,
        concurrency_key = CASE WHEN :set_concurrency_key
                               THEN CAST(:concurrency_key AS text) ELSE concurrency_key END,
        updated_at = now()
    WHERE id = :task_id
      AND NOT ((:set_queue OR :set_concurrency_key) AND status = 'processing')
    RETURNING *
)
SELECT u.id, {{ task_json(u) }}::text AS json,
       taskapp_publish('task.updated', u.id, u.status, :instance_id, NULL,
                       CASE WHEN :set_scheduled_for OR :set_queue OR :set_concurrency_key
                            THEN u.run_after END) AS notified
FROM u;

-- name: delete_task
-- Delete a task (its conversations and errors cascade) and send task.deleted; the holder of
-- a processing one is told on taskapp_cancel, so its processor stops.
WITH d AS (
    DELETE FROM tasks WHERE id = :task_id RETURNING id, status
)
SELECT id, taskapp_publish('task.deleted', id, status, :instance_id) AS notified,
       CASE WHEN status = 'processing' THEN pg_notify('taskapp_cancel', CAST(id AS text))
       END AS revoked
FROM d;

-- name: retry_task
-- A task in one of :from_states back to pending with fresh attempts, its conversations active
-- (results, progress and processed times cleared: the rerun does every conversation again).
WITH r AS (
    UPDATE tasks
    SET status = 'pending',
        attempts = 0,
        deferrals = 0,
        progress = NULL,
        run_after = now(),
        lease_token = NULL,
        lease_expires_at = NULL,
        processing_instance_id = NULL,
        processed_at = NULL,
        result = NULL,
        updated_at = now()
    WHERE id = :task_id AND status = ANY(CAST(:from_states AS text[]))
    RETURNING id, status, run_after
), reactivated AS (
    UPDATE conversations
    SET status = 'active', result = NULL, processed_at = NULL, updated_at = now()
    WHERE task_id IN (SELECT id FROM r)
      AND (status <> 'active' OR result IS NOT NULL OR processed_at IS NOT NULL)
)
SELECT id, taskapp_publish('task.updated', id, status, :instance_id, NULL, run_after) AS notified
FROM r;

-- name: cancel_task
-- A task in one of :from_states to cancelled; returns its JSON. A processing task's lease is
-- revoked (its late writes are fenced off) and its holder told on taskapp_cancel.
WITH old AS (
    SELECT id, status FROM tasks WHERE id = :task_id FOR UPDATE
), u AS (
    UPDATE tasks AS t
    SET status = 'cancelled', lease_token = NULL, lease_expires_at = NULL, updated_at = now()
    FROM old
    WHERE t.id = old.id AND old.status = ANY(CAST(:from_states AS text[]))
    RETURNING t.*, old.status AS was
)
SELECT u.id, {{ task_json(u) }}::text AS json,
       taskapp_publish('task.cancelled', u.id, u.status, :instance_id) AS notified,
       CASE WHEN u.was = 'processing' THEN pg_notify('taskapp_cancel', CAST(u.id AS text))
       END AS revoked
FROM u;

-- name: create_conversation
-- Add a conversation to a task that has fewer than :max_conversations, send
-- conversation.created (no row: no such task; id NULL: the task is full).
WITH t AS (
    -- FOR KEY SHARE: the task can't be deleted meanwhile, yet workers can still update it.
    -- (So concurrent adds may each see room: the cap can be passed by as many at once.)
    SELECT id, status, (SELECT count(*) FROM conversations WHERE task_id = tasks.id) AS count
    FROM tasks WHERE id = :task_id FOR KEY SHARE
), c AS (
    INSERT INTO conversations (task_id, content)
    SELECT id, :content FROM t WHERE t.count < :max_conversations
    RETURNING *
)
SELECT c.id, CASE WHEN c.id IS NOT NULL THEN {{ conversation_json(c) }}::text END AS json,
       CASE WHEN c.id IS NOT NULL
            THEN taskapp_publish('conversation.created', t.id, t.status, :instance_id, c.id)
       END AS notified
FROM t LEFT JOIN c ON true;

-- name: list_conversations
-- A task's conversations ordered by id; task_status NULL: no such task.
SELECT (SELECT status FROM tasks WHERE id = :task_id) AS task_status,
       (SELECT coalesce(json_agg({{ conversation_json(c) }} ORDER BY c.id), '[]')::text
        FROM conversations AS c WHERE c.task_id = :task_id) AS json;

-- name: get_conversation
-- One conversation, as the API shows it.
SELECT c.id, {{ conversation_json(c) }}::text AS json FROM conversations AS c
WHERE c.id = :conversation_id;

-- name: update_conversation
-- Change the fields flagged set_*, send conversation.updated with its task's status. New
-- content bumps the revision and makes the conversation active again (unless a status is
-- sent): `processed` means the processor finished this content. Active means no result.
WITH u AS (
    UPDATE conversations AS c
    SET content = CASE WHEN :set_content THEN :content ELSE c.content END,
        revision = c.revision + CASE WHEN :set_content AND :content <> c.content THEN 1 ELSE 0 END,
        status = CASE WHEN :set_status THEN CAST(:status AS text)
                      WHEN :set_content AND :content <> c.content THEN 'active'
                      ELSE c.status END,
        result = CASE WHEN (:set_status AND :status = 'active')
                           OR (NOT :set_status AND :set_content AND :content <> c.content)
                      THEN NULL ELSE c.result END,
        processed_at = CASE WHEN (:set_status AND :status = 'active')
                                 OR (NOT :set_status AND :set_content AND :content <> c.content)
                                 OR c.status = 'active' AND NOT :set_status
                            THEN NULL
                            ELSE coalesce(c.processed_at, now()) END,
        updated_at = now()
    WHERE c.id = :conversation_id
    RETURNING c.*
)
SELECT u.id, {{ conversation_json(u) }}::text AS json,
       taskapp_publish('conversation.updated', t.id, t.status, :instance_id, u.id) AS notified
FROM u JOIN tasks AS t ON t.id = u.task_id;
