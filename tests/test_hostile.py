"""Hostile and careless clients, in-process: what they send can't grow the metrics, can't be
a 500, can't come from another web page, and learns nothing about the database's address.
(The gunicorn-level cases, stalled streams and slow clients, are for tests on real instances.)"""

from __future__ import annotations

import json
import random
import re
import string
import time

import pytest
from flask import Flask
from flask.testing import FlaskClient

from taskapp.config import Settings
from taskapp.database import get_database
from tests.api_helpers import assert_problem


def metrics_text(client: FlaskClient) -> str:
    return client.get("/metrics").get_data(as_text=True)


def test_random_methods_add_no_metric_series(client: FlaskClient) -> None:
    client.get("/health")
    before = metrics_text(client)
    for _ in range(300):
        method = "".join(random.choices(string.ascii_uppercase, k=12))
        client.open("/health", method=method)
    after = metrics_text(client)
    methods = set(re.findall(r'taskapp_http_requests_total\{[^}]*method="([^"]+)"', after))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods
    # 300 odd methods are one new series per metric, not 300.
    assert len(after) - len(before) < 5_000


@pytest.mark.parametrize("task_id", ["²", "①", "\uff11\uff12", "1_0", " 1", "-1", "0"])
def test_a_task_id_in_a_stream_query_is_plain_digits_or_a_422(
    client: FlaskClient, task_id: str
) -> None:
    body = assert_problem(client.get("/events", query_string={"task_id": task_id}), 422)
    assert "task_id" in body["errors"]


@pytest.mark.parametrize(
    ("method", "path", "body_type"),
    [
        ("POST", "/tasks/", "text/plain"),
        ("POST", "/tasks/", "application/x-www-form-urlencoded"),
        ("POST", "/tasks/", "multipart/form-data; boundary=x"),
        ("POST", "/tasks/1/cancel", "text/plain"),
        ("POST", "/tasks/1/retry", "text/plain"),
        ("DELETE", "/tasks/1", "text/plain"),
        ("PUT", "/conversations/1", "text/plain"),
    ],
)
def test_a_body_not_sent_as_json_is_a_415_and_changes_nothing(
    client: FlaskClient, method: str, path: str, body_type: str
) -> None:
    created = client.post("/tasks/", json={"title": "kept", "conversations": [{"content": "c"}]})
    assert created.status_code == 201
    response = client.open(
        path, method=method, data='{"title": "x", "content": "x"}', content_type=body_type
    )
    body = assert_problem(response, 415)
    assert "Content-Type" in body["errors"]
    task = client.get("/tasks/1").get_json()
    assert (task["title"], task["status"], task["conversations"][0]["content"]) == (
        "kept",
        "pending",
        "c",
    )
    assert client.get("/tasks/").headers["X-Total-Count"] == "1"


def test_json_media_types_are_accepted(client: FlaskClient) -> None:
    for body_type in ("application/json", "application/json; charset=utf-8", "application/x+json"):
        response = client.post("/tasks/", data='{"title": "t"}', content_type=body_type)
        assert response.status_code == 201, body_type
    # No body and no Content-Type: an action is fine.
    assert client.post("/tasks/1/cancel").status_code == 200


@pytest.mark.parametrize("path", ["/health", "/tasks/", "/nowhere", "/dashboard/", "/apidocs/"])
def test_every_response_has_the_security_headers(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.headers.getlist("X-Content-Type-Options") == ["nosniff"]
    assert response.headers.getlist("X-Frame-Options") == ["DENY"]
    assert response.headers.getlist("Referrer-Policy") == ["no-referrer"]


def test_the_dashboard_has_a_csp_of_its_own_scripts(client: FlaskClient) -> None:
    policy = client.get("/dashboard/").headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "nonce" not in policy


def test_the_key_page_inline_code_carries_its_responses_nonce(settings: Settings) -> None:
    from taskapp import create_app

    app: Flask = create_app(settings.with_changes(api_keys=("k",)))
    pages = [app.test_client().get("/dashboard/", headers={"Accept": "text/html"}) for _ in "ab"]
    nonces = []
    for page in pages:
        assert page.status_code == 401
        # One nonce, for both script-src and style-src.
        (nonce,) = set(re.findall(r"'nonce-([^']+)'", page.headers["Content-Security-Policy"]))
        html = page.get_data(as_text=True)
        assert html.count(f'nonce="{nonce}"') == 2  # its <style> and its <script>
        nonces.append(nonce)
    assert nonces[0] != nonces[1]
    get_database(app).close()


def test_health_names_no_host_while_the_database_is_down() -> None:
    from taskapp import create_app

    unreachable = "postgresql://secret-user@db.internal.example:6543/taskdb?connect_timeout=1"
    app = create_app(Settings(database_url=unreachable, auto_migrate=False).validated())
    response = app.test_client().get("/health")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unhealthy", "database": "unreachable"}
    text = response.get_data(as_text=True)
    assert "db.internal" not in text and "6543" not in text and "secret-user" not in text
    get_database(app).close()


def test_a_body_of_65000_conversations_is_refused_at_once_and_briefly(client: FlaskClient) -> None:
    body = {"title": "t", "conversations": [{"content": ""}] * 65_000}
    compact = json.dumps(body, separators=(",", ":"))  # just under 1 MiB, as the issue sent it
    started = time.perf_counter()
    response = client.post("/tasks/", data=compact, content_type="application/json")
    elapsed = time.perf_counter() - started
    problem = assert_problem(response, 422, "conversations")
    assert "At most 1000 conversations" in problem["errors"]["conversations"][0]
    assert len(response.get_data()) < 1000  # one message, not one per conversation
    assert elapsed < 0.5  # (the bar is 50 ms on gunicorn; the test client adds JSON work)
    assert client.get("/tasks/").headers["X-Total-Count"] == "0"
    # The limit itself is fine.
    at_limit = client.post(
        "/tasks/", json={"title": "t", "conversations": [{"content": "c"}] * 1000}
    )
    assert at_limit.status_code == 201


def test_an_object_with_too_many_fields_is_one_422_at_once(client: FlaskClient) -> None:
    # 80,000 unknown fields: one error each cost 0.3 s of validation and a 2.4 MB 422.
    encoded = json.dumps({"title": "t", **{f"x{n}": 1 for n in range(80_000)}})
    # CPU time of this thread (the test client runs the app in it), against the cost of just
    # parsing the body in the same thread: a busy machine slows both alike.
    started = time.thread_time()
    json.loads(encoded)
    parsing = time.thread_time() - started
    started = time.thread_time()
    response = client.post("/tasks/", data=encoded, content_type="application/json")
    elapsed = time.thread_time() - started
    problem = assert_problem(response, 422, "_schema")
    assert "80001 fields, of which at most" in problem["errors"]["_schema"][0]
    assert len(response.get_data()) < 1000
    print(f"parsing {parsing:.3f}s, the whole 422 {elapsed:.3f}s")
    assert elapsed < 3 * parsing + 0.05
    # Nested objects too, named by their path.
    wide = {"title": "t", "conversations": [{"content": "c"}, {f"k{n}": 0 for n in range(22)}]}
    assert assert_problem(client.post("/tasks/", json=wide), 422, "conversations.1")


def test_a_422_names_at_most_100_fields(client: FlaskClient) -> None:
    body = {"title": "t", "conversations": [{"content": 5, "zz": 1} for _ in range(1000)]}
    response = client.post("/tasks/", json=body)
    problem = assert_problem(response, 422)
    assert len(problem["errors"]) == 100
    assert problem["detail"].endswith("and 1900 more fields.")
    assert len(response.get_data()) < 15_000  # 2,000 errors were a 95 KB 422


def test_a_task_has_at_most_10000_conversations(client: FlaskClient, db_conn) -> None:
    from taskapp.schemas import MAX_CONVERSATIONS_PER_TASK

    task = client.post("/tasks/", json={"title": "t"}).get_json()
    db_conn.execute(
        "INSERT INTO conversations (task_id, content) SELECT %s, 'c' FROM generate_series(1, %s)",
        (task["id"], MAX_CONVERSATIONS_PER_TASK - 1),
    )
    last = client.post(f"/tasks/{task['id']}/conversations/", json={"content": "last"})
    assert last.status_code == 201
    problem = assert_problem(
        client.post(f"/tasks/{task['id']}/conversations/", json={"content": "one more"}), 409
    )
    assert "10000 conversations" in problem["detail"]
    (count,) = db_conn.execute(
        "SELECT count(*) FROM conversations WHERE task_id = %s", (task["id"],)
    ).fetchone()
    assert count == MAX_CONVERSATIONS_PER_TASK
    assert assert_problem(client.post("/tasks/999/conversations/", json={"content": "c"}), 404)


@pytest.mark.parametrize("key", ["a,b", "a, b", "order-1, order-1"])
def test_an_idempotency_key_sent_twice_is_a_400_naming_it(client: FlaskClient, key: str) -> None:
    # gunicorn joins a repeated header with a comma: "a,b" is what two keys look like.
    response = client.post("/tasks/", json={"title": "t"}, headers={"Idempotency-Key": key})
    problem = assert_problem(response, 400, "Idempotency-Key")
    assert "once" in problem["detail"]
    assert client.get("/tasks/").headers["X-Total-Count"] == "0"
