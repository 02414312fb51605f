"""The worker and the housekeeper in-process, on the real database, with test processors:
claim, finish, retry, lease loss, hand-back and rescue, without gunicorn."""

from __future__ import annotations

import logging
import threading
import time

import psycopg

from taskapp.config import Settings
from taskapp.database import Database
from taskapp.housekeeper import Housekeeper
from taskapp.processor import TaskSnapshot
from taskapp.worker import Worker
from tests.support import conversation_statuses, task_errors, task_row, wait_for


def add_task(conn: psycopg.Connection, *, max_attempts: int = 3, conversations: int = 0) -> int:
    task_id = conn.execute(
        "INSERT INTO tasks (title, max_attempts) VALUES ('t', %s) RETURNING id", (max_attempts,)
    ).fetchone()[0]
    for n in range(conversations):
        conn.execute(
            "INSERT INTO conversations (task_id, content) VALUES (%s, %s)", (task_id, f"c{n}")
        )
    return task_id


class Gate:
    """A processor that signals when it starts and returns only when told to."""

    def __init__(self) -> None:
        self.started, self.finish = threading.Event(), threading.Event()

    def processor(self, task: TaskSnapshot) -> None:
        self.started.set()
        self.finish.wait(10)


def status_of(conn: psycopg.Connection, task_id: int) -> str:
    return task_row(conn, task_id)["status"]


def test_a_task_is_claimed_processed_and_completed(run_worker, db_conn) -> None:
    seen: list[TaskSnapshot] = []
    task_id = add_task(db_conn, conversations=2)
    worker, _ = run_worker(seen.append)
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    assert [c.content for c in seen[0].conversations] == ["c0", "c1"]
    assert seen[0].attempts == 1
    assert conversation_statuses(db_conn, task_id) == ["processed", "processed"]
    assert worker.processed_count == 1
    row = task_row(db_conn, task_id)
    assert row["lease_token"] is None and row["processing_instance_id"] == "in-process"


def test_a_failing_processor_is_retried_then_failed(run_worker, db_conn) -> None:
    task_id = add_task(db_conn, max_attempts=2)

    def fail(task: TaskSnapshot) -> None:
        raise ValueError(f"attempt {task.attempts}")

    worker, _ = run_worker(fail)
    wait_for(lambda: status_of(db_conn, task_id) == "failed", what="the final failure")
    errors = task_errors(db_conn, task_id)
    assert [(e["attempt"], e["error"]) for e in errors] == [
        (1, "ValueError: attempt 1"),
        (2, "ValueError: attempt 2"),
    ]
    assert task_row(db_conn, task_id)["attempts"] == 2
    assert worker.failed_count == 2


def test_a_result_after_the_lease_was_lost_is_dropped(run_worker, db_conn, caplog) -> None:
    gate = Gate()
    task_id = add_task(db_conn)
    worker, _ = run_worker(gate.processor)
    assert gate.started.wait(10)
    # Another claim took the task over (as a rescue after a stall would): a new token.
    db_conn.execute("UPDATE tasks SET lease_token = gen_random_uuid() WHERE id = %s", (task_id,))
    with caplog.at_level(logging.WARNING, logger="taskapp"):
        gate.finish.set()
        wait_for(lambda: worker.current_task_ids == [], what="the worker letting go")
    assert status_of(db_conn, task_id) == "processing"  # the other holder's, untouched
    assert worker.processed_count == 0
    assert any("result dropped" in record.getMessage() for record in caplog.records)


def test_stop_hands_back_a_running_task_without_spending_its_attempt(run_worker, db_conn) -> None:
    gate = Gate()
    task_id = add_task(db_conn)
    worker, _ = run_worker(gate.processor)
    assert gate.started.wait(10)
    assert worker.stop(grace=0.2) == 1
    row = task_row(db_conn, task_id)
    assert (row["status"], row["attempts"], row["lease_token"]) == ("pending", 0, None)
    gate.finish.set()
    # The processor's late return is not recorded: the task stays handed back.
    wait_for(lambda: worker.current_task_ids == [], what="the thread letting go")
    assert status_of(db_conn, task_id) == "pending"


def test_the_housekeeper_keeps_a_long_task_leased(run_worker, db_conn) -> None:
    release = threading.Event()
    task_id = add_task(db_conn)
    run_worker(lambda task: release.wait(10), lease_seconds=1)
    wait_for(lambda: status_of(db_conn, task_id) == "processing", what="the claim")
    first_expiry = task_row(db_conn, task_id)["lease_expires_at"]
    wait_for(
        lambda: task_row(db_conn, task_id)["lease_expires_at"] > first_expiry,
        timeout=3,
        what="a renewal",
    )
    release.set()
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    assert task_errors(db_conn, task_id) == []  # never rescued


def test_the_housekeeper_rescues_a_dead_instances_task(
    gateway: Database, settings: Settings, db_conn
) -> None:
    task_id = add_task(db_conn)
    db_conn.execute(
        "UPDATE tasks SET status = 'processing', attempts = 1, lease_token = gen_random_uuid(),"
        " lease_expires_at = now() - interval '1 second', processing_instance_id = 'dead'"
        " WHERE id = %s",
        (task_id,),
    )
    idle = Worker(database=gateway, settings=settings, processor=print, instance_id="alive")
    Housekeeper(database=gateway, settings=settings, instance_id="alive", worker=idle).run_once()
    row = task_row(db_conn, task_id)
    assert (row["status"], row["lease_token"]) == ("pending", None)
    (error,) = task_errors(db_conn, task_id)
    assert error["instance_id"] == "dead" and error["error"].startswith("LeaseExpired")


def test_a_renewal_that_misses_a_finishing_task_is_no_lost_lease(run_worker, db_conn) -> None:
    started, finish = threading.Event(), threading.Event()
    task_id = add_task(db_conn)
    worker, _ = run_worker(lambda task: (started.set(), finish.wait(10)))
    assert started.wait(10)
    (claimed,) = worker.held_claims()
    assert worker.lease_really_lost(claimed)  # held, not finishing: a miss would be a loss
    finish.set()
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    assert not worker.lease_really_lost(claimed)  # finished: a miss means nothing


class CountingDatabase(Database):
    """Counts the statements run, to see what an idle worker costs the database."""

    statements = 0

    def fetch(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        CountingDatabase.statements += 1
        return super().fetch(*args, **kwargs)


def test_an_idle_worker_sleeps_between_polls(settings: Settings) -> None:
    gateway = CountingDatabase(settings.database_url, pool_size=2)
    config = settings.with_changes(worker_concurrency=4, poll_interval_seconds=0.5)
    worker = Worker(database=gateway, settings=config, processor=print, instance_id="idle")
    worker.start()
    try:
        started = CountingDatabase.statements
        deadline = time.monotonic() + 2.0
        wait_for(lambda: time.monotonic() > deadline, timeout=3)
        # Each thread: a claim and a look at the next due time per poll, 4 polls in 2 s.
        assert CountingDatabase.statements - started <= 4 * 2 * 5
    finally:
        worker.stop(grace=0)
        gateway.close()
