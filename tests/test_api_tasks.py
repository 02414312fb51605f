"""The task endpoints through the Flask test client, against a real PostgreSQL."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event

from taskapp.events import CANCEL_CHANNEL, EVENTS_CHANNEL, WAKEUP_CHANNEL
from tests.api_helpers import (
    TASK_LIST_FIELDS,
    assert_problem,
    assert_task_shape,
)
from tests.support import listen_to_events

SENTINEL = "test-sentinel"


@pytest.fixture
def listener(database_url: str) -> Iterator[psycopg.Connection]:
    """A connection listening to the event and wake-up channels."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        listen_to_events(conn)
        conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
        yield conn


def notifications(listener: psycopg.Connection, db_conn: psycopg.Connection) -> list[Any]:
    """Everything published since the last call: NOTIFYs arrive in commit order, so reading up
    to a sentinel sent now collects exactly what came before it."""
    db_conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, SENTINEL))
    received: list[Any] = []
    for notify in listener.notifies(timeout=10):
        if notify.payload == SENTINEL:
            return received
        if notify.channel == WAKEUP_CHANNEL:
            received.append("wakeup")
        elif notify.channel == CANCEL_CHANNEL:
            received.append({"cancel": notify.payload})
        else:
            received.append(json.loads(notify.payload))
    raise AssertionError(f"no sentinel; got {received}")


def create(client: FlaskClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/tasks/", json={"title": "a task", **fields})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def set_status(db_conn: psycopg.Connection, task_id: int, status: str, **columns: Any) -> None:
    """Put a task in a state as the worker would (a processing task holds a lease)."""
    processing = status == "processing"
    values = {
        "status": status,
        "lease_token": uuid.uuid4() if processing else None,
        "lease_expires_at": datetime.now(UTC) + timedelta(minutes=5) if processing else None,
        "processing_instance_id": "other-instance" if processing else None,
        **columns,
    }
    assignments = ", ".join(f"{name} = %({name})s" for name in values)
    db_conn.execute(f"UPDATE tasks SET {assignments} WHERE id = %(id)s", {**values, "id": task_id})


def row(db_conn: psycopg.Connection, task_id: int) -> dict[str, Any]:
    cursor = db_conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,))
    names = [column.name for column in cursor.description]
    return dict(zip(names, cursor.fetchone(), strict=True))


# --- create -------------------------------------------------------------------------------


def test_create_returns_the_task_with_its_conversations(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    response = client.post(
        "/tasks/",
        json={
            "title": "Process customer feedback",
            "description": "Analyze and respond",
            "conversations": [{"content": "The app is slow"}, {"content": "Wants features"}],
        },
    )
    assert response.status_code == 201
    assert response.mimetype == "application/json"
    task = response.get_json()
    assert_task_shape(task)
    assert response.headers["Location"] == f"/tasks/{task['id']}"
    assert task["title"] == "Process customer feedback"
    assert task["description"] == "Analyze and respond"
    assert (task["status"], task["priority"], task["attempts"]) == ("pending", 0, 0)
    assert task["max_attempts"] == 3  # the MAX_ATTEMPTS default
    assert task["scheduled_for"] is None and task["processed_at"] is None
    assert task["last_error"] is None and task["processing_instance_id"] is None
    assert task["errors"] == []
    assert [c["content"] for c in task["conversations"]] == ["The app is slow", "Wants features"]
    assert {c["status"] for c in task["conversations"]} == {"active"}
    assert {c["task_id"] for c in task["conversations"]} == {task["id"]}
    assert client.get(response.headers["Location"]).get_json() == task
    count = db_conn.execute("SELECT count(*) FROM conversations WHERE task_id = %s", (task["id"],))
    assert count.fetchone()[0] == 2


def test_create_with_every_field(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    task = create(
        client,
        description=None,
        priority=-(2**31),
        scheduled_for="2030-01-01T09:00:00+02:00",
        max_attempts=100,
    )
    assert task["description"] is None
    assert task["priority"] == -(2**31)
    assert task["scheduled_for"] == "2030-01-01T07:00:00+00:00"
    assert task["max_attempts"] == 100
    assert task["conversations"] == []
    assert row(db_conn, task["id"])["run_after"] == datetime(2030, 1, 1, 7, tzinfo=UTC)


def test_create_takes_max_attempts_from_the_settings(settings: Any) -> None:
    from taskapp import create_app

    app = create_app(settings.with_changes(max_attempts=7))
    assert app.test_client().post("/tasks/", json={"title": "t"}).get_json()["max_attempts"] == 7


def test_an_unscheduled_task_is_due_now(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    task = create(client)
    run_after, now = db_conn.execute(
        "SELECT run_after, now() FROM tasks WHERE id = %s", (task["id"],)
    ).fetchone()
    assert run_after <= now


def test_create_publishes_and_wakes_workers(
    client: FlaskClient, listener: psycopg.Connection, db_conn: psycopg.Connection
) -> None:
    task = create(client)
    received = notifications(listener, db_conn)
    assert "wakeup" in received
    (created,) = [e for e in received if e != "wakeup"]
    assert created["type"] == "task.created"
    assert created["task_id"] == task["id"] and created["status"] == "pending"
    assert created["instance_id"] == client.application.config["TASKAPP"].instance_id


def test_a_task_scheduled_later_wakes_nobody(
    client: FlaskClient, listener: psycopg.Connection, db_conn: psycopg.Connection
) -> None:
    create(client, scheduled_for="2999-01-01T00:00:00Z")
    assert [e["type"] for e in notifications(listener, db_conn)] == ["task.created"]


# --- read and list -------------------------------------------------------------------------


def test_get_a_missing_task_is_404(client: FlaskClient) -> None:
    assert_problem(client.get("/tasks/12345"), 404)


def test_detail_shows_the_error_history(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    task = create(client)
    db_conn.execute(
        "INSERT INTO task_errors (task_id, attempt, instance_id, error) VALUES "
        "(%s, 1, 'i-1', 'ValueError: one'), (%s, 2, NULL, 'KeyError: two')",
        (task["id"], task["id"]),
    )
    errors = client.get(f"/tasks/{task['id']}").get_json()["errors"]
    assert [(e["attempt"], e["instance_id"], e["error"]) for e in errors] == [
        (1, "i-1", "ValueError: one"),
        (2, None, "KeyError: two"),
    ]
    assert list(errors[0]) == ["attempt", "instance_id", "error", "at"]


def test_list_orders_by_id_with_conversation_counts(client: FlaskClient) -> None:
    first = create(client, conversations=[{"content": "a"}, {"content": "b"}])
    second = create(client)
    third = create(client, conversations=[{"content": "c"}])
    response = client.get("/tasks/")
    assert response.status_code == 200
    assert response.headers["X-Total-Count"] == "3"
    items = response.get_json()
    for item in items:
        assert_task_shape(item, TASK_LIST_FIELDS)
    assert [(i["id"], i["conversation_count"]) for i in items] == [
        (first["id"], 2),
        (second["id"], 0),
        (third["id"], 1),
    ]


def test_list_pages_and_counts(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    db_conn.execute(
        "INSERT INTO tasks (title, max_attempts) "
        "SELECT 'task ' || n, 3 FROM generate_series(1, 105) n"
    )
    default = client.get("/tasks/")
    assert len(default.get_json()) == 100
    assert default.headers["X-Total-Count"] == "105"
    page = client.get("/tasks/?limit=10&offset=100")
    assert [t["title"] for t in page.get_json()] == [f"task {n}" for n in range(101, 106)]
    assert page.headers["X-Total-Count"] == "105"
    assert client.get("/tasks?limit=1000").get_json()[-1]["title"] == "task 105"
    beyond = client.get(f"/tasks/?offset={2**63 - 1}")
    assert beyond.status_code == 200 and beyond.get_json() == []
    assert beyond.headers["X-Total-Count"] == "105"


def test_list_filters_by_status(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    ids = [create(client)["id"] for _ in range(4)]
    set_status(db_conn, ids[1], "failed")
    set_status(db_conn, ids[3], "failed")
    set_status(db_conn, ids[2], "processing")
    failed = client.get("/tasks/?status=failed")
    assert [t["id"] for t in failed.get_json()] == [ids[1], ids[3]]
    assert failed.headers["X-Total-Count"] == "2"
    assert [t["id"] for t in client.get("/tasks/?status=processing").get_json()] == [ids[2]]
    empty = client.get("/tasks/?status=completed")
    assert empty.get_json() == [] and empty.headers["X-Total-Count"] == "0"


def test_list_makes_the_same_few_queries_for_any_page_size(
    app: Flask, client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    from taskapp.extensions import db

    with app.app_context():
        engine = db.engine
    for n in range(30):
        create(client, conversations=[{"content": str(i)} for i in range(n % 3)])
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        client.get("/tasks/?limit=2")
        small = len(statements)
        statements.clear()
        items = client.get("/tasks/?limit=30").get_json()
        large = len(statements)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert [i["conversation_count"] for i in items] == [n % 3 for n in range(30)]
    assert large == small <= 4, statements


# --- update --------------------------------------------------------------------------------


def test_update_changes_only_the_fields_sent(client: FlaskClient) -> None:
    task = create(client, description="old", priority=5, conversations=[{"content": "c"}])
    response = client.put(f"/tasks/{task['id']}", json={"title": "new title"})
    assert response.status_code == 200
    updated = response.get_json()
    assert_task_shape(updated)
    assert updated["title"] == "new title"
    unchanged = {k: v for k, v in updated.items() if k not in ("title", "updated_at")}
    assert unchanged == {k: v for k, v in task.items() if k not in ("title", "updated_at")}
    assert updated["updated_at"] > task["updated_at"]

    cleared = client.put(f"/tasks/{task['id']}", json={"description": None, "max_attempts": 1})
    assert (cleared.get_json()["description"], cleared.get_json()["max_attempts"]) == (None, 1)
    assert client.get(f"/tasks/{task['id']}").get_json() == cleared.get_json()


def test_an_empty_update_changes_nothing(client: FlaskClient) -> None:
    task = create(client)
    response = client.put(f"/tasks/{task['id']}", json={})
    assert response.status_code == 200 and response.get_json() == task


def test_rescheduling_a_pending_task_moves_its_run_time(
    client: FlaskClient, db_conn: psycopg.Connection, listener: psycopg.Connection
) -> None:
    task = create(client, scheduled_for="2999-01-01T00:00:00Z")
    notifications(listener, db_conn)
    later = client.put(f"/tasks/{task['id']}", json={"scheduled_for": "2998-05-05T05:05:05+00:00"})
    assert later.get_json()["scheduled_for"] == "2998-05-05T05:05:05+00:00"
    assert row(db_conn, task["id"])["run_after"] == datetime(2998, 5, 5, 5, 5, 5, tzinfo=UTC)
    assert [e["type"] for e in notifications(listener, db_conn)] == ["task.updated"]

    now = client.put(f"/tasks/{task['id']}", json={"scheduled_for": None})
    assert now.get_json()["scheduled_for"] is None
    run_after, db_now = db_conn.execute(
        "SELECT run_after, now() FROM tasks WHERE id = %s", (task["id"],)
    ).fetchone()
    assert run_after <= db_now
    received = notifications(listener, db_conn)
    assert "wakeup" in received
    assert [e["type"] for e in received if e != "wakeup"] == ["task.updated"]


def test_rescheduling_a_processing_task_leaves_the_claim_alone(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    task = create(client)
    set_status(db_conn, task["id"], "processing")
    before = row(db_conn, task["id"])
    response = client.put(f"/tasks/{task['id']}", json={"scheduled_for": "2999-01-01T00:00:00Z"})
    assert response.get_json()["status"] == "processing"
    after = row(db_conn, task["id"])
    assert after["run_after"] == before["run_after"]
    assert after["lease_token"] == before["lease_token"]
    assert after["scheduled_for"] == datetime(2999, 1, 1, tzinfo=UTC)


def test_update_of_a_missing_task_is_404(client: FlaskClient) -> None:
    assert_problem(client.put("/tasks/999", json={"title": "x"}), 404)
    assert_problem(client.put("/tasks/999", json={}), 404)


# --- delete --------------------------------------------------------------------------------


def test_delete_removes_the_task_and_its_conversations(
    client: FlaskClient,
    db_conn: psycopg.Connection,
    listener: psycopg.Connection,
) -> None:
    task = create(client, conversations=[{"content": "a"}])
    notifications(listener, db_conn)
    response = client.delete(f"/tasks/{task['id']}")
    assert response.status_code == 204
    assert response.data == b""
    assert "Content-Type" not in response.headers
    assert_problem(client.get(f"/tasks/{task['id']}"), 404)
    assert db_conn.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0
    (deleted,) = notifications(listener, db_conn)
    assert (deleted["type"], deleted["task_id"]) == ("task.deleted", task["id"])
    assert_problem(client.delete(f"/tasks/{task['id']}"), 404)


def test_a_processing_task_can_be_deleted(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    task = create(client)
    set_status(db_conn, task["id"], "processing")
    assert client.delete(f"/tasks/{task['id']}").status_code == 204
    assert db_conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


# --- retry and cancel ----------------------------------------------------------------------


@pytest.mark.parametrize("status", ["failed", "cancelled", "completed"])
def test_retry_sends_a_finished_task_back_to_pending(
    client: FlaskClient,
    db_conn: psycopg.Connection,
    listener: psycopg.Connection,
    status: str,
) -> None:
    task = create(client, conversations=[{"content": "a"}, {"content": "b"}])
    set_status(
        db_conn,
        task["id"],
        status,
        attempts=3,
        last_error="ValueError: boom",
        processed_at=datetime.now(UTC),
        run_after=datetime(2999, 1, 1, tzinfo=UTC),
    )
    db_conn.execute("UPDATE conversations SET status = 'processed'")
    notifications(listener, db_conn)

    response = client.post(f"/tasks/{task['id']}/retry")
    assert response.status_code == 200
    retried = response.get_json()
    assert_task_shape(retried)
    assert (retried["status"], retried["attempts"]) == ("pending", 0)
    assert retried["last_error"] == "ValueError: boom"
    assert retried["processed_at"] is None and retried["processing_instance_id"] is None
    assert {c["status"] for c in retried["conversations"]} == {"active"}
    stored = db_conn.execute(
        "SELECT run_after <= now(), lease_token, lease_expires_at FROM tasks WHERE id = %s",
        (task["id"],),
    ).fetchone()
    assert stored == (True, None, None)
    received = notifications(listener, db_conn)
    assert "wakeup" in received
    assert [(e["type"], e["status"]) for e in received if e != "wakeup"] == [
        ("task.updated", "pending")
    ]


@pytest.mark.parametrize("status", ["pending", "processing"])
def test_retry_from_other_states_is_a_conflict(
    client: FlaskClient, db_conn: psycopg.Connection, status: str
) -> None:
    task = create(client)
    set_status(db_conn, task["id"], status)
    before = row(db_conn, task["id"])
    body = assert_problem(client.post(f"/tasks/{task['id']}/retry"), 409)
    assert status in body["detail"]
    assert row(db_conn, task["id"]) == before


def test_cancel_a_pending_task(
    client: FlaskClient, db_conn: psycopg.Connection, listener: psycopg.Connection
) -> None:
    task = create(client)
    notifications(listener, db_conn)
    response = client.post(f"/tasks/{task['id']}/cancel")
    assert response.status_code == 200
    assert_task_shape(response.get_json())
    assert response.get_json()["status"] == "cancelled"
    assert [(e["type"], e["status"]) for e in notifications(listener, db_conn)] == [
        ("task.cancelled", "cancelled")
    ]
    assert_problem(client.post(f"/tasks/{task['id']}/cancel"), 409)


def test_cancel_a_processing_task_revokes_its_lease_and_tells_its_holder(
    client: FlaskClient, db_conn: psycopg.Connection, listener: psycopg.Connection
) -> None:
    task = create(client)
    set_status(db_conn, task["id"], "processing")
    listener.execute(f"LISTEN {CANCEL_CHANNEL}")
    notifications(listener, db_conn)
    response = client.post(f"/tasks/{task['id']}/cancel")
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled"
    after = row(db_conn, task["id"])
    assert (after["status"], after["lease_token"], after["lease_expires_at"]) == (
        "cancelled",
        None,
        None,
    )
    received = notifications(listener, db_conn)
    assert [e["type"] for e in received if isinstance(e, dict) and "type" in e] == [
        "task.cancelled"
    ]
    assert {"cancel": str(task["id"])} in [e for e in received if isinstance(e, dict)]


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_cancel_from_other_states_is_a_conflict(
    client: FlaskClient, db_conn: psycopg.Connection, status: str
) -> None:
    task = create(client)
    set_status(db_conn, task["id"], status)
    assert_problem(client.post(f"/tasks/{task['id']}/cancel"), 409)
    assert row(db_conn, task["id"])["status"] == status


def test_retry_and_cancel_of_a_missing_task_are_404(client: FlaskClient) -> None:
    assert_problem(client.post("/tasks/77/retry"), 404)
    assert_problem(client.post("/tasks/77/cancel"), 404)


def test_concurrent_cancels_succeed_once(app: Flask, client: FlaskClient) -> None:
    task = create(client)
    barrier = threading.Barrier(8)
    statuses: list[int] = []

    def cancel() -> None:
        own = app.test_client()
        barrier.wait()
        statuses.append(own.post(f"/tasks/{task['id']}/cancel").status_code)

    threads = [threading.Thread(target=cancel) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(statuses) == [200] + [409] * 7


def test_cancel_waits_for_a_completion_in_flight_and_then_conflicts(
    app: Flask, client: FlaskClient, database_url: str
) -> None:
    """A worker's completion holds the row lock; the cancel waits, re-reads the row once the
    completion commits, finds it completed and changes nothing."""
    task = create(client)
    result: dict[str, Any] = {}
    with psycopg.connect(database_url) as worker:
        worker.execute(
            "UPDATE tasks SET status = 'completed', processed_at = now() WHERE id = %s",
            (task["id"],),
        )
        thread = threading.Thread(
            target=lambda: result.update(
                response=app.test_client().post(f"/tasks/{task['id']}/cancel")
            )
        )
        thread.start()
        # The cancel is blocked on the claim's row lock until the claim commits.
        with psycopg.connect(database_url, autocommit=True) as probe:
            from tests.support import wait_for

            wait_for(
                lambda: probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                ).fetchone()[0],
                what="the cancel to wait on the completion's lock",
            )
        worker.commit()
    thread.join(timeout=30)
    assert_problem(result["response"], 409)
    assert client.get(f"/tasks/{task['id']}").get_json()["status"] == "completed"


# --- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/tasks", {"title": "t"}, 201),
        ("get", "/tasks", None, 200),
        ("get", "/tasks/{id}", None, 200),
        ("put", "/tasks/{id}", {"title": "u"}, 200),
        ("post", "/tasks/{id}/cancel", None, 200),
        ("post", "/tasks/{id}/retry", None, 409),
        ("post", "/tasks/{id}/conversations", {"content": "c"}, 201),
        ("get", "/tasks/{id}/conversations", None, 200),
        ("put", "/conversations/{cid}", {"content": "d"}, 200),
        ("delete", "/tasks/{id}", None, 204),
    ],
)
@pytest.mark.parametrize("slash", ["", "/"])
def test_paths_work_with_and_without_the_trailing_slash(
    client: FlaskClient, method: str, path: str, body: Any, status: int, slash: str
) -> None:
    task = create(client, conversations=[{"content": "c"}])
    url = path.format(id=task["id"], cid=task["conversations"][0]["id"]) + slash
    response = getattr(client, method)(url, json=body)
    assert response.status_code == status, (url, response.get_data(as_text=True))
    assert "Location" not in response.headers or response.status_code == 201


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+00:00"),
        ("0001-01-01T00:59:00-01:00", "0001-01-01T01:59:00+00:00"),
        ("9999-12-31T23:59:59.999999+00:00", "9999-12-31T23:59:59.999999+00:00"),
        ("2030-06-01T12:00:00.5+05:30", "2030-06-01T06:30:00.500000+00:00"),
        ("2030-06-01 12:00:00-07:00", "2030-06-01T19:00:00+00:00"),
    ],
)
def test_times_are_stored_and_shown_in_utc(client: FlaskClient, sent: str, shown: str) -> None:
    task = create(client, scheduled_for=sent)
    assert task["scheduled_for"] == shown
    assert client.get(f"/tasks/{task['id']}").get_json()["scheduled_for"] == shown
