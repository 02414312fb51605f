"""Idempotent create: one Idempotency-Key makes one task, however often and wherever it is sent."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import requests
from flask.testing import FlaskClient

from tests.api_helpers import assert_problem, assert_task_shape
from tests.support import Instance, healthy


def post(client: FlaskClient, body: Any, key: str | None) -> Any:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/tasks/", json=body, headers=headers)


def task_count(db_conn: psycopg.Connection) -> int:
    return db_conn.execute("SELECT count(*) FROM tasks").fetchone()[0]


def test_a_repeat_returns_the_first_response(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    body = {"title": "once", "priority": 3, "conversations": [{"content": "c"}]}
    first = post(client, body, "key-1")
    assert first.status_code == 201
    assert_task_shape(first.get_json())
    # The task changes meanwhile; the repeat still answers what the first request answered.
    client.put(f"/tasks/{first.get_json()['id']}", json={"title": "renamed"})
    second = post(client, body, "key-1")
    assert second.status_code == 201
    assert second.data == first.data
    assert second.headers["Location"] == first.headers["Location"]
    assert second.mimetype == "application/json"
    assert task_count(db_conn) == 1
    stored = db_conn.execute("SELECT key, task_id, fingerprint FROM idempotency_keys").fetchall()
    assert [(k, t, len(f)) for k, t, f in stored] == [("key-1", first.get_json()["id"], 64)]


def test_the_same_body_in_another_spelling_is_the_same_request(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    first = client.post(
        "/tasks/",
        data='{"title": "t", "priority": 1}',
        content_type="application/json",
        headers={"Idempotency-Key": "k"},
    )
    second = client.post(
        "/tasks/",
        data='{ "priority":1,"title":"t" }',
        content_type="application/json",
        headers={"Idempotency-Key": "k"},
    )
    assert (first.status_code, second.status_code) == (201, 201)
    assert second.data == first.data
    assert task_count(db_conn) == 1


def test_the_same_key_with_another_body_is_422(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    assert post(client, {"title": "one"}, "shared").status_code == 201
    assert_problem(post(client, {"title": "two"}, "shared"), 422, "Idempotency-Key")
    assert_problem(post(client, {"title": "one", "priority": 0}, "shared"), 422, "Idempotency-Key")
    assert task_count(db_conn) == 1


def test_different_keys_or_no_key_create_new_tasks(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    body = {"title": "t"}
    ids = {
        post(client, body, "a").get_json()["id"],
        post(client, body, "b").get_json()["id"],
        post(client, body, None).get_json()["id"],
        post(client, body, None).get_json()["id"],
    }
    assert len(ids) == 4 == task_count(db_conn)


def test_an_invalid_request_does_not_use_up_the_key(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    assert_problem(post(client, {"title": ""}, "retry-me"), 422, "title")
    assert db_conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0] == 0
    assert post(client, {"title": "fixed"}, "retry-me").status_code == 201


@pytest.mark.parametrize("key", ["x", "k" * 255, "a b", "550e8400-e29b-41d4-a716-446655440000"])
def test_keys_of_1_to_255_visible_characters_are_accepted(client: FlaskClient, key: str) -> None:
    assert post(client, {"title": "t"}, key).status_code == 201
    assert post(client, {"title": "t"}, key).status_code == 201


def test_a_replay_outlives_its_task(client: FlaskClient, db_conn: psycopg.Connection) -> None:
    first = post(client, {"title": "t"}, "gone")
    assert client.delete(first.headers["Location"]).status_code == 204
    again = post(client, {"title": "t"}, "gone")
    assert (again.status_code, again.data) == (201, first.data)
    assert task_count(db_conn) == 0


def test_racing_repeats_on_one_instance_make_one_task(
    app: Any, client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    barrier = threading.Barrier(10)
    responses: list[Any] = []

    def send() -> None:
        own = app.test_client()
        barrier.wait()
        responses.append(post(own, {"title": "race"}, "same-key"))

    threads = [threading.Thread(target=send) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [r.status_code for r in responses] == [201] * 10
    assert len({r.data for r in responses}) == 1
    assert task_count(db_conn) == 1


def test_racing_repeats_on_two_instances_make_one_task_per_key(
    instances: Callable[..., Instance], db_conn: psycopg.Connection
) -> None:
    first, second = healthy(
        instances(wait=False, WORKER_ENABLED=0), instances(wait=False, WORKER_ENABLED=0)
    )
    pairs = 25
    keys = [f"race-{n}-{uuid.uuid4()}" for n in range(pairs)]
    results: dict[str, list[requests.Response]] = {key: [] for key in keys}
    lock = threading.Lock()

    def send(instance: Instance, key: str, barrier: threading.Barrier) -> None:
        body = {"title": f"task for {key}", "conversations": [{"content": "c"}]}
        with requests.Session() as session:
            barrier.wait()
            response = session.post(
                f"{instance.url}/tasks/", json=body, headers={"Idempotency-Key": key}, timeout=30
            )
        with lock:
            results[key].append(response)

    threads = []
    for key in keys:
        barrier = threading.Barrier(2)
        threads += [
            threading.Thread(target=send, args=(instance, key, barrier))
            for instance in (first, second)
        ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    for key, (a, b) in results.items():
        assert (a.status_code, b.status_code) == (201, 201), (key, a.text, b.text)
        assert a.content == b.content  # the replay keeps the first response's key order too
        assert a.headers["Location"] == b.headers["Location"]
    assert task_count(db_conn) == pairs
    rows = db_conn.execute("SELECT count(*), count(DISTINCT task_id) FROM idempotency_keys")
    assert rows.fetchone() == (pairs, pairs)
    assert db_conn.execute("SELECT count(*) FROM conversations").fetchone()[0] == pairs
