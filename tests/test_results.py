"""Results and checkpoints, with the worker in-process on the real database: what a processor
returns is kept, checkpoints are durable as they happen, a retry does only what is left, and a
conversation the processor never saw is never reported processed."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from taskapp.config import ConfigError
from taskapp.processor import (
    Context,
    LeaseLost,
    TaskSnapshot,
    adapt,
    encode_result,
    load_processor,
    takes_context,
)
from tests.support import conversation_statuses, task_errors, task_row, wait_for
from tests.test_worker import add_task


def status_of(conn: psycopg.Connection, task_id: int) -> str:
    return task_row(conn, task_id)["status"]


def conversations(conn: psycopg.Connection, task_id: int) -> list[dict[str, Any]]:
    cursor = conn.execute(
        "SELECT id, content, status, result, processed_at, revision FROM conversations"
        " WHERE task_id = %s ORDER BY id",
        (task_id,),
    )
    names = [d.name for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def test_the_return_value_is_stored_as_the_tasks_result(run_worker, db_conn, client) -> None:
    task_id = add_task(db_conn, conversations=1)
    run_worker(lambda task: {"summary": "ça va", "n": len(task.conversations), "ok": True})
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    expected = {"summary": "ça va", "n": 1, "ok": True}
    assert task_row(db_conn, task_id)["result"] == expected
    shown = client.get(f"/tasks/{task_id}").get_json()
    assert shown["result"] == expected
    (conversation,) = shown["conversations"]
    assert conversation["status"] == "processed" and conversation["result"] is None
    assert conversation["processed_at"] is not None
    # The list stays light: no results in it.
    assert "result" not in client.get("/tasks/").get_json()[0]


def test_a_result_too_large_fails_the_attempt_clearly(run_worker, db_conn) -> None:
    task_id = add_task(db_conn, max_attempts=1)
    run_worker(lambda task: "x" * 200, result_max_bytes=100)
    wait_for(lambda: status_of(db_conn, task_id) == "failed", what="the failure")
    (error,) = task_errors(db_conn, task_id)
    assert error["error"].startswith("ResultTooLarge: the result is 202 bytes of JSON")
    assert "RESULT_MAX_BYTES (100)" in error["error"]
    assert task_row(db_conn, task_id)["result"] is None


def test_a_result_that_is_not_json_fails_the_attempt_clearly(run_worker, db_conn) -> None:
    task_id = add_task(db_conn, max_attempts=1)
    run_worker(lambda task: {"when": object()})
    wait_for(lambda: status_of(db_conn, task_id) == "failed", what="the failure")
    (error,) = task_errors(db_conn, task_id)
    assert error["error"].startswith("ResultNotSerializable: the result is not JSON")


def test_results_postgresql_would_refuse_are_refused_before_writing() -> None:
    for bad in ("a\x00b", float("nan"), {1, 2}, "\ud800"):
        with pytest.raises(Exception, match=r"not JSON|NUL") as caught:
            encode_result(bad, 1000)
        assert type(caught.value).__name__ == "ResultNotSerializable"
    assert encode_result("a\\u0000b", 1000) == '"a\\\\u0000b"'  # a backslash, not a NUL
    assert encode_result(None, 1000) is None


def test_checkpoints_are_stored_durably_as_they_happen(run_worker, db_conn) -> None:
    task_id = add_task(db_conn, conversations=3)
    first, second, third = (c["id"] for c in conversations(db_conn, task_id))
    checkpointed, finish = threading.Event(), threading.Event()

    def processor(task: TaskSnapshot, context: Context) -> str:
        assert context.task is task
        assert context.checkpoint(first, {"score": 1})
        assert context.checkpoint(second, ["two"])
        assert not context.checkpoint(first, {"again": True})  # already done: kept as it was
        checkpointed.set()
        finish.wait(10)
        return "done"

    run_worker(processor)
    assert checkpointed.wait(10)
    # Committed while the task still runs: a crash now would keep them.
    rows = conversations(db_conn, task_id)
    assert [r["status"] for r in rows] == ["processed", "processed", "active"]
    assert [r["result"] for r in rows] == [{"score": 1}, ["two"], None]
    assert rows[0]["processed_at"] is not None and rows[2]["processed_at"] is None
    assert status_of(db_conn, task_id) == "processing"
    finish.set()
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    rows = conversations(db_conn, task_id)
    assert [r["status"] for r in rows] == ["processed"] * 3
    assert [r["result"] for r in rows] == [{"score": 1}, ["two"], None]
    assert rows[0]["processed_at"] < rows[2]["processed_at"]
    assert task_row(db_conn, task_id)["result"] == "done"
    assert third  # the one the completion marked, without a result of its own


def test_a_retry_after_a_failure_runs_only_the_conversations_not_done(run_worker, db_conn) -> None:
    task_id = add_task(db_conn, conversations=3)
    ids = [c["id"] for c in conversations(db_conn, task_id)]
    seen: list[TaskSnapshot] = []

    def processor(task: TaskSnapshot, context: Context) -> dict[str, Any]:
        seen.append(task)
        for conversation in task.conversations:
            if task.attempts == 1 and conversation.id == ids[1]:
                raise RuntimeError("the API answered 500")
            context.checkpoint(conversation.id, {"attempt": task.attempts})
        return {"before": {p.id: p.result for p in task.processed}}

    run_worker(processor)
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    assert [[c.id for c in t.conversations] for t in seen] == [ids, ids[1:]]
    assert [[p.id for p in t.processed] for t in seen] == [[], ids[:1]]
    rows = conversations(db_conn, task_id)
    assert [r["result"] for r in rows] == [{"attempt": 1}, {"attempt": 2}, {"attempt": 2}]
    assert task_row(db_conn, task_id)["result"] == {"before": {str(ids[0]): {"attempt": 1}}}
    assert task_row(db_conn, task_id)["attempts"] == 2


def test_conversations_added_or_edited_while_processing_are_not_reported_processed(
    run_worker, db_conn, client: FlaskClient
) -> None:
    task_id = add_task(db_conn, conversations=3)
    kept, edited, untouched = (c["id"] for c in conversations(db_conn, task_id))
    started, finish = threading.Event(), threading.Event()
    seen: list[TaskSnapshot] = []

    def processor(task: TaskSnapshot, context: Context) -> int:
        seen.append(task)
        if len(seen) == 1:
            context.checkpoint(kept, "kept")
            started.set()
            finish.wait(10)
            # Edited after the claim: this run saw the old content, so it can't be checkpointed.
            assert context.checkpoint(edited, "stale") is False
        return len(seen)

    run_worker(processor)
    assert started.wait(10)
    added = client.post(f"/tasks/{task_id}/conversations/", json={"content": "late"}).get_json()
    response = client.put(f"/conversations/{edited}", json={"content": "new text"})
    assert response.get_json()["status"] == "active"
    finish.set()

    # The rule: the run ends, the task goes back to pending at once, without spending an
    # attempt, and a continuation run gets exactly what the first never saw.
    wait_for(lambda: len(seen) == 2, what="the continuation run")
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    assert [c.content for c in seen[0].conversations] == ["c0", "c1", "c2"]
    assert [(c.id, c.content) for c in seen[1].conversations] == [
        (edited, "new text"),
        (added["id"], "late"),
    ]
    assert sorted(p.id for p in seen[1].processed) == [kept, untouched]
    row = task_row(db_conn, task_id)
    assert (row["attempts"], row["result"]) == (1, 2)
    assert task_errors(db_conn, task_id) == []
    assert conversation_statuses(db_conn, task_id) == ["processed"] * 4


def test_a_completion_that_leaves_unseen_conversations_active_puts_the_task_back(
    run_worker, db_conn, client: FlaskClient
) -> None:
    # What the first run's completion writes, seen before a continuation can start.
    task_id = add_task(db_conn, conversations=1)
    started, finish = threading.Event(), threading.Event()
    runs: list[int] = []

    def processor(task: TaskSnapshot) -> None:
        runs.append(task.attempts)
        if len(runs) == 1:
            started.set()
            finish.wait(10)

    worker, _ = run_worker(processor, worker_concurrency=1)
    assert started.wait(10)
    client.post(f"/tasks/{task_id}/conversations/", json={"content": "late"})
    worker.begin_stop()  # no continuation in this instance: look at the state in between
    finish.set()
    wait_for(lambda: worker.current_task_ids == [], what="the first run's end")
    row = task_row(db_conn, task_id)
    assert (row["status"], row["attempts"], row["lease_token"]) == ("pending", 0, None)
    assert conversation_statuses(db_conn, task_id) == ["processed", "active"]


def test_a_completed_task_that_gets_a_conversation_stays_completed(
    run_worker, db_conn, client: FlaskClient
) -> None:
    task_id = add_task(db_conn, conversations=1)
    run_worker(lambda task: None)
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    client.post(f"/tasks/{task_id}/conversations/", json={"content": "after"})
    assert status_of(db_conn, task_id) == "completed"
    assert conversation_statuses(db_conn, task_id) == ["processed", "active"]
    # POST /tasks/{id}/retry reruns it: every conversation active, results cleared.
    db_conn.execute("UPDATE conversations SET result = '1' WHERE task_id = %s", (task_id,))
    assert client.post(f"/tasks/{task_id}/retry").status_code == 200
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="the rerun")
    assert [r["result"] for r in conversations(db_conn, task_id)] == [None, None]
    assert conversation_statuses(db_conn, task_id) == ["processed", "processed"]


def test_a_checkpoint_after_the_lease_was_lost_raises_lease_lost(run_worker, db_conn) -> None:
    task_id = add_task(db_conn, conversations=1, max_attempts=1)
    (conversation,) = conversations(db_conn, task_id)
    taken, raised = threading.Event(), []

    def processor(task: TaskSnapshot, context: Context) -> None:
        taken.wait(10)
        with pytest.raises(ValueError, match="not one of"):
            context.checkpoint(10**9, None)
        try:
            context.checkpoint(conversation["id"], "late")
        except LeaseLost as exc:
            raised.append(exc)
            raise

    worker, _ = run_worker(processor)
    # Held by the worker (not just processing in the database, which comes first).
    wait_for(lambda: worker.current_task_ids == [task_id], what="the claim")
    db_conn.execute("UPDATE tasks SET lease_token = gen_random_uuid() WHERE id = %s", (task_id,))
    taken.set()
    wait_for(lambda: worker.current_task_ids == [], what="the worker letting go")
    assert raised and "no longer holds its lease" in str(raised[0])
    assert conversations(db_conn, task_id)[0]["status"] == "active"


def test_the_one_argument_form_still_works(run_worker, db_conn) -> None:
    def old_style(task: TaskSnapshot) -> str:
        return f"saw {len(task.conversations)}"

    def new_style(task: TaskSnapshot, context: Context) -> None: ...

    assert not takes_context(old_style) and takes_context(new_style)
    assert not takes_context(lambda task, retries=3: None)  # a default: not the context
    assert adapt(new_style) is new_style
    task_id = add_task(db_conn, conversations=2)
    run_worker(old_style)
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    assert task_row(db_conn, task_id)["result"] == "saw 2"
    assert conversation_statuses(db_conn, task_id) == ["processed", "processed"]


def test_task_processor_loads_either_form(settings) -> None:
    for name in ("tests.processors:fail_first_attempt", "tests.processors:checkpoint_each"):
        processor = load_processor(settings.with_changes(task_processor=name))
        assert callable(processor)
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_processor(settings.with_changes(task_processor="tests.processors:nothing"))


def test_a_hand_back_at_shutdown_keeps_the_checkpoints(run_worker, db_conn) -> None:
    task_id = add_task(db_conn, conversations=2)
    first, second = (c["id"] for c in conversations(db_conn, task_id))
    checkpointed, release = threading.Event(), threading.Event()
    seen: list[TaskSnapshot] = []

    def processor(task: TaskSnapshot, context: Context) -> None:
        seen.append(task)
        if len(seen) == 1:
            context.checkpoint(first, "before the stop")
            checkpointed.set()
            release.wait(10)
            with pytest.raises(LeaseLost):  # handed back meanwhile: nothing more is recorded
                context.checkpoint(second, "too late")

    worker, _ = run_worker(processor)
    assert checkpointed.wait(10)
    assert worker.stop(grace=0.2) == 1
    release.set()
    wait_for(lambda: worker.current_task_ids == [], what="the thread letting go")
    row = task_row(db_conn, task_id)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert conversation_statuses(db_conn, task_id) == ["processed", "active"]
    run_worker(processor)  # the next instance gets only what is left
    wait_for(lambda: status_of(db_conn, task_id) == "completed", what="completion")
    assert [c.id for c in seen[1].conversations] == [second]
    assert [(p.id, p.result) for p in seen[1].processed] == [(first, "before the stop")]


def test_result_max_bytes_is_read_and_checked_at_start() -> None:
    from taskapp.config import Settings

    assert Settings.from_env({}).result_max_bytes == 1024 * 1024
    assert Settings.from_env({"RESULT_MAX_BYTES": "4096"}).result_max_bytes == 4096
    for bad in ("0", "-1", "1.5", "big"):
        with pytest.raises(ConfigError, match="RESULT_MAX_BYTES"):
            Settings.from_env({"RESULT_MAX_BYTES": bad})


def test_a_result_postgresql_refuses_fails_the_attempt(run_worker, db_conn, monkeypatch) -> None:
    # Whatever encode_result() let through and jsonb still refuses is a failed attempt, not a
    # write retried until the lease runs out.
    monkeypatch.setattr("taskapp.worker.encode_result", lambda value, limit: '"\\u0000"')
    task_id = add_task(db_conn, max_attempts=1)
    run_worker(lambda task: "anything")
    wait_for(lambda: status_of(db_conn, task_id) == "failed", what="the failure")
    (error,) = task_errors(db_conn, task_id)
    assert error["error"].startswith("ResultNotStorable: PostgreSQL refused the result")
