"""Bad input of every kind: each is a problem+json with the right status, names the bad field
on a 422, is never a 5xx, and leaves the database exactly as it was."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from tests.api_helpers import assert_problem, dump_tables

TASK = 1  # the seeded task, with conversation CONVERSATION
CONVERSATION = 1
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad request and what the service must answer."""

    method: str
    path: str
    status: int
    field: str | None = None
    json: Any = None
    data: bytes | str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        sent = self.data if self.data is not None else self.json
        text = repr(sent)
        headers = f" {self.headers}" if self.headers else ""
        return f"{self.method} {self.path}{headers} {text[:60]}{'…' if len(text) > 60 else ''}"


def create(body: Any, *, field: str | None = None, status: int = 422, **kw: Any) -> Bad:
    return Bad("POST", "/tasks/", status, field, json=body, **kw)


def update(body: Any, *, field: str | None = None, status: int = 422) -> Bad:
    return Bad("PUT", f"/tasks/{TASK}", status, field, json=body)


def raw(path: str, data: bytes | str, method: str = "POST") -> Bad:
    return Bad(method, path, 400, data=data)


def titled(**fields: Any) -> dict[str, Any]:
    return {"title": "ok", **fields}


CASES: list[Bad] = [
    # title
    create({}, field="title"),
    create({"title": ""}, field="title"),
    create({"title": " "}, field="title"),
    create({"title": "\t\n\r "}, field="title"),
    create({"title": "\u3000\u00a0\u2028"}, field="title"),
    create({"title": "x" * 256}, field="title"),
    create({"title": "a\x00b"}, field="title"),
    create({"title": "\x00"}, field="title"),
    create({"title": None}, field="title"),
    create({"title": 123}, field="title"),
    create({"title": True}, field="title"),
    create({"title": ["x"]}, field="title"),
    create({"title": {"text": "x"}}, field="title"),
    Bad("POST", "/tasks/", 422, "title", data='{"title": "\\ud800"}'),
    # description
    create(titled(description=5), field="description"),
    create(titled(description="nul\x00"), field="description"),
    create(titled(description=["x"]), field="description"),
    # priority: int32, strictly an integer
    create(titled(priority=True), field="priority"),
    create(titled(priority=1.5), field="priority"),
    create(titled(priority=1.0), field="priority"),
    create(titled(priority="5"), field="priority"),
    create(titled(priority=2**31), field="priority"),
    create(titled(priority=-(2**31) - 1), field="priority"),
    create(titled(priority=2**64), field="priority"),
    create(titled(priority=None), field="priority"),
    Bad("POST", "/tasks/", 422, "priority", data='{"title": "t", "priority": 1e400}'),
    # max_attempts: 1..100
    create(titled(max_attempts=0), field="max_attempts"),
    create(titled(max_attempts=101), field="max_attempts"),
    create(titled(max_attempts=-1), field="max_attempts"),
    create(titled(max_attempts=False), field="max_attempts"),
    create(titled(max_attempts="3"), field="max_attempts"),
    create(titled(max_attempts=2.0), field="max_attempts"),
    create(titled(max_attempts=None), field="max_attempts"),
    # scheduled_for: ISO 8601 with an offset
    create(titled(scheduled_for="2030-01-01T00:00:00"), field="scheduled_for"),
    create(titled(scheduled_for="2030-01-01"), field="scheduled_for"),
    create(titled(scheduled_for="tomorrow"), field="scheduled_for"),
    create(titled(scheduled_for=1893456000), field="scheduled_for"),
    create(titled(scheduled_for=True), field="scheduled_for"),
    create(titled(scheduled_for="2030-13-01T00:00:00Z"), field="scheduled_for"),
    create(titled(scheduled_for="0001-01-01T00:00:00+01:00"), field="scheduled_for"),
    create(titled(scheduled_for="9999-12-31T23:00:00-05:00"), field="scheduled_for"),
    # conversations
    create(titled(conversations=None), field="conversations"),
    create(titled(conversations="x"), field="conversations"),
    create(titled(conversations={"content": "x"}), field="conversations"),
    create(titled(conversations=[1]), field="conversations.0"),
    create(titled(conversations=[{}]), field="conversations.0.content"),
    create(titled(conversations=[{"content": ""}]), field="conversations.0.content"),
    create(titled(conversations=[{"content": None}]), field="conversations.0.content"),
    create(titled(conversations=[{"content": 5}]), field="conversations.0.content"),
    create(
        titled(conversations=[{"content": "ok"}, {"content": "a\x00"}]),
        field="conversations.1.content",
    ),
    create(
        titled(conversations=[{"content": "x", "status": "active"}]), field="conversations.0.status"
    ),
    # unknown fields (status is not writable)
    create(titled(bogus=1), field="bogus"),
    create(titled(status="completed"), field="status"),
    create(titled(id=5), field="id"),
    create(titled(attempts=0), field="attempts"),
    # the Idempotency-Key header
    create(titled(), field="Idempotency-Key", headers={"Idempotency-Key": "k" * 256}),
    create(titled(), field="Idempotency-Key", headers={"Idempotency-Key": ""}),
    create(titled(), field="Idempotency-Key", headers={"Idempotency-Key": "clé"}),
    # bodies that are not a JSON object
    raw("/tasks/", "[]"),
    raw("/tasks/", '[{"title": "t"}]'),
    raw("/tasks/", '"title"'),
    raw("/tasks/", "42"),
    raw("/tasks/", "null"),
    raw("/tasks/", "true"),
    raw("/tasks/", ""),
    raw("/tasks/", "{"),
    raw("/tasks/", "title=x"),
    raw("/tasks/", '{"title": NaN}'),
    raw("/tasks/", '{"title": "t", "priority": Infinity}'),
    raw("/tasks/", b"\xff\xfe\x00{"),
    raw("/tasks/", "[" * 100_000 + "]" * 100_000),
    raw(f"/tasks/{TASK}", "[]", "PUT"),
    raw(f"/tasks/{TASK}", "", "PUT"),
    raw(f"/tasks/{TASK}/conversations/", "nope"),
    raw(f"/tasks/{TASK}/conversations/", '["content"]'),
    raw(f"/conversations/{CONVERSATION}", "1", "PUT"),
    # bodies over the size limit
    Bad("POST", "/tasks/", 413, data='{"title": "' + "x" * (2 * MIB) + '"}'),
    Bad("PUT", f"/tasks/{TASK}", 413, data=b" " * (MIB + 1)),
    Bad("POST", f"/tasks/{TASK}/conversations/", 413, data=b"{" * (2 * MIB)),
    Bad("PUT", f"/conversations/{CONVERSATION}", 413, data=b"x" * (5 * MIB)),
    # updates
    update({"status": "completed"}, field="status"),
    update({"status": "pending", "title": "x"}, field="status"),
    update({"title": None}, field="title"),
    update({"title": ""}, field="title"),
    update({"title": "   "}, field="title"),
    update({"priority": "high"}, field="priority"),
    update({"max_attempts": 0}, field="max_attempts"),
    update({"scheduled_for": "2030-01-01 10:00"}, field="scheduled_for"),
    update({"conversations": []}, field="conversations"),
    update({"attempts": 0}, field="attempts"),
    Bad("POST", f"/tasks/{TASK}/conversations/", 422, "content", json={}),
    Bad("POST", f"/tasks/{TASK}/conversations/", 422, "content", json={"content": ""}),
    Bad("POST", f"/tasks/{TASK}/conversations/", 422, "content", json={"content": None}),
    Bad("POST", f"/tasks/{TASK}/conversations/", 422, "content", json={"content": ["a"]}),
    Bad("POST", f"/tasks/{TASK}/conversations/", 422, "content", json={"content": "\x00"}),
    Bad(
        "POST", f"/tasks/{TASK}/conversations/", 422, "task_id", json={"content": "a", "task_id": 2}
    ),
    Bad("PUT", f"/conversations/{CONVERSATION}", 422, "status", json={"status": "done"}),
    Bad("PUT", f"/conversations/{CONVERSATION}", 422, "status", json={"status": None}),
    Bad("PUT", f"/conversations/{CONVERSATION}", 422, "content", json={"content": ""}),
    Bad("PUT", f"/conversations/{CONVERSATION}", 422, "content", json={"content": 7}),
    Bad("PUT", f"/conversations/{CONVERSATION}", 422, "task_id", json={"task_id": 2}),
    # list parameters
    *[
        Bad("GET", f"/tasks/?{query}", 422, name)
        for query, name in [
            ("limit=-1", "limit"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=abc", "limit"),
            ("limit=1.5", "limit"),
            ("limit=", "limit"),
            ("limit=1_0", "limit"),
            ("limit=%201", "limit"),
            ("offset=-1", "offset"),
            (f"offset={2**64}", "offset"),
            (f"offset={2**63}", "offset"),
            ("offset=x", "offset"),
            ("status=bogus", "status"),
            ("status=", "status"),
            ("status=PENDING", "status"),
            ("sort=id", "sort"),
        ]
    ],
    # method not allowed
    *[
        Bad(method, path, 405)
        for method, path in [
            ("PATCH", "/tasks/"),
            ("DELETE", "/tasks/"),
            ("PUT", "/tasks/"),
            ("PATCH", f"/tasks/{TASK}"),
            ("POST", f"/tasks/{TASK}"),
            ("GET", f"/tasks/{TASK}/retry"),
            ("PUT", f"/tasks/{TASK}/cancel"),
            ("DELETE", f"/tasks/{TASK}/conversations/"),
            ("POST", f"/conversations/{CONVERSATION}"),
            ("DELETE", f"/conversations/{CONVERSATION}"),
        ]
    ],
    # unknown paths
    Bad("GET", "/nope", 404),
    Bad("GET", f"/tasks/{TASK}/bogus", 404),
    Bad("GET", f"/tasks//{TASK}", 404),
    Bad("GET", "/conversations/", 404),
]

ID_ROUTES = [
    ("GET", "/tasks/{}", None),
    ("PUT", "/tasks/{}", {"title": "x"}),
    ("DELETE", "/tasks/{}", None),
    ("POST", "/tasks/{}/retry", None),
    ("POST", "/tasks/{}/cancel", None),
    ("POST", "/tasks/{}/conversations/", {"content": "x"}),
    ("GET", "/tasks/{}/conversations/", None),
    ("PUT", "/conversations/{}", {"content": "x"}),
]
BAD_IDS = ["0", "-1", "abc", str(2**31), str(2**63), str(2**64), "1e3", "01", "1.0", "%201"]
CASES += [
    Bad(method, path.format(bad_id), 404, json=body)
    for method, path, body in ID_ROUTES
    for bad_id in BAD_IDS
]


@pytest.fixture
def seeded(client: FlaskClient, db_conn: psycopg.Connection) -> Iterator[None]:
    response = client.post("/tasks/", json={"title": "seed", "conversations": [{"content": "c"}]})
    assert response.status_code == 201
    assert response.get_json()["id"] == TASK
    assert response.get_json()["conversations"][0]["id"] == CONVERSATION
    yield


def test_there_are_many_cases() -> None:
    assert len(CASES) >= 60
    assert len({str(case) for case in CASES}) == len(CASES), "duplicate cases"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_a_problem_and_changes_nothing(
    client: FlaskClient, db_conn: psycopg.Connection, seeded: None, case: Bad
) -> None:
    before = dump_tables(db_conn)
    kwargs: dict[str, Any] = {"headers": case.headers}
    if case.data is not None:
        kwargs["data"] = case.data
        kwargs["content_type"] = "application/json"
    elif case.json is not None:
        kwargs["json"] = case.json
    response = client.open(case.path, method=case.method, **kwargs)
    assert_problem(response, case.status, case.field)
    if case.status == 405:
        assert response.headers["Allow"]
    assert dump_tables(db_conn) == before
