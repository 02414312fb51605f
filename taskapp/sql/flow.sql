-- Flow control's reads and writes through the API (taskapp/flow.py runs them): the queues,
-- their concurrency keys, their limits, pause and resume. The claim that obeys them is in
-- queue.sql and taskapp_admit() (migration 0007). {{ queue_json(row, name) }} and
-- {{ key_json(row, queue, key, rule) }} are the API's JSON (taskapp/representation.py).
-- A change that may let tasks start wakes idle workers on taskapp_wakeup.

-- name: list_queues
-- Every queue configured or holding tasks, by name.
SELECT coalesce(json_agg({{ queue_json(q, n.name) }} ORDER BY n.name), '[]')::text AS json
FROM taskapp_known_queues() AS n(name)
LEFT JOIN queues AS q ON q.name = n.name;

-- name: get_queue
-- One queue (a queue nobody configured has no limits and no tasks, and still exists).
SELECT {{ queue_json(q, n.name) }}::text AS json
FROM (SELECT CAST(:name AS text) AS name) AS n
LEFT JOIN queues AS q ON q.name = n.name;

-- name: configure_queue
-- Set the limits flagged set_* (NULL removes one). A new rate starts with a full burst.
WITH u AS (
    INSERT INTO queues AS q (name, rate_limit, rate_period_seconds, rate_burst,
                             key_concurrency_limit, key_rate_limit, key_rate_period_seconds,
                             key_rate_burst)
    VALUES (:name, :rate_limit, :rate_period_seconds, :rate_burst, :key_concurrency_limit,
            :key_rate_limit, :key_rate_period_seconds, :key_rate_burst)
    ON CONFLICT (name) DO UPDATE
    SET rate_limit = CASE WHEN :set_rate_limit THEN excluded.rate_limit ELSE q.rate_limit END,
        rate_period_seconds = CASE WHEN :set_rate_limit THEN excluded.rate_period_seconds
                                   ELSE q.rate_period_seconds END,
        rate_burst = CASE WHEN :set_rate_limit THEN excluded.rate_burst ELSE q.rate_burst END,
        rate_tat = CASE WHEN :set_rate_limit THEN NULL ELSE q.rate_tat END,
        rate_ready_at = CASE WHEN :set_rate_limit THEN NULL ELSE q.rate_ready_at END,
        key_concurrency_limit = CASE WHEN :set_key_concurrency_limit
                                     THEN excluded.key_concurrency_limit
                                     ELSE q.key_concurrency_limit END,
        key_rate_limit = CASE WHEN :set_key_rate_limit THEN excluded.key_rate_limit
                              ELSE q.key_rate_limit END,
        key_rate_period_seconds = CASE WHEN :set_key_rate_limit
                                       THEN excluded.key_rate_period_seconds
                                       ELSE q.key_rate_period_seconds END,
        key_rate_burst = CASE WHEN :set_key_rate_limit THEN excluded.key_rate_burst
                              ELSE q.key_rate_burst END,
        updated_at = now()
    RETURNING *
), fresh_key_rates AS (
    -- Keys following the queue's default rate start it afresh too.
    UPDATE concurrency_keys
    SET rate_tat = NULL, rate_ready_at = NULL
    WHERE queue = :name AND :set_key_rate_limit AND rate_limit IS NULL
)
SELECT {{ queue_json(u, u.name) }}::text AS json, pg_notify('taskapp_wakeup', '') AS woken
FROM u;

-- name: pause_queue
-- Pause or resume a queue cluster-wide. The gate (taskapp_flow_lock(name, NULL)) is taken
-- exclusively: the pause waits for claims in flight, and once it commits no claim admits a
-- task of the queue. Resuming wakes idle workers at once.
WITH gate AS (
    SELECT pg_advisory_xact_lock(taskapp_flow_lock(:name, NULL)) AS locked
), u AS (
    INSERT INTO queues AS q (name, paused)
    SELECT :name, :paused FROM gate
    ON CONFLICT (name) DO UPDATE SET paused = excluded.paused, updated_at = now()
    RETURNING *
)
SELECT {{ queue_json(u, u.name) }}::text AS json,
       CASE WHEN NOT u.paused THEN pg_notify('taskapp_wakeup', '') END AS woken
FROM u;

-- name: list_keys
-- A queue's keys that have limits or state of their own, or tasks running, by key.
WITH names AS (
    SELECT queue, key FROM concurrency_keys WHERE queue = :queue
    UNION
    SELECT queue, concurrency_key FROM tasks
    WHERE status = 'processing' AND queue = :queue AND concurrency_key IS NOT NULL
    ORDER BY 2
    LIMIT :limit
)
SELECT coalesce(json_agg({{ key_json(k, n.queue, n.key, r) }} ORDER BY n.key), '[]')::text
       AS json
FROM names AS n
LEFT JOIN concurrency_keys AS k ON k.queue = n.queue AND k.key = n.key
CROSS JOIN LATERAL taskapp_key_rule(n.queue, n.key) AS r;

-- name: get_key
-- One key of a queue, with the limits that hold for it (no row: it has no limits or state of
-- its own and runs nothing).
SELECT {{ key_json(k, n.queue, n.key, r) }}::text AS json
FROM (SELECT CAST(:queue AS text) AS queue, CAST(:key AS text) AS key) AS n
LEFT JOIN concurrency_keys AS k ON k.queue = n.queue AND k.key = n.key
CROSS JOIN LATERAL taskapp_key_rule(n.queue, n.key) AS r
WHERE k.key IS NOT NULL
   OR EXISTS (SELECT 1 FROM tasks AS t WHERE t.status = 'processing' AND t.queue = n.queue
              AND t.concurrency_key = n.key);

-- name: configure_key
-- Set a key's own limits flagged set_* (NULL: its queue's default). A new rate starts with
-- a full burst.
INSERT INTO concurrency_keys AS k (queue, key, concurrency_limit, rate_limit,
                                   rate_period_seconds, rate_burst)
VALUES (:queue, :key, :concurrency_limit, :rate_limit, :rate_period_seconds, :rate_burst)
ON CONFLICT (queue, key) DO UPDATE
SET concurrency_limit = CASE WHEN :set_concurrency_limit THEN excluded.concurrency_limit
                             ELSE k.concurrency_limit END,
    rate_limit = CASE WHEN :set_rate_limit THEN excluded.rate_limit ELSE k.rate_limit END,
    rate_period_seconds = CASE WHEN :set_rate_limit THEN excluded.rate_period_seconds
                               ELSE k.rate_period_seconds END,
    rate_burst = CASE WHEN :set_rate_limit THEN excluded.rate_burst ELSE k.rate_burst END,
    rate_tat = CASE WHEN :set_rate_limit THEN NULL ELSE k.rate_tat END,
    rate_ready_at = CASE WHEN :set_rate_limit THEN NULL ELSE k.rate_ready_at END,
    updated_at = now()
RETURNING pg_notify('taskapp_wakeup', '') AS woken;

-- name: delete_key
-- Forget a key's own limits, throttle and rate state (no row: it had none); its queue's
-- defaults hold again, with a fresh burst.
DELETE FROM concurrency_keys
WHERE queue = :queue AND key = :key
RETURNING pg_notify('taskapp_wakeup', '') AS woken;

-- name: flow_gauges
-- Per queue, for /metrics: tasks running, keys that can start nothing now, paused, and
-- whether the queue as a whole can start nothing (out of rate or throttled).
WITH names AS (
    SELECT name FROM taskapp_known_queues() AS n(name) ORDER BY name LIMIT :limit
)
SELECT n.name,
       (SELECT coalesce(sum(tc.n), 0) FROM task_counts AS tc
        WHERE tc.queue = n.name AND tc.status = 'processing') AS running,
       (SELECT count(*) FROM concurrency_keys AS k
        WHERE k.queue = n.name
          AND (k.rate_ready_at > now() OR k.throttled_until > now())) AS throttled_keys,
       coalesce(c.paused, false) AS paused,
       coalesce(c.until > now(), false) AS throttled
FROM names AS n
LEFT JOIN taskapp_closed_queues(ARRAY(SELECT name FROM names)) AS c ON c.name = n.name
ORDER BY n.name;
