-- pgbench's own limit for a batched claim on taskapp's schema (run by bench/peers.py):
--   pgbench -n -M prepared -c 2 -j 2 -T 5 -f bench/pgbench_claim.sql \
--           -D batch=100 -D ids='{}' -D tokens='{}' <taskapp database>
-- One transaction per batch, shaped like complete_and_claim in taskapp/sql/queue.sql: finish
-- the client's previous batch for the lease holder (conversations of the claim's snapshot
-- `processed`, the task `completed`, or `pending` again when it has unseen active
-- conversations; a task.completed event each), then lease the next :batch most urgent due
-- pending tasks with FOR UPDATE SKIP LOCKED (claim snapshot, lease token, a task.claimed event
-- each) and keep their ids and tokens for the next transaction (\gset). Each transaction so
-- completes :batch tasks and claims :batch: tasks/s = tps x batch. What it leaves out is the
-- service: the claimed tasks' conversations are not sent back to a client, nothing processes
-- them, and no Python runs between the claim and the completion.
WITH held AS (
    SELECT t.id, t.claim_snapshot
    FROM tasks AS t
    JOIN unnest(CAST(:ids AS bigint[]), CAST(:tokens AS uuid[])) AS h(id, lease_token)
      ON t.id = h.id AND t.lease_token = h.lease_token
    FOR UPDATE OF t
), seen AS (
    UPDATE conversations AS c
    SET status = 'processed', processed_at = now(), updated_at = now()
    FROM held
    WHERE c.task_id = held.id AND c.status = 'active'
      AND c.revision = CAST(held.claim_snapshot ->> CAST(c.id AS text) AS integer)
    RETURNING c.id, c.task_id
), unseen AS (
    SELECT held.id,
           (SELECT count(*) FROM conversations AS c
            WHERE c.task_id = held.id AND c.status = 'active'
              AND c.id NOT IN (SELECT id FROM seen)) AS n
    FROM held
), done AS (
    UPDATE tasks AS t
    SET status = CASE WHEN unseen.n = 0 THEN 'completed' ELSE 'pending' END,
        processed_at = CASE WHEN unseen.n = 0 THEN now() ELSE t.processed_at END,
        result = NULL,
        updated_at = now(),
        lease_token = NULL,
        lease_expires_at = NULL
    FROM unseen
    WHERE t.id = unseen.id
    RETURNING t.id, t.status
), completion AS (
    SELECT taskapp_publish('task.completed', id, status, 'pgbench') FROM done
), next AS (
    SELECT id
    FROM tasks
    WHERE status = 'pending' AND run_after <= now()
    ORDER BY priority DESC, id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE tasks AS t
    SET status = 'processing',
        attempts = t.attempts + 1,
        processing_instance_id = 'pgbench',
        lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => 30),
        claim_snapshot = (SELECT coalesce(jsonb_object_agg(CAST(v.id AS text), v.revision), '{}')
                          FROM conversations AS v
                          WHERE v.task_id = t.id AND v.status = 'active'),
        updated_at = now()
    FROM next
    WHERE t.id = next.id
    RETURNING t.id, t.lease_token
), published AS (
    SELECT taskapp_publish('task.claimed', id, 'processing', 'pgbench') FROM claimed
)
SELECT (SELECT count(*) FROM completion) AS completed,
       (SELECT count(*) FROM published) AS claimed,
       coalesce((SELECT array_agg(id) FROM claimed), '{}') AS ids,
       coalesce((SELECT array_agg(lease_token) FROM claimed), '{}') AS tokens
\gset
