"""The task JSON that PostgreSQL renders (taskapp.representation) is the output schemas' dump.

Rows are written directly, with the values where two renderers could disagree: timestamps with
and without microseconds, at the ends of the allowed range, NULLs, quotes, backslashes, control
characters and text outside the BMP. The API's bytes, parsed, must equal marshmallow's dump of
the same rows, field for field and in the schemas' order.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from flask.testing import FlaskClient
from psycopg.rows import dict_row

from taskapp.schemas import TaskListItem, TaskOut

AWKWARD_TEXT = 'quote " backslash \\ tab \t newline \n nul-free \x01\x1f é 漢字 😀 </script>'

TASKS = [
    {
        "title": AWKWARD_TEXT,
        "description": None,
        "status": "pending",
        "scheduled_for": "0001-01-01 00:00:00+00",
        "created_at": "2026-01-02 03:04:05+00",  # no microseconds: isoformat() omits them
        "updated_at": "2026-01-02 03:04:05.000001+00",
        "processed_at": None,
        "last_error": None,
        "processing_instance_id": None,
    },
    {
        "title": "done",
        "description": AWKWARD_TEXT,
        "status": "failed",
        "scheduled_for": "9999-12-31 23:59:59.999999+00",
        "created_at": "2026-06-30 23:59:59.5+02",  # another offset: rendered in UTC
        "updated_at": "2026-07-01 00:00:00.100000+00",
        "processed_at": "2026-07-01 00:00:00.123456+00",
        "last_error": AWKWARD_TEXT,
        "processing_instance_id": "instance-ü",
    },
]


def _insert(db_conn: psycopg.Connection) -> list[int]:
    ids = []
    for n, task in enumerate(TASKS):
        columns = ", ".join(task)
        values = ", ".join(["%s"] * len(task))
        task_id = db_conn.execute(
            f"INSERT INTO tasks ({columns}, priority, attempts, max_attempts)"
            f" VALUES ({values}, %s, %s, %s) RETURNING id",
            [*task.values(), -(2**31) + n, 2**31 - 1, 100],
        ).fetchone()[0]
        for content, created in [(AWKWARD_TEXT, "2026-01-01 00:00:00+00"), ("x", "now()")]:
            db_conn.execute(
                "INSERT INTO conversations (task_id, content, status, created_at, updated_at)"
                " VALUES (%s, %s, 'processed', CAST(%s AS timestamptz), now())",
                (task_id, content, created),
            )
        db_conn.execute(
            "INSERT INTO task_errors (task_id, attempt, instance_id, error, at)"
            " VALUES (%s, 1, NULL, %s, '2026-03-04 05:06:07.000007+00'), (%s, 2, 'i', 'e', now())",
            (task_id, AWKWARD_TEXT, task_id),
        )
        ids.append(task_id)
    return ids


def _rows(db_conn: psycopg.Connection, sql: str, *params: Any) -> list[dict[str, Any]]:
    with db_conn.cursor(row_factory=dict_row) as cursor:
        return cursor.execute(sql, params).fetchall()


def _expected_detail(db_conn: psycopg.Connection, task_id: int) -> dict[str, Any]:
    (task,) = _rows(db_conn, "SELECT * FROM tasks WHERE id = %s", task_id)
    task["conversations"] = _rows(
        db_conn, "SELECT * FROM conversations WHERE task_id = %s ORDER BY id", task_id
    )
    task["errors"] = _rows(
        db_conn, "SELECT * FROM task_errors WHERE task_id = %s ORDER BY id", task_id
    )
    return TaskOut().dump(task)


def _parsed(response: Any) -> Any:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    return json.loads(response.get_data(as_text=True))


def test_a_task_is_rendered_as_the_output_schema_dumps_it(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    for task_id in _insert(db_conn):
        rendered = _parsed(client.get(f"/tasks/{task_id}"))
        expected = _expected_detail(db_conn, task_id)
        assert rendered == expected
        assert list(rendered) == list(expected)  # the schema's field order
        assert [list(c) for c in rendered["conversations"]] == [
            list(c) for c in expected["conversations"]
        ]
        assert [list(e) for e in rendered["errors"]] == [list(e) for e in expected["errors"]]


def test_a_listed_task_is_rendered_as_the_list_schema_dumps_it(
    client: FlaskClient, db_conn: psycopg.Connection
) -> None:
    _insert(db_conn)
    rendered = _parsed(client.get("/tasks/"))
    rows = _rows(
        db_conn,
        "SELECT t.*, (SELECT count(*) FROM conversations c WHERE c.task_id = t.id)"
        " AS conversation_count FROM tasks t ORDER BY t.id",
    )
    expected = TaskListItem(many=True).dump(rows)
    assert rendered == expected
    assert [list(task) for task in rendered] == [list(task) for task in expected]


def test_an_empty_page_is_an_empty_array(client: FlaskClient) -> None:
    response = client.get("/tasks/?status=failed")
    assert _parsed(response) == []
    assert response.headers["X-Total-Count"] == "0"


def test_a_created_task_is_rendered_as_a_read_renders_it(client: FlaskClient) -> None:
    created = client.post(
        "/tasks/", json={"title": AWKWARD_TEXT, "conversations": [{"content": AWKWARD_TEXT}]}
    )
    assert created.status_code == 201
    read = client.get(created.headers["Location"])
    assert created.get_data() == read.get_data()
