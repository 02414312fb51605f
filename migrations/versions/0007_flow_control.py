"""Flow control: queues, concurrency keys, rate limits and pause.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 09:30:00

A task names its `queue` and may carry a `concurrency_key`. `queues` holds what is set for a
queue (paused; its own rate of starts; the default limits of each of its keys) and
`concurrency_keys` the overrides of one key; both hold the rate state (GCRA: a theoretical
arrival time `rate_tat` and the `rate_ready_at` it implies) and a processor's throttle. A
queue or key nobody configured has no row and no limit.

The claim (sql/queue.sql, complete_and_claim) picks candidates and asks taskapp_admit()
which may start. That function is where the limits hold across instances: it locks every
limited key (and rate-limited queue) with transaction advisory locks, in one global order,
and only then counts what is running, in a statement of its own, so with a snapshot that
sees every claim committed before the lock was granted. Two instances can't both admit the
third task of a key limited to 3. A pause takes the queue's gate exclusively
(taskapp_flow_lock(queue, NULL)); claims take it shared: a pause waits for claims in flight,
and once it has committed no claim admits a task of the queue.

task_counts gains the queue, so GET /queues counts by queue and status at any table size. A
trigger wakes idle workers (taskapp_wakeup) when a task with a key stops running: a slot of
a saturated key may be free.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SHARDS = 16

_RATE_COLUMNS = """
    {p}rate_limit integer,
    {p}rate_period_seconds double precision,
    {p}rate_burst integer,
    CONSTRAINT {name}_{p}rate_whole CHECK (
        ({p}rate_limit IS NULL) = ({p}rate_period_seconds IS NULL)
        AND ({p}rate_limit IS NULL) = ({p}rate_burst IS NULL)),
    CONSTRAINT {name}_{p}rate_positive CHECK (
        {p}rate_limit > 0 AND {p}rate_period_seconds > 0 AND {p}rate_burst >= 1)"""

_STATE_COLUMNS = """
    rate_tat timestamptz,
    rate_ready_at timestamptz,
    throttled_until timestamptz,
    throttle_reason text,
    updated_at timestamptz NOT NULL DEFAULT now()"""

_FUNCTIONS = """
CREATE FUNCTION taskapp_flow_lock(queue text, key text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended(CASE WHEN key IS NULL THEN 'taskapp queue gate ' || queue
                                 ELSE 'taskapp flow ' || queue || E'\\x1f' || key END, 0)
$$;

-- How many starts a rate allows at `at` (GCRA; NULL: no rate): spaced period/rate apart,
-- up to `burst` at once.
CREATE FUNCTION taskapp_rate_room(rate integer, period double precision, burst integer,
                                  tat timestamptz, at timestamptz) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN rate IS NULL THEN NULL
        WHEN extract(epoch FROM at - greatest(tat, at)) + (burst - 1) * period / rate < 0 THEN 0
        ELSE least(burst, floor((extract(epoch FROM at - greatest(tat, at))
                                 + (burst - 1) * period / rate) * rate / period + 1e-9) + 1)
    END
$$;

-- The theoretical arrival time after n more starts at `at`.
CREATE FUNCTION taskapp_rate_tat(rate integer, period double precision, tat timestamptz,
                                 n bigint, at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(tat, at) + make_interval(secs => n * period / rate)
$$;

-- When the next start is allowed, given the theoretical arrival time.
CREATE FUNCTION taskapp_rate_ready(rate integer, period double precision, burst integer,
                                   tat timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
    SELECT tat - make_interval(secs => (burst - 1) * period / rate)
$$;

-- A key's rule: its own overrides, else its queue's defaults (no row: no limit).
CREATE FUNCTION taskapp_key_rule(queue_name text, key_name text)
RETURNS TABLE (max_running integer, rate integer, period double precision, burst integer,
               tat timestamptz, ready_at timestamptz, throttled_until timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(k.concurrency_limit, q.key_concurrency_limit),
           CASE WHEN k.rate_limit IS NOT NULL THEN k.rate_limit ELSE q.key_rate_limit END,
           CASE WHEN k.rate_limit IS NOT NULL THEN k.rate_period_seconds
                ELSE q.key_rate_period_seconds END,
           CASE WHEN k.rate_limit IS NOT NULL THEN k.rate_burst ELSE q.key_rate_burst END,
           k.rate_tat, k.rate_ready_at, k.throttled_until
    FROM (SELECT 1) AS one
    LEFT JOIN queues AS q ON q.name = queue_name
    LEFT JOIN concurrency_keys AS k ON k.queue = queue_name AND k.key = key_name
$$;

-- Of the candidates (ids in claim order, with their queues and keys), those that may start
-- now, with the time each was admitted. Called by the claim with the candidates locked.
CREATE FUNCTION taskapp_admit(candidate_ids bigint[], candidate_queues text[],
                              candidate_keys text[])
RETURNS TABLE (task_id bigint, started_at timestamptz)
-- ROWS 10: a claim admits at most its free slots. At the default estimate of 1,000 the planner
-- hashed the whole tasks table to update the admitted rows (a drain at a tenth of its speed).
LANGUAGE plpgsql VOLATILE ROWS 10 AS $$
BEGIN
    IF candidate_ids IS NULL THEN
        RETURN;  -- a round that only writes completions
    END IF;
    PERFORM pg_advisory_xact_lock_shared(taskapp_flow_lock(s.q, NULL))
    FROM (SELECT DISTINCT q FROM unnest(candidate_queues) AS q ORDER BY q OFFSET 0) AS s;
    IF NOT EXISTS (SELECT 1 FROM unnest(candidate_keys) AS k WHERE k IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM queues
                       WHERE name = ANY(candidate_queues)
                         AND (paused OR rate_limit IS NOT NULL OR throttled_until > now())) THEN
        -- Nothing limits these candidates: the common case costs one look at `queues`.
        RETURN QUERY SELECT c, clock_timestamp() FROM unnest(candidate_ids) AS c;
        RETURN;
    END IF;
    -- Every key and every rate-limited queue among the candidates, in one order for all.
    PERFORM pg_advisory_xact_lock(s.l)
    FROM (SELECT taskapp_flow_lock(c.q, c.k) AS l
          FROM unnest(candidate_queues, candidate_keys) AS c(q, k)
          WHERE c.k IS NOT NULL
          UNION
          SELECT taskapp_flow_lock(name, '') FROM queues
          WHERE name = ANY(candidate_queues) AND rate_limit IS NOT NULL
          ORDER BY 1 OFFSET 0) AS s;
    -- A statement of its own: its snapshot sees every claim committed before the locks.
    -- `clock` is read after that snapshot is taken: every start it admits is later than the
    -- commit of each finish the snapshot sees, and rates are spaced by the same clock that
    -- records the starts (started_at).
    RETURN QUERY
    WITH clock AS MATERIALIZED (
        SELECT clock_timestamp() AS at
    ), candidate AS (
        SELECT c.id, c.q, c.k, c.n
        FROM unnest(candidate_ids, candidate_queues, candidate_keys) WITH ORDINALITY
             AS c(id, q, k, n)
    ), queue_rule AS (
        SELECT d.q, coalesce(qu.paused, false) AS paused, qu.rate_limit AS rate,
               qu.rate_period_seconds AS period, qu.rate_burst AS burst, qu.rate_tat AS tat,
               qu.throttled_until
        FROM (SELECT DISTINCT q FROM candidate) AS d
        LEFT JOIN queues AS qu ON qu.name = d.q
    ), key_rule AS (
        SELECT d.q, d.k, r.*
        FROM (SELECT DISTINCT q, k FROM candidate WHERE k IS NOT NULL) AS d
        CROSS JOIN LATERAL taskapp_key_rule(d.q, d.k) AS r
    ), running AS (
        SELECT kr.q, kr.k, count(t.id) AS n
        FROM key_rule AS kr
        JOIN tasks AS t ON t.queue = kr.q AND t.concurrency_key = kr.k
                       AND t.status = 'processing'
        WHERE kr.max_running IS NOT NULL
        GROUP BY kr.q, kr.k
    ), key_room AS (
        SELECT kr.q, kr.k,
               CASE WHEN kr.throttled_until > clock.at THEN 0
                    ELSE least(kr.max_running - coalesce(r.n, 0),
                               taskapp_rate_room(kr.rate, kr.period, kr.burst, kr.tat, clock.at))
               END AS room
        FROM clock, key_rule AS kr
        LEFT JOIN running AS r ON r.q = kr.q AND r.k = kr.k
    ), key_admitted AS (
        SELECT c.id, c.q, c.k, c.n
        FROM (SELECT *, row_number() OVER (PARTITION BY q, k ORDER BY n) AS rank
              FROM candidate) AS c
        JOIN queue_rule AS qr ON qr.q = c.q
        LEFT JOIN key_room AS kr ON kr.q = c.q AND kr.k = c.k
        WHERE NOT qr.paused AND (c.k IS NULL OR kr.room IS NULL OR c.rank <= kr.room)
    ), admitted AS (
        SELECT a.id, a.q, a.k
        FROM (SELECT *, row_number() OVER (PARTITION BY q ORDER BY n) AS rank
              FROM key_admitted) AS a
        CROSS JOIN clock
        JOIN queue_rule AS qr ON qr.q = a.q
        WHERE (qr.throttled_until IS NULL OR qr.throttled_until <= clock.at)
          AND (qr.rate IS NULL
               OR a.rank <= taskapp_rate_room(qr.rate, qr.period, qr.burst, qr.tat, clock.at))
    ), queue_spent AS (
        UPDATE queues AS qu
        SET rate_tat = taskapp_rate_tat(qu.rate_limit, qu.rate_period_seconds, qu.rate_tat,
                                        s.n, clock.at),
            rate_ready_at = taskapp_rate_ready(
                qu.rate_limit, qu.rate_period_seconds, qu.rate_burst,
                taskapp_rate_tat(qu.rate_limit, qu.rate_period_seconds, qu.rate_tat, s.n, clock.at))
        FROM clock, (SELECT q, count(*) AS n FROM admitted GROUP BY q) AS s
        WHERE qu.name = s.q AND qu.rate_limit IS NOT NULL
    ), key_spent AS (
        INSERT INTO concurrency_keys AS ck (queue, key, rate_tat, rate_ready_at)
        SELECT kr.q, kr.k, taskapp_rate_tat(kr.rate, kr.period, kr.tat, s.n, clock.at),
               taskapp_rate_ready(kr.rate, kr.period, kr.burst,
                                  taskapp_rate_tat(kr.rate, kr.period, kr.tat, s.n, clock.at))
        FROM clock,
             (SELECT q, k, count(*) AS n FROM admitted WHERE k IS NOT NULL GROUP BY q, k) AS s
        JOIN key_rule AS kr ON kr.q = s.q AND kr.k = s.k
        WHERE kr.rate IS NOT NULL
        ON CONFLICT (queue, key) DO UPDATE
        SET rate_tat = excluded.rate_tat, rate_ready_at = excluded.rate_ready_at
    )
    SELECT a.id, clock.at FROM admitted AS a, clock;
END
$$;

-- The queues among these that start nothing now: paused, or (until when) out of rate or
-- throttled as a whole.
CREATE FUNCTION taskapp_closed_queues(queue_names text[])
RETURNS TABLE (name text, paused boolean, until timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT q.name, q.paused, greatest(q.rate_ready_at, q.throttled_until)
    FROM queues AS q
    WHERE q.name = ANY(queue_names)
      AND (q.paused OR q.rate_ready_at > now() OR q.throttled_until > now())
$$;

-- Every queue configured or holding tasks.
CREATE FUNCTION taskapp_known_queues() RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT name FROM queues
    UNION
    SELECT queue FROM task_counts GROUP BY queue HAVING sum(n) <> 0
$$;

-- The keys of these queues that can start nothing now, and until when if that is known:
-- at their concurrency limit (until one finishes: NULL), out of rate or throttled.
CREATE FUNCTION taskapp_blocked_keys(queue_names text[])
RETURNS TABLE (queue text, key text, until timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT r.queue, r.key, NULL::timestamptz
    FROM (SELECT t.queue, t.concurrency_key AS key, count(*) AS n
          FROM tasks AS t
          WHERE t.status = 'processing' AND t.concurrency_key IS NOT NULL
            AND t.queue = ANY(queue_names)
          GROUP BY t.queue, t.concurrency_key) AS r
    CROSS JOIN LATERAL taskapp_key_rule(r.queue, r.key) AS rule
    WHERE r.n >= rule.max_running
    UNION ALL
    SELECT k.queue, k.key, greatest(k.rate_ready_at, k.throttled_until)
    FROM concurrency_keys AS k
    WHERE k.queue = ANY(queue_names)
      AND (k.rate_ready_at > now() OR k.throttled_until > now())
$$;

CREATE FUNCTION taskapp_key_freed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('taskapp_wakeup', '');
    RETURN NULL;
END
$$;
"""

_DROP_FUNCTIONS = """
DROP FUNCTION taskapp_key_freed();
DROP FUNCTION taskapp_blocked_keys(text[]);
DROP FUNCTION taskapp_known_queues();
DROP FUNCTION taskapp_closed_queues(text[]);
DROP FUNCTION taskapp_admit(bigint[], text[], text[]);
DROP FUNCTION taskapp_key_rule(text, text);
DROP FUNCTION taskapp_rate_ready(integer, double precision, integer, timestamptz);
DROP FUNCTION taskapp_rate_tat(integer, double precision, timestamptz, bigint, timestamptz);
DROP FUNCTION taskapp_rate_room(integer, double precision, integer, timestamptz, timestamptz);
DROP FUNCTION taskapp_flow_lock(text, text);
"""


def _count_functions(with_queue: bool) -> str:
    """The task_counts triggers' functions (migration 0002), by status, and by queue too."""
    key = "queue, status" if with_queue else "status"
    conflict = "(queue, status, shard)" if with_queue else "(status, shard)"

    def add(source: str, sign: str) -> str:
        return f"""
            INSERT INTO task_counts AS c ({key}, shard, n)
            SELECT {key}, pg_backend_pid() % {SHARDS}, {sign}count(*)
            FROM {source} GROUP BY {key} ORDER BY {key}
            ON CONFLICT {conflict} DO UPDATE SET n = c.n + excluded.n;"""

    return f"""
        CREATE OR REPLACE FUNCTION taskapp_count_inserted_tasks() RETURNS trigger
        LANGUAGE plpgsql AS $$ BEGIN {add("new_rows", "")} RETURN NULL; END $$;
        CREATE OR REPLACE FUNCTION taskapp_count_deleted_tasks() RETURNS trigger
        LANGUAGE plpgsql AS $$ BEGIN {add("old_rows", "-")} RETURN NULL; END $$;
        CREATE OR REPLACE FUNCTION taskapp_count_updated_tasks() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO task_counts AS c ({key}, shard, n)
            SELECT {key}, pg_backend_pid() % {SHARDS}, sum(delta)
            FROM (SELECT {key}, 1 AS delta FROM new_rows
                  UNION ALL SELECT {key}, -1 FROM old_rows) AS changes
            GROUP BY {key} HAVING sum(delta) <> 0 ORDER BY {key}
            ON CONFLICT {conflict} DO UPDATE SET n = c.n + excluded.n;
            RETURN NULL;
        END $$;"""


def upgrade():
    op.add_column(
        "tasks", sa.Column("queue", sa.String(64), server_default="default", nullable=False)
    )
    op.add_column("tasks", sa.Column("concurrency_key", sa.String(200), nullable=True))
    op.add_column("tasks", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint("queue_not_blank", "tasks", "length(queue) > 0")
    op.create_check_constraint(
        "concurrency_key_not_blank", "tasks", "length(concurrency_key) > 0"
    )
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.execute(
        "CREATE INDEX ix_tasks_claim ON tasks (queue, priority DESC, id, run_after)"
        " WHERE status = 'pending'"
    )
    op.execute(
        "CREATE INDEX ix_tasks_running_keys ON tasks (queue, concurrency_key)"
        " WHERE status = 'processing' AND concurrency_key IS NOT NULL"
    )
    op.execute(f"""
        CREATE TABLE queues (
            name varchar(64) PRIMARY KEY,
            paused boolean NOT NULL DEFAULT false,
            {_RATE_COLUMNS.format(p="", name="queues")},
            key_concurrency_limit integer CHECK (key_concurrency_limit > 0),
            {_RATE_COLUMNS.format(p="key_", name="queues")},
            {_STATE_COLUMNS}
        )""")
    op.execute(f"""
        CREATE TABLE concurrency_keys (
            queue varchar(64) NOT NULL,
            key varchar(200) NOT NULL,
            concurrency_limit integer CHECK (concurrency_limit > 0),
            {_RATE_COLUMNS.format(p="", name="concurrency_keys")},
            {_STATE_COLUMNS},
            PRIMARY KEY (queue, key)
        )""")
    # Counts by queue: every existing task is in `default`.
    op.execute("LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        "ALTER TABLE task_counts ADD COLUMN queue varchar(64) NOT NULL DEFAULT 'default'"
    )
    op.execute("ALTER TABLE task_counts DROP CONSTRAINT task_counts_pkey")
    op.execute("ALTER TABLE task_counts ADD PRIMARY KEY (queue, status, shard)")
    op.execute("ALTER TABLE task_counts ALTER COLUMN queue DROP DEFAULT")
    op.execute(_count_functions(with_queue=True))
    op.execute(_FUNCTIONS)
    op.execute("""
        CREATE TRIGGER tasks_key_freed AFTER UPDATE ON tasks FOR EACH ROW
        WHEN (OLD.status = 'processing' AND NEW.status <> 'processing'
              AND OLD.concurrency_key IS NOT NULL)
        EXECUTE FUNCTION taskapp_key_freed()""")
    op.execute("""
        CREATE TRIGGER tasks_key_freed_by_delete AFTER DELETE ON tasks FOR EACH ROW
        WHEN (OLD.status = 'processing' AND OLD.concurrency_key IS NOT NULL)
        EXECUTE FUNCTION taskapp_key_freed()""")


def downgrade():
    op.execute("LOCK TABLE tasks IN SHARE ROW EXCLUSIVE MODE")
    op.execute(_count_functions(with_queue=False))
    op.execute("""
        CREATE TABLE task_counts_by_status AS
        SELECT status, shard, CAST(sum(n) AS bigint) AS n FROM task_counts GROUP BY status, shard""")
    op.execute("DELETE FROM task_counts")
    op.execute("ALTER TABLE task_counts DROP CONSTRAINT task_counts_pkey")
    op.execute("ALTER TABLE task_counts DROP COLUMN queue")
    op.execute("ALTER TABLE task_counts ADD PRIMARY KEY (status, shard)")
    op.execute("INSERT INTO task_counts SELECT status, shard, n FROM task_counts_by_status")
    op.execute("DROP TABLE task_counts_by_status")
    op.execute("DROP TRIGGER tasks_key_freed_by_delete ON tasks")
    op.execute("DROP TRIGGER tasks_key_freed ON tasks")
    op.execute(_DROP_FUNCTIONS)
    op.execute("DROP TABLE concurrency_keys")
    op.execute("DROP TABLE queues")
    op.drop_index("ix_tasks_running_keys", table_name="tasks")
    op.drop_index("ix_tasks_claim", table_name="tasks")
    op.execute(
        "CREATE INDEX ix_tasks_claim ON tasks (priority DESC, id, run_after)"
        " WHERE status = 'pending'"
    )
    op.drop_constraint("concurrency_key_not_blank", "tasks")
    op.drop_constraint("queue_not_blank", "tasks")
    op.drop_column("tasks", "started_at")
    op.drop_column("tasks", "concurrency_key")
    op.drop_column("tasks", "queue")
