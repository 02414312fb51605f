"""A running attempt, in-process on the real database: progress, live output, the
cancellation flag (cancel, lost lease, timeout, shutdown), the watchdog's abandoned threads
and deferrals. tests/test_running_tasks.py checks the same across real gunicorn instances."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from taskapp import services
from taskapp.database import Database
from taskapp.processor import (
    OUTPUT_CHUNK_CHARACTERS,
    CancelReason,
    Context,
    Defer,
    LeaseLost,
    TaskSnapshot,
)
from tests.support import listen_to_events, task_errors, task_row, wait_for
from tests.test_worker import add_task, status_of


class Watch:
    """A processor that waits on its cancellation flag and records what it saw."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.seen: dict[str, Any] = {}

    def processor(self, task: TaskSnapshot, context: Context) -> str:
        self.started.set()
        context.wait(20)
        self.seen.update(cancelled=context.cancelled, reason=context.cancel_reason)
        # After a cancel the lease is gone; a timed-out attempt still holds it for the grace.
        lost = context.cancel_reason != "timeout"
        with pytest.raises(LeaseLost) if lost else contextlib.nullcontext():
            context.progress(1, 1, "after the flag")
        return "late result"


@pytest.fixture
def events(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        listen_to_events(conn)
        yield conn


def events_until(conn: psycopg.Connection, last: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The events up to the first of type `last` (fails if it doesn't come)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for notify in conn.notifies(timeout=0.2):
            got.append(json.loads(notify.payload))
            if got[-1]["type"] == last:
                return got
    raise AssertionError(f"no {last} event; got {got}")


def test_progress_is_stored_and_sent(run_worker, db_conn, events) -> None:
    def report(task: TaskSnapshot, context: Context) -> None:
        context.progress(1, 3, "one")
        context.progress(2, 3, "two \x00 nul-free")
        with pytest.raises(ValueError):
            context.progress(-1)
        with pytest.raises(ValueError):
            context.progress(True)  # type: ignore[arg-type]

    task_id = add_task(db_conn)
    run_worker(report)
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    progress = task_row(db_conn, task_id)["progress"]
    assert {k: progress[k] for k in ("done", "total", "message")} == {
        "done": 2,
        "total": 3,
        "message": "two  nul-free",
    }
    reports = [e for e in events_until(events, "task.completed") if e["type"] == "task.progress"]
    assert [e["progress"]["done"] for e in reports] == [1, 2]
    assert reports[1]["progress"] == progress


def test_live_output_is_sent_in_order_in_bounded_chunks(run_worker, db_conn, events) -> None:
    long_text = "x" * (OUTPUT_CHUNK_CHARACTERS * 2 + 5)

    def stream(task: TaskSnapshot, context: Context) -> None:
        (conversation,) = task.conversations
        context.emit(conversation.id, "Hel")
        context.emit(conversation.id, "lo")
        context.emit(conversation.id, long_text)
        context.emit(conversation.id, "")  # nothing to send
        with pytest.raises(ValueError):
            context.emit(conversation.id + 1000, "not this task's")

    task_id = add_task(db_conn, conversations=1)
    run_worker(stream)
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    sent = events_until(events, "task.completed")
    outputs = [e for e in sent if e["type"] == "conversation.output"]
    assert [e["output"]["seq"] for e in outputs] == [0, 1, 2, 3, 4]
    assert "".join(e["output"]["text"] for e in outputs) == "Hello" + long_text
    assert all(len(e["output"]["text"]) <= OUTPUT_CHUNK_CHARACTERS for e in outputs)
    assert {e["status"] for e in outputs} == {"processing"}
    # Not stored: the task row knows nothing of it.
    assert "Hello" not in json.dumps(task_row(db_conn, task_id), default=str)


def test_a_cancel_sets_the_flag_and_drops_the_late_result(
    run_worker, db_conn, gateway: Database
) -> None:
    watch = Watch()
    task_id = add_task(db_conn, conversations=1)
    worker, _ = run_worker(watch.processor)
    assert watch.started.wait(10)
    services.cancel_task(database=gateway, task_id=task_id, instance_id="api")
    # The listener calls this on taskapp_cancel (tests/test_running_tasks.py covers the NOTIFY).
    assert worker.revoke(task_id, CancelReason.CANCELLED)
    wait_for(lambda: watch.seen, what="the processor to see the flag")
    assert watch.seen == {"cancelled": True, "reason": "cancelled"}
    wait_for(lambda: worker.current_task_ids == [], what="the worker letting go")
    row = task_row(db_conn, task_id)
    assert (row["status"], row["result"], row["lease_token"]) == ("cancelled", None, None)
    assert db_conn.execute(
        "SELECT status FROM conversations WHERE task_id = %s", (task_id,)
    ).fetchone() == ("active",)


def test_a_missed_cancel_is_found_by_the_lease_renewal(run_worker, db_conn, gateway) -> None:
    watch = Watch()
    task_id = add_task(db_conn)
    _, housekeeper = run_worker(watch.processor)
    assert watch.started.wait(10)
    services.cancel_task(database=gateway, task_id=task_id, instance_id="api")
    housekeeper.renew_leases()  # no listener here: the renewal finds the lease gone
    wait_for(lambda: watch.seen, what="the processor to see the flag")
    assert watch.seen["reason"] == "lease lost"
    assert status_of(db_conn, task_id) == "cancelled"


def test_a_timeout_the_processor_obeys_fails_the_attempt(run_worker, db_conn) -> None:
    watch = Watch()
    task_id = add_task(db_conn, max_attempts=1)
    db_conn.execute("UPDATE tasks SET timeout_seconds = 1 WHERE id = %s", (task_id,))
    started = time.monotonic()
    run_worker(watch.processor, timeout_grace_seconds=5)
    wait_for(lambda: status_of(db_conn, task_id) == "failed", what="the timeout")
    assert time.monotonic() - started < 3
    assert watch.seen == {"cancelled": True, "reason": "timeout"}
    (error,) = task_errors(db_conn, task_id)
    assert error["error"].startswith("TaskTimeout: attempt 1 ran past its timeout of 1s")
    assert "stopped when told" in error["error"]
    assert task_row(db_conn, task_id)["result"] is None


def test_a_processor_that_ignores_its_timeout_loses_its_thread_not_the_slot(
    run_worker, db_conn
) -> None:
    release = threading.Event()
    stuck_id = add_task(db_conn, max_attempts=1)
    db_conn.execute("UPDATE tasks SET timeout_seconds = 1, priority = 1 WHERE id = %s", (stuck_id,))

    def processor(task: TaskSnapshot, context: Context) -> None:
        if task.id == stuck_id:
            release.wait(30)  # ignores the flag

    worker, _ = run_worker(processor, worker_concurrency=1, timeout_grace_seconds=0.5)
    wait_for(lambda: status_of(db_conn, stuck_id) == "processing", what="the stuck claim")
    started = time.monotonic()
    wait_for(lambda: status_of(db_conn, stuck_id) == "failed", what="the timeout", timeout=5)
    assert time.monotonic() - started < 2.5
    assert "thread was abandoned" in task_errors(db_conn, stuck_id)[0]["error"]
    assert worker.abandoned_threads == 1
    # The only work slot is free again while the old thread still sleeps.
    other_id = add_task(db_conn)
    wait_for(lambda: status_of(db_conn, other_id) == "completed", what="the next task")
    release.set()
    wait_for(lambda: worker.abandoned_threads == 0, what="the abandoned thread to end")
    # Its late return changed nothing.
    assert status_of(db_conn, stuck_id) == "failed"
    assert len(task_errors(db_conn, stuck_id)) == 1


def test_the_end_of_a_shutdown_grace_sets_the_flag(run_worker, db_conn) -> None:
    watch = Watch()
    task_id = add_task(db_conn)
    worker, _ = run_worker(watch.processor)
    assert watch.started.wait(10)
    assert worker.stop(grace=0.1) == 1
    wait_for(lambda: watch.seen, what="the processor to see the flag")
    assert watch.seen["reason"] == "shutdown"
    assert status_of(db_conn, task_id) == "pending"


def test_a_deferral_does_not_spend_an_attempt(run_worker, db_conn) -> None:
    runs: list[tuple[float, int]] = []

    def defer_once(task: TaskSnapshot, context: Context) -> str:
        runs.append((time.monotonic(), task.attempts))
        if len(runs) == 1:
            context.defer(0.5, "429 from the API")
        return "done"

    task_id = add_task(db_conn, max_attempts=1)
    run_worker(defer_once)
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="the second run")
    (first, attempt_1), (second, attempt_2) = runs
    assert attempt_1 == attempt_2 == 1
    assert 0.4 <= second - first < 2.0
    row = task_row(db_conn, task_id)
    assert (row["attempts"], row["deferrals"], row["result"]) == (1, 1, "done")
    (entry,) = task_errors(db_conn, task_id)
    assert entry["error"] == "Deferred: 429 from the API (runs again in 0.5s)"
    assert entry["attempt"] == 1


def test_deferrals_are_bounded(run_worker, db_conn) -> None:
    def always_defer(task: TaskSnapshot) -> None:
        raise Defer(0, "busy")

    task_id = add_task(db_conn, max_attempts=1)
    run_worker(always_defer, max_deferrals=2)
    wait_for(lambda: status_of(db_conn, task_id) == "failed", what="the bound")
    errors = [e["error"] for e in task_errors(db_conn, task_id)]
    assert errors[:2] == ["Deferred: busy (runs again in 0s)"] * 2
    assert errors[2].startswith("DeferralsExhausted: deferred 2 times already")
    assert task_row(db_conn, task_id)["deferrals"] == 2


def test_defer_refuses_a_delay_out_of_range() -> None:
    with pytest.raises(ValueError):
        Defer(-1)
    with pytest.raises(ValueError):
        Defer(8 * 24 * 3600)
