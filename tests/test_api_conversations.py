"""The conversation endpoints through the Flask test client, against a real PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
from flask.testing import FlaskClient

from tests.api_helpers import assert_conversation_shape, assert_problem
from tests.support import listen_to_events


def create_task(client: FlaskClient, *contents: str) -> dict[str, Any]:
    body = {"title": "t", "conversations": [{"content": c} for c in contents]}
    response = client.post("/tasks/", json=body)
    assert response.status_code == 201
    return response.get_json()


def with_event(database_url: str, request: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Make a request and return its response with the one event it published."""
    with psycopg.connect(database_url, autocommit=True) as listener:
        listen_to_events(listener)
        response = request()
        (notify,) = listener.notifies(timeout=5, stop_after=1)
    return response, json.loads(notify.payload)


def test_add_a_conversation(client: FlaskClient, database_url: str) -> None:
    task = create_task(client, "first")
    response, event = with_event(
        database_url,
        lambda: client.post(f"/tasks/{task['id']}/conversations/", json={"content": "second"}),
    )
    assert response.status_code == 201
    conversation = response.get_json()
    assert_conversation_shape(conversation)
    assert conversation["task_id"] == task["id"]
    assert (conversation["content"], conversation["status"]) == ("second", "active")
    assert event["type"] == "conversation.created"
    assert (event["task_id"], event["conversation_id"]) == (task["id"], conversation["id"])
    assert event["status"] == "pending"  # the task's status
    detail = client.get(f"/tasks/{task['id']}").get_json()
    assert [c["content"] for c in detail["conversations"]] == ["first", "second"]
    assert detail["conversations"][1] == conversation


def test_add_to_a_missing_task_is_404(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    assert_problem(client.post("/tasks/42/conversations/", json={"content": "x"}), 404)
    assert db_conn.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0


def test_list_a_tasks_conversations_in_order(client: FlaskClient) -> None:
    task = create_task(client, "a", "b", "c")
    other = create_task(client, "elsewhere")
    response = client.get(f"/tasks/{task['id']}/conversations/")
    assert response.status_code == 200
    listed = response.get_json()
    for conversation in listed:
        assert_conversation_shape(conversation)
    assert [c["content"] for c in listed] == ["a", "b", "c"]
    assert listed == task["conversations"]
    assert [c["content"] for c in client.get(f"/tasks/{other['id']}/conversations").get_json()] == [
        "elsewhere"
    ]


def test_list_of_a_task_without_conversations_is_empty(client: FlaskClient) -> None:
    task = create_task(client)
    response = client.get(f"/tasks/{task['id']}/conversations/")
    assert response.status_code == 200 and response.get_json() == []


def test_list_of_a_missing_task_is_404(client: FlaskClient) -> None:
    assert_problem(client.get("/tasks/42/conversations/"), 404)


def test_update_content_and_status(client: FlaskClient, database_url: str) -> None:
    task = create_task(client, "old", "other")
    conversation = task["conversations"][0]
    response, event = with_event(
        database_url,
        lambda: client.put(f"/conversations/{conversation['id']}", json={"content": "new"}),
    )
    assert response.status_code == 200
    updated = response.get_json()
    assert_conversation_shape(updated)
    assert (updated["content"], updated["status"]) == ("new", "active")
    assert updated["updated_at"] > conversation["updated_at"]
    assert updated["created_at"] == conversation["created_at"]
    assert (event["type"], event["conversation_id"]) == ("conversation.updated", conversation["id"])

    processed = client.put(f"/conversations/{conversation['id']}", json={"status": "processed"})
    assert (processed.get_json()["content"], processed.get_json()["status"]) == ("new", "processed")
    both = client.put(
        f"/conversations/{conversation['id']}", json={"content": "again", "status": "active"}
    )
    assert (both.get_json()["content"], both.get_json()["status"]) == ("again", "active")
    # The other conversation is untouched.
    listed = client.get(f"/tasks/{task['id']}/conversations").get_json()
    assert listed[1] == task["conversations"][1]


def test_an_empty_update_changes_nothing(client: FlaskClient) -> None:
    conversation = create_task(client, "same")["conversations"][0]
    response = client.put(f"/conversations/{conversation['id']}", json={})
    assert response.status_code == 200 and response.get_json() == conversation


def test_update_of_a_missing_conversation_is_404(client: FlaskClient) -> None:
    assert_problem(client.put("/conversations/404", json={"content": "x"}), 404)
    assert_problem(client.put("/conversations/404", json={}), 404)


def test_conversations_go_with_their_task(client: FlaskClient) -> None:
    task = create_task(client, "a")
    conversation_id = task["conversations"][0]["id"]
    assert client.delete(f"/tasks/{task['id']}").status_code == 204
    assert_problem(client.put(f"/conversations/{conversation_id}", json={"content": "x"}), 404)


def test_a_conversation_has_no_delete_or_post(client: FlaskClient) -> None:
    conversation_id = create_task(client, "a")["conversations"][0]["id"]
    for method in ("delete", "post"):
        response = getattr(client, method)(f"/conversations/{conversation_id}")
        assert_problem(response, 405)
        assert {"GET", "PUT"} <= set(response.headers["Allow"].split(", "))
