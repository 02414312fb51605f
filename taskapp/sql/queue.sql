-- The queue's SQL: every statement that claims, finishes or takes back a task.
-- Each statement starts with "-- name: NAME" and a one-line purpose; taskapp/queue.py loads them.
-- Events are sent with taskapp_publish() (migrations 0004, 0011) inside the same statement, so
-- they go out only on commit, and only while a stream is open in the cluster (the claim skips
-- even the call then: its events are two per task); given the run_after of a pending task due
-- soon, it wakes idle workers whether or not anyone watches.

-- name: complete_and_claim
-- Finish tasks for their lease holders, then lease the most urgent due pending tasks of each
-- queue this instance serves (lock, admit, update, return), in one round trip: the
-- dispatcher's every round (taskapp/dispatcher.py). :task_ids, :lease_tokens and :results
-- are parallel arrays of the completions (empty: a plain claim); :queues and :limits say how
-- many tasks of each queue to claim (0: none). Candidates skip paused, throttled or
-- rate-exhausted queues and the keys taskapp_blocked_keys() names (no head-of-line
-- blocking); taskapp_admit() (migration 0007) decides which candidates may start, and
-- `refused` counts the others, so the dispatcher tries again at once. One row per new claim, or a single row of NULLs
-- with none; one row carries `finished` (the others NULL: parsed once, not once a row), a
-- JSON array of {"id", "status"} for each completion that applied (one missing: lease lost
-- or task deleted). A finish's status is
-- `completed`, or `pending` when conversations the attempt never saw (added or edited after
-- its claim) are still active, for a continuation run that does not spend an attempt. A
-- finish marks `processed` only the conversations of its claim's snapshot still at the
-- revision it saw, and stores its result (the processor's return value as JSON text, or
-- NULL) with the same write. A claim hands the processor only the `active` conversations and
-- keeps their revisions as its snapshot (claim_snapshot); `processed` lists the done ones
-- with their results (JSON text, NULL for none: most tasks of a busy queue have nothing to
-- parse in one or the other). Run on its generic plan: planning it anew each round cost more than
-- running it (taskapp.database).
-- plan: generic
WITH finishing AS (
    SELECT f.task_id, f.lease_token, f.result
    FROM unnest(CAST(:task_ids AS bigint[]), CAST(:lease_tokens AS uuid[]),
                CAST(:results AS text[])) AS f(task_id, lease_token, result)
), held AS (
    SELECT t.id, t.claim_snapshot, f.result
    FROM tasks AS t
    JOIN finishing AS f ON t.id = f.task_id AND t.lease_token = f.lease_token
    ORDER BY t.id
    FOR UPDATE OF t
), seen AS (
    UPDATE conversations AS c
    SET status = 'processed', processed_at = now(), updated_at = now()
    FROM held
    WHERE c.task_id = held.id AND c.status = 'active'
      AND c.revision = CAST(held.claim_snapshot ->> CAST(c.id AS text) AS integer)
    RETURNING c.id
), unseen AS MATERIALIZED (
    -- Per held task, not a join with a GROUP BY: the planner takes `held` for one row, and
    -- joined that aggregate to it in a nested loop, quadratic in the batch (1.5 ms of 100).
    SELECT held.id, held.result,
           (SELECT count(*) FROM conversations AS c
            WHERE c.task_id = held.id AND c.status = 'active'
              AND c.id NOT IN (SELECT id FROM seen)) AS n
    FROM held
), done AS (
    UPDATE tasks AS t
    SET status = CASE WHEN unseen.n = 0 THEN 'completed' ELSE 'pending' END,
        processed_at = CASE WHEN unseen.n = 0 THEN now() ELSE t.processed_at END,
        attempts = CASE WHEN unseen.n = 0 THEN t.attempts ELSE greatest(t.attempts - 1, 0) END,
        run_after = CASE WHEN unseen.n = 0 THEN t.run_after ELSE now() END,
        processing_instance_id = CASE WHEN unseen.n = 0 THEN t.processing_instance_id END,
        result = CAST(unseen.result AS jsonb),
        updated_at = now(),
        lease_token = NULL,
        lease_expires_at = NULL
    FROM unseen
    WHERE t.id = unseen.id
    RETURNING t.id, t.status, t.run_after
), completion AS (
    SELECT id, status,
           CASE WHEN status = 'pending' OR (SELECT taskapp_events_watched())
                THEN taskapp_publish(CASE WHEN status = 'completed' THEN 'task.completed'
                                          ELSE 'task.updated' END,
                                     id, status, :instance_id, NULL,
                                     CASE WHEN status = 'pending' THEN run_after END)
           END AS notified
    FROM done
), blocked AS (
    SELECT b.queue, b.key FROM taskapp_blocked_keys(CAST(:queues AS text[])) AS b
), closed AS (
    SELECT c.name FROM taskapp_closed_queues(CAST(:queues AS text[])) AS c
), next AS (
    SELECT c.id, c.queue, c.concurrency_key, c.priority
    FROM unnest(CAST(:queues AS text[]), CAST(:limits AS integer[])) AS q(name, wanted)
    CROSS JOIN LATERAL (
        SELECT t.id, t.queue, t.concurrency_key, t.priority
        FROM tasks AS t
        WHERE t.status = 'pending' AND t.queue = q.name AND t.run_after <= now()
          AND q.wanted > 0
          AND NOT EXISTS (SELECT 1 FROM closed WHERE closed.name = q.name)
          AND (t.concurrency_key IS NULL
               OR NOT EXISTS (SELECT 1 FROM blocked AS b
                              WHERE b.queue = t.queue AND b.key = t.concurrency_key))
        ORDER BY t.priority DESC, t.id
        LIMIT q.wanted
        FOR UPDATE OF t SKIP LOCKED
    ) AS c
), admitted AS (
    SELECT a.task_id, a.started_at
    FROM (SELECT array_agg(id ORDER BY priority DESC, id) AS ids,
                 array_agg(queue ORDER BY priority DESC, id) AS queues,
                 array_agg(concurrency_key ORDER BY priority DESC, id) AS keys
          FROM next) AS n
    CROSS JOIN LATERAL taskapp_admit(n.ids, n.queues, n.keys) AS a
), claimed AS (
    UPDATE tasks AS t
    SET status = 'processing',
        attempts = t.attempts + 1,
        processing_instance_id = :instance_id,
        lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => :lease_seconds),
        started_at = admitted.started_at,
        claim_snapshot = coalesce(work.snapshot, '{}'),
        updated_at = now()
    FROM admitted
    -- One look at the task's conversations for its snapshot and for what the processor gets.
    CROSS JOIN LATERAL (
        SELECT jsonb_object_agg(CAST(v.id AS text), v.revision)
                   FILTER (WHERE v.status = 'active') AS snapshot,
               CAST(json_agg(json_build_object('id', v.id, 'content', v.content) ORDER BY v.id)
                        FILTER (WHERE v.status = 'active') AS text) AS conversations,
               CAST(json_agg(json_build_object('id', v.id, 'result', v.result) ORDER BY v.id)
                        FILTER (WHERE v.status = 'processed') AS text) AS processed
        FROM conversations AS v
        WHERE v.task_id = admitted.task_id
    ) AS work
    WHERE t.id = admitted.task_id
    RETURNING t.id, t.title, t.description, t.priority, t.attempts, t.max_attempts, t.lease_token,
              t.timeout_seconds, t.queue, t.concurrency_key, work.conversations, work.processed
)
SELECT CASE WHEN row_number() OVER () = 1
            THEN (SELECT CAST(coalesce(json_agg(json_build_object('id', id, 'status', status)),
                                       '[]') AS text)
                  FROM completion) END AS finished,
       (SELECT count(*) FROM next) - (SELECT count(*) FROM admitted) AS refused,
       c.id, c.title, c.description, c.priority, c.attempts, c.max_attempts,
       CAST(c.lease_token AS text) AS lease_token, c.timeout_seconds, c.queue, c.concurrency_key,
       c.conversations, c.processed,
       CASE WHEN c.id IS NOT NULL AND (SELECT taskapp_events_watched())
            THEN taskapp_publish('task.claimed', c.id, 'processing', :instance_id) END AS notified
FROM (SELECT 1) AS one
LEFT JOIN claimed AS c ON true
ORDER BY c.priority DESC, c.id;

-- name: checkpoint
-- Mark one conversation of a claimed task processed with its result, for the lease holder,
-- if the claim's snapshot has it at its current revision. `held` 0: the lease is lost;
-- `checkpointed` 0: not in the snapshot, edited since the claim, already done, or deleted.
WITH held AS (
    SELECT id, status, claim_snapshot
    FROM tasks
    WHERE id = :task_id AND lease_token = :lease_token
    FOR SHARE
), done AS (
    UPDATE conversations AS c
    SET status = 'processed', result = CAST(:result AS jsonb), processed_at = now(),
        updated_at = now()
    FROM held
    WHERE c.id = :conversation_id AND c.task_id = held.id AND c.status = 'active'
      AND c.revision = CAST(held.claim_snapshot ->> CAST(c.id AS text) AS integer)
    RETURNING c.id, held.id AS task_id, held.status
)
SELECT (SELECT count(*) FROM held) AS held,
       (SELECT count(*) FROM done) AS checkpointed,
       (SELECT taskapp_publish('conversation.updated', task_id, status, :instance_id, id)
        FROM done) AS notified;

-- name: report_progress
-- Store a claimed task's progress for the lease holder and send it as task.progress (no row:
-- the lease is lost).
WITH reported AS (
    UPDATE tasks
    SET progress = jsonb_build_object('done', CAST(:done AS integer),
                                      'total', CAST(:total AS integer),
                                      'message', CAST(:message AS text), 'at', {{ iso_now() }}),
        updated_at = now()
    WHERE id = :task_id AND lease_token = :lease_token
    RETURNING id, status, progress
)
SELECT id, taskapp_publish('task.progress', id, status, :instance_id, NULL, NULL,
                           jsonb_build_object('progress', progress)) AS notified
FROM reported;

-- name: emit_output
-- Send chunks of a conversation's live output as conversation.output events, in order, for
-- the lease holder (no row: the lease is lost). Not stored: only stream clients see them.
SELECT t.id,
       (SELECT count(*)
        FROM (SELECT taskapp_publish('conversation.output', t.id, t.status, :instance_id,
                                     :conversation_id, NULL,
                                     jsonb_build_object('output',
                                         jsonb_build_object('seq', x.seq, 'text', x.text)))
              FROM unnest(CAST(:seqs AS integer[]), CAST(:texts AS text[])) WITH ORDINALITY
                   AS x(seq, text, n)
              ORDER BY x.n) AS published) AS sent
FROM tasks AS t
WHERE t.id = :task_id AND t.lease_token = :lease_token;

-- name: defer
-- Put a claimed task back to pending for :delay seconds without spending its attempt, for the
-- lease holder, while it has deferrals left, recording why in its error history. `held` 0:
-- the lease is lost; `deferred` 0: MAX_DEFERRALS reached (the worker fails the attempt).
-- :throttle also holds back its key (its queue, without a key) for as long, cluster-wide.
WITH held AS (
    SELECT id, deferrals, queue, concurrency_key FROM tasks
    WHERE id = :task_id AND lease_token = :lease_token
    FOR UPDATE
), throttled_key AS (
    INSERT INTO concurrency_keys AS k (queue, key, throttled_until, throttle_reason)
    SELECT queue, concurrency_key, now() + make_interval(secs => :delay), :reason
    FROM held
    WHERE :throttle AND concurrency_key IS NOT NULL
    ON CONFLICT (queue, key) DO UPDATE
    SET throttled_until = greatest(k.throttled_until, excluded.throttled_until),
        throttle_reason = excluded.throttle_reason
), throttled_queue AS (
    INSERT INTO queues AS q (name, throttled_until, throttle_reason)
    SELECT queue, now() + make_interval(secs => :delay), :reason
    FROM held
    WHERE :throttle AND concurrency_key IS NULL
    ON CONFLICT (name) DO UPDATE
    SET throttled_until = greatest(q.throttled_until, excluded.throttled_until),
        throttle_reason = excluded.throttle_reason
), deferred AS (
    UPDATE tasks AS t
    SET status = 'pending',
        attempts = greatest(t.attempts - 1, 0),
        deferrals = t.deferrals + 1,
        run_after = now() + make_interval(secs => :delay),
        processing_instance_id = NULL,
        last_error = :reason,
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM held
    WHERE t.id = held.id AND held.deferrals < :max_deferrals
    RETURNING t.id, t.attempts + 1 AS attempt, t.status, t.run_after
), history AS (
    INSERT INTO task_errors (task_id, attempt, instance_id, error)
    SELECT id, attempt, :instance_id, :reason FROM deferred
), trimmed AS (
    DELETE FROM task_errors
    WHERE task_id IN (SELECT id FROM deferred)
      AND id NOT IN (SELECT e.id FROM task_errors AS e WHERE e.task_id = :task_id
                     ORDER BY e.id DESC LIMIT :keep_errors - 1)
)
SELECT (SELECT count(*) FROM held) AS held,
       (SELECT count(*) FROM deferred) AS deferred,
       (SELECT taskapp_publish('task.deferred', id, status, :instance_id, NULL, run_after)
        FROM deferred) AS notified;

-- name: fail
-- Record a failed attempt for the lease holder: pending again after a backoff while attempts remain, else failed.
WITH failed AS (
    UPDATE tasks
    SET status = CASE WHEN attempts < max_attempts THEN 'pending' ELSE 'failed' END,
        run_after = CASE WHEN attempts < max_attempts
                         THEN now() + make_interval(secs => :retry_delay) ELSE run_after END,
        processing_instance_id = CASE WHEN attempts < max_attempts
                                      THEN NULL ELSE processing_instance_id END,
        last_error = :error,
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    WHERE id = :task_id AND lease_token = :lease_token
    RETURNING id, status, attempts, run_after
), history AS (
    INSERT INTO task_errors (task_id, attempt, instance_id, error)
    SELECT id, attempts, :instance_id, :error FROM failed
), trimmed AS (
    DELETE FROM task_errors
    WHERE task_id IN (SELECT id FROM failed)
      AND id NOT IN (SELECT e.id FROM task_errors AS e WHERE e.task_id = :task_id
                     ORDER BY e.id DESC LIMIT :keep_errors - 1)
)
SELECT id, status,
       taskapp_publish(CASE WHEN status = 'failed' THEN 'task.failed' ELSE 'task.retrying' END,
                       id, status, :instance_id, NULL, run_after) AS notified
FROM failed;

-- name: release
-- Hand a claimed task back to the queue without spending its attempt (clean shutdown).
WITH released AS (
    UPDATE tasks
    SET status = 'pending',
        attempts = greatest(attempts - 1, 0),
        run_after = now(),
        processing_instance_id = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    WHERE id = :task_id AND lease_token = :lease_token
    RETURNING id, run_after
)
SELECT id, taskapp_publish('task.updated', id, 'pending', :instance_id, NULL, run_after) AS notified
FROM released;

-- name: take_back_unheld
-- Hand back, without spending their attempts, the tasks this instance holds in the database but not in memory: claimed by a statement whose answer was lost (the connection died after its commit). :lease_tokens are every claim the instance still holds.
WITH unheld AS (
    SELECT id
    FROM tasks
    WHERE status = 'processing' AND processing_instance_id = :instance_id
      AND lease_token <> ALL(CAST(:lease_tokens AS uuid[]))
    FOR UPDATE SKIP LOCKED
), released AS (
    UPDATE tasks AS t
    SET status = 'pending',
        attempts = greatest(t.attempts - 1, 0),
        run_after = now(),
        processing_instance_id = NULL,
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM unheld
    WHERE t.id = unheld.id
    RETURNING t.id, t.run_after
)
SELECT id, taskapp_publish('task.updated', id, 'pending', :instance_id, NULL, run_after) AS notified
FROM released;

-- name: completed_by
-- Which of these tasks this instance completed: a completion written again after its answer was lost finds its lease gone, yet the first write may have been applied.
SELECT id FROM tasks
WHERE id = ANY(CAST(:task_ids AS bigint[])) AND status = 'completed'
  AND processing_instance_id = :instance_id;

-- name: renew_leases
-- Extend the leases an instance still holds; a task missing from the result was lost.
UPDATE tasks AS t
SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
FROM unnest(CAST(:task_ids AS bigint[]), CAST(:lease_tokens AS uuid[])) AS held(id, lease_token)
WHERE t.id = held.id AND t.lease_token = held.lease_token
RETURNING t.id;

-- name: rescue_expired
-- Take back tasks whose lease ran out (their instance died or stalled): retry them, or fail them when out of attempts.
WITH expired AS (
    SELECT id, processing_instance_id AS holder
    FROM tasks
    WHERE status = 'processing' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 100
    FOR UPDATE SKIP LOCKED
), rescued AS (
    UPDATE tasks AS t
    SET status = CASE WHEN t.attempts < t.max_attempts THEN 'pending' ELSE 'failed' END,
        run_after = now(),
        last_error = 'LeaseExpired: instance ' || coalesce(t.processing_instance_id, '?')
                     || ' stopped renewing its lease during attempt ' || t.attempts,
        processing_instance_id = CASE WHEN t.attempts < t.max_attempts
                                      THEN NULL ELSE t.processing_instance_id END,
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM expired
    WHERE t.id = expired.id
    RETURNING t.id, t.status, t.attempts, t.last_error, t.run_after, expired.holder
), history AS (
    INSERT INTO task_errors (task_id, attempt, instance_id, error)
    SELECT id, attempts, holder, last_error FROM rescued
)
SELECT id, status,
       taskapp_publish(CASE WHEN status = 'failed' THEN 'task.failed' ELSE 'task.retrying' END,
                       id, status, :instance_id, NULL, run_after) AS notified
FROM rescued;

-- name: seconds_until_next_due
-- How long until a pending task of :queues may become claimable (NULL when none is waiting):
-- its run_after, or when its throttled or rate-limited queue or key may start one again. A
-- key at its concurrency limit wakes the workers when one of its tasks finishes instead.
-- (greatest() skips NULLs: without the CASE an empty queue would read as "due now", and idle
-- workers would spin.)
WITH blocked AS (
    SELECT b.queue, b.key, b.until FROM taskapp_blocked_keys(CAST(:queues AS text[])) AS b
), closed AS (
    SELECT c.name, c.paused, c.until FROM taskapp_closed_queues(CAST(:queues AS text[])) AS c
), next AS (
    SELECT least(
        (SELECT min(t.run_after) FROM tasks AS t
         WHERE t.status = 'pending' AND t.queue = ANY(CAST(:queues AS text[]))
           AND t.queue NOT IN (SELECT name FROM closed)
           AND (t.concurrency_key IS NULL
                OR NOT EXISTS (SELECT 1 FROM blocked AS b
                               WHERE b.queue = t.queue AND b.key = t.concurrency_key))),
        (SELECT min(until) FROM blocked),
        (SELECT min(until) FROM closed WHERE NOT paused)) AS at
)
SELECT CASE WHEN at IS NOT NULL THEN greatest(extract(epoch FROM at - now()), 0) END AS seconds
FROM next;

-- name: heartbeat
-- Record that an instance is alive, with what its worker is doing.
INSERT INTO instances AS i (id, hostname, pid, worker_running, current_task_ids,
                            processed_count, failed_count, started_at, heartbeat_at)
VALUES (:instance_id, :hostname, :pid, :worker_running, CAST(:current_task_ids AS jsonb),
        :processed_count, :failed_count, :started_at, now())
ON CONFLICT (id) DO UPDATE
SET worker_running = excluded.worker_running,
    current_task_ids = excluded.current_task_ids,
    processed_count = excluded.processed_count,
    failed_count = excluded.failed_count,
    heartbeat_at = now(),
    stopped_at = NULL;

-- name: instance_stopped
-- Mark an instance cleanly stopped, so /status stops listing it at once.
UPDATE instances
SET stopped_at = now(), worker_running = false, current_task_ids = '[]'::jsonb
WHERE id = :instance_id;

-- name: forget_instances
-- Delete instances not heard from for a long time (dead ones stay visible until then).
DELETE FROM instances WHERE heartbeat_at < now() - make_interval(secs => :forget_after_seconds);

-- name: instances
-- Every known instance with the age of its heartbeat, newest first.
SELECT id, hostname, pid, worker_running, current_task_ids, processed_count, failed_count,
       started_at, heartbeat_at, stopped_at,
       extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_seconds
FROM instances
ORDER BY started_at DESC;
