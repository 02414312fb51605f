"""The queue's statements on a real PostgreSQL: claims, fencing, leases, rescue, order."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import psycopg
import pytest

from taskapp import queue
from taskapp.config import normalize_database_url
from taskapp.database import Database
from taskapp.statements import statement
from tests.support import task_row


@pytest.fixture
def database(database_url: str) -> Database:
    database = Database(normalize_database_url(database_url), pool_size=10)
    yield database
    database.close()


def add_task(
    conn: psycopg.Connection,
    title: str = "t",
    *,
    priority: int = 0,
    max_attempts: int = 3,
    delay_seconds: float = 0,
    conversations: tuple[str, ...] = (),
) -> int:
    task_id = conn.execute(
        "INSERT INTO tasks (title, priority, max_attempts, run_after)"
        " VALUES (%s, %s, %s, now() + make_interval(secs => %s)) RETURNING id",
        (title, priority, max_attempts, delay_seconds),
    ).fetchone()[0]
    for content in conversations:
        conn.execute(
            "INSERT INTO conversations (task_id, content) VALUES (%s, %s)", (task_id, content)
        )
    return task_id


def claim_one(database: Database, instance: str = "a", lease: float = 30) -> queue.Claim | None:
    claims = queue.claim(database, instance_id=instance, limit=1, lease_seconds=lease)
    return claims[0] if claims else None


def test_claim_returns_a_snapshot_with_conversations(database, db_conn):
    task_id = add_task(db_conn, "hello", conversations=("one", "two"))
    claimed = claim_one(database, "instance-a")
    assert claimed is not None
    assert claimed.task.id == task_id
    assert claimed.task.attempts == 1
    assert [c.content for c in claimed.task.conversations] == ["one", "two"]
    row = task_row(db_conn, task_id)
    assert row["status"] == "processing"
    assert row["processing_instance_id"] == "instance-a"
    assert str(row["lease_token"]) == claimed.lease_token


def test_concurrent_claims_never_share_a_task(database, db_conn):
    task_ids = {add_task(db_conn, f"t{n}") for n in range(200)}
    claimed: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def claimer(name: str) -> None:
        barrier.wait()
        while claims := queue.claim(database, instance_id=name, limit=3, lease_seconds=30):
            with lock:
                claimed.extend(c.task.id for c in claims)

    threads = [threading.Thread(target=claimer, args=(f"i{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(claimed).most_common(1)[0][1] == 1
    assert set(claimed) == task_ids


def test_claim_orders_by_priority_then_age(database, db_conn):
    low_old = add_task(db_conn, "low-old", priority=0)
    high = add_task(db_conn, "high", priority=5)
    low_new = add_task(db_conn, "low-new", priority=0)
    negative = add_task(db_conn, "negative", priority=-1)
    order = [claim_one(database).task.id for _ in range(4)]
    assert order == [high, low_old, low_new, negative]


def test_an_empty_queue_has_no_next_due_time(database, db_conn):
    assert queue.seconds_until_next_due(database) is None
    add_task(db_conn, delay_seconds=0)
    assert queue.seconds_until_next_due(database) == 0


def test_tasks_not_yet_due_are_not_claimed(database, db_conn):
    add_task(db_conn, "later", delay_seconds=60)
    assert claim_one(database) is None
    assert 59 < queue.seconds_until_next_due(database) <= 60


def test_complete_marks_conversations_processed(database, db_conn):
    task_id = add_task(db_conn, conversations=("a", "b"))
    claimed = claim_one(database)
    assert queue.complete(database, claimed, instance_id="a").applied
    row = task_row(db_conn, task_id)
    assert row["status"] == "completed"
    assert row["processed_at"] is not None
    assert row["lease_token"] is None
    statuses = db_conn.execute(
        "SELECT status FROM conversations WHERE task_id = %s", (task_id,)
    ).fetchall()
    assert statuses == [("processed",), ("processed",)]


def test_a_stale_token_cannot_complete_or_fail(database, db_conn):
    task_id = add_task(db_conn)
    claimed = claim_one(database)
    stale = queue.Claim(task=claimed.task, lease_token=str(uuid.uuid4()), max_attempts=3)
    assert not queue.complete(database, stale, instance_id="a").applied
    assert not queue.fail(database, stale, instance_id="a", error="x", retry_base_seconds=0).applied
    assert task_row(db_conn, task_id)["status"] == "processing"


def test_completion_after_the_task_was_deleted_is_dropped(database, db_conn):
    task_id = add_task(db_conn)
    claimed = claim_one(database)
    db_conn.execute("DELETE FROM tasks WHERE id = %s", (task_id,))
    assert not queue.complete(database, claimed, instance_id="a").applied


def test_failures_retry_with_backoff_then_fail(database, db_conn):
    task_id = add_task(db_conn, max_attempts=2)
    first = claim_one(database)
    outcome = queue.fail(database, first, instance_id="a", error="Boom: one", retry_base_seconds=60)
    assert outcome.status == "pending"
    assert claim_one(database) is None, "backoff must keep the task from being claimed at once"
    db_conn.execute("UPDATE tasks SET run_after = now() WHERE id = %s", (task_id,))
    second = claim_one(database)
    assert second.task.attempts == 2
    assert queue.fail(
        database, second, instance_id="a", error="Boom: two", retry_base_seconds=0
    ).status == ("failed")
    row = task_row(db_conn, task_id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 2, "Boom: two")
    history = db_conn.execute(
        "SELECT attempt, error FROM task_errors WHERE task_id = %s ORDER BY id", (task_id,)
    ).fetchall()
    assert history == [(1, "Boom: one"), (2, "Boom: two")]


def test_error_history_is_bounded(database, db_conn):
    from taskapp.queue import ERROR_HISTORY_LIMIT

    task_id = add_task(db_conn, max_attempts=100)
    for n in range(ERROR_HISTORY_LIMIT + 5):
        claimed = claim_one(database)
        queue.fail(database, claimed, instance_id="a", error=f"E{n}", retry_base_seconds=0)
    errors = [
        e
        for (e,) in db_conn.execute(
            "SELECT error FROM task_errors WHERE task_id = %s ORDER BY id", (task_id,)
        )
    ]
    assert len(errors) == ERROR_HISTORY_LIMIT
    assert errors[-1] == f"E{ERROR_HISTORY_LIMIT + 4}"


def test_release_hands_back_without_spending_the_attempt(database, db_conn):
    task_id = add_task(db_conn)
    claimed = claim_one(database)
    assert queue.release(database, claimed, instance_id="a").applied
    row = task_row(db_conn, task_id)
    assert (row["status"], row["attempts"], row["processing_instance_id"]) == ("pending", 0, None)


def test_claims_whose_answer_was_lost_are_taken_back_and_nothing_else(database, db_conn):
    kept, lost, elsewhere = (add_task(db_conn, str(n)) for n in range(3))
    held = claim_one(database, "a")
    unheard = claim_one(database, "a")  # claimed, but as if its answer never arrived
    other = claim_one(database, "b")
    assert [c.task.id for c in (held, unheard, other)] == [kept, lost, elsewhere]

    assert queue.take_back_unheld(database, [held], instance_id="a") == [lost]
    row = task_row(db_conn, lost)
    assert (row["status"], row["attempts"], row["lease_token"]) == ("pending", 0, None)
    for task_id in (kept, elsewhere):
        assert task_row(db_conn, task_id)["status"] == "processing"
    # The unheard claim is fenced off; the held one still completes.
    assert not queue.complete(database, unheard, instance_id="a").applied
    assert queue.complete(database, held, instance_id="a").applied
    assert queue.take_back_unheld(database, [], instance_id="a") == []
    # A completion written again after its answer was lost finds its lease gone: this tells
    # whether the first write stood.
    assert not queue.complete(database, held, instance_id="a").applied
    assert queue.completed_by(database, [kept, lost, elsewhere], instance_id="a") == {kept}
    assert queue.completed_by(database, [kept], instance_id="b") == set()


def test_expired_leases_are_rescued_and_the_old_holder_is_fenced(database, db_conn):
    task_id = add_task(db_conn, max_attempts=2)
    first = claim_one(database, "dead", lease=1)
    db_conn.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (task_id,)
    )
    assert queue.rescue_expired(database, instance_id="rescuer") == [(task_id, "pending")]
    second = claim_one(database, "alive")
    assert second.task.attempts == 2
    assert not queue.complete(database, first, instance_id="dead").applied
    assert queue.renew_leases(database, [first, second], lease_seconds=30) == {task_id}
    assert queue.complete(database, second, instance_id="alive").applied
    row = task_row(db_conn, task_id)
    assert (row["status"], row["processing_instance_id"]) == ("completed", "alive")
    (holder,) = db_conn.execute(
        "SELECT instance_id FROM task_errors WHERE task_id = %s", (task_id,)
    ).fetchone()
    assert holder == "dead"


def test_a_task_that_keeps_killing_instances_ends_failed(database, db_conn):
    task_id = add_task(db_conn, max_attempts=1)
    claim_one(database, "dead", lease=1)
    db_conn.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (task_id,)
    )
    assert queue.rescue_expired(database, instance_id="rescuer") == [(task_id, "failed")]
    assert task_row(db_conn, task_id)["last_error"].startswith("LeaseExpired")


def test_claim_uses_the_partial_index_with_many_rows(database, db_conn):
    db_conn.execute(
        "INSERT INTO tasks (title, max_attempts, status, processed_at)"
        " SELECT 'done', 3, 'completed', now() FROM generate_series(1, 100000)"
    )
    db_conn.execute(
        "INSERT INTO tasks (title, max_attempts) SELECT 'todo', 3 FROM generate_series(1, 100000)"
    )
    db_conn.execute("ANALYZE tasks")
    # EXPLAIN without ANALYZE plans the real claim statement without running it.
    params = {
        "task_ids": [],
        "lease_tokens": [],
        "results": [],
        "instance_id": "a",
        "queues": ["default"],
        "limits": [1],
        "lease_seconds": 30,
    }
    explain = "EXPLAIN " + statement("complete_and_claim")
    plan = "\n".join(row[0] for row in db_conn.execute(explain, params))
    assert "ix_tasks_claim" in plan, plan
    assert "Seq Scan on tasks" not in plan, plan


def kept_counts(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT status, sum(n) FROM task_counts GROUP BY status").fetchall()
    return {status: int(n) for status, n in rows if n}


def true_counts(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())


def test_kept_counts_match_the_table_through_every_transition(database, db_conn):
    for n in range(30):
        add_task(db_conn, f"t{n}", max_attempts=1)
    db_conn.execute(
        "INSERT INTO tasks (title, max_attempts, status, processed_at)"
        " SELECT 'history', 1, 'completed', now() FROM generate_series(1, 500)"
    )
    assert kept_counts(db_conn) == true_counts(db_conn) == {"pending": 30, "completed": 500}

    def work(name: str) -> None:
        while claims := queue.claim(database, instance_id=name, limit=2, lease_seconds=30):
            for n, claimed in enumerate(claims):
                if claimed.task.id % 3 == 0:
                    queue.fail(database, claimed, instance_id=name, error="E", retry_base_seconds=0)
                elif n == 1:
                    queue.release(database, claimed, instance_id=name)
                else:
                    queue.complete(database, claimed, instance_id=name)

    threads = [threading.Thread(target=work, args=(f"i{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    db_conn.execute("UPDATE tasks SET status = 'cancelled' WHERE id IN (1, 2)")
    db_conn.execute("DELETE FROM tasks WHERE title = 'history' AND id % 2 = 0")
    assert kept_counts(db_conn) == true_counts(db_conn)
    db_conn.execute("TRUNCATE tasks CASCADE")
    assert kept_counts(db_conn) == {}


def test_complete_and_claim_finishes_one_and_leases_the_next(database, db_conn):
    first_id = add_task(db_conn, "first", conversations=("a",))
    second_id = add_task(db_conn, "second")
    first = claim_one(database, "a")
    done = queue.complete_and_claim_many(
        database, [(first, None)], instance_id="a", limits={"default": 1}, lease_seconds=30
    )
    (outcome,), claims = done.outcomes, done.claims
    assert outcome.applied
    assert [c.task.id for c in claims] == [second_id]
    assert task_row(db_conn, first_id)["status"] == "completed"
    assert task_row(db_conn, second_id)["status"] == "processing"
    # Nothing left to claim, and a stale token: no completion, no claim, still one row back.
    done = queue.complete_and_claim_many(
        database, [(first, None)], instance_id="a", limits={"default": 1}, lease_seconds=30
    )
    (outcome,), claims = done.outcomes, done.claims
    assert (outcome.applied, claims) == (False, [])
