"""Assertions shared by the HTTP API tests."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import psycopg

from taskapp.errors import PROBLEM_TYPES

PROBLEM = "application/problem+json"
TASK_FIELDS = [
    "id",
    "title",
    "description",
    "status",
    "priority",
    "scheduled_for",
    "attempts",
    "max_attempts",
    "last_error",
    "created_at",
    "updated_at",
    "processed_at",
    "processing_instance_id",
    "queue",
    "concurrency_key",
    "started_at",
    "timeout_seconds",
    "deferrals",
    "progress",
]
# A task's `result` (the processor's return value) is in its detail, not in the list.
TASK_DETAIL_FIELDS = [*TASK_FIELDS, "result", "conversations", "errors"]
TASK_LIST_FIELDS = [*TASK_FIELDS, "conversation_count"]
CONVERSATION_FIELDS = [
    "id",
    "task_id",
    "content",
    "status",
    "created_at",
    "updated_at",
    "processed_at",
    "result",
]
# The tables an API request may write; `instances` belongs to running workers.
API_TABLES = (
    "tasks",
    "conversations",
    "task_errors",
    "idempotency_keys",
    "queues",
    "concurrency_keys",
)
_UTC_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00")


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (naming `field` if given)."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    assert response.mimetype == PROBLEM, response.mimetype
    body = response.get_json(force=True)
    assert body["status"] == status
    # Its kind (taskapp.errors.PROBLEM_TYPES): one of those of its status.
    assert body["type"] in {k.uri for k in PROBLEM_TYPES.values() if k.status == status}, body
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.get_data(as_text=True)
    if field is not None:
        assert field in body["errors"], body
        assert all(isinstance(m, str) for m in body["errors"][field])
    return body


def assert_utc_time(value: str | None, nullable: bool = False) -> None:
    """An ISO 8601 time with a +00:00 offset."""
    if value is None and nullable:
        return
    assert isinstance(value, str) and _UTC_ISO.fullmatch(value), value
    datetime.fromisoformat(value)


def assert_task_shape(task: dict[str, Any], fields: list[str] = TASK_DETAIL_FIELDS) -> None:
    """Exactly the contract's fields, with times in UTC."""
    assert list(task) == fields
    for name in ("created_at", "updated_at"):
        assert_utc_time(task[name])
    for name in ("scheduled_for", "processed_at"):
        assert_utc_time(task[name], nullable=True)
    for conversation in task.get("conversations", []):
        assert_conversation_shape(conversation)


def assert_conversation_shape(conversation: dict[str, Any]) -> None:
    assert list(conversation) == CONVERSATION_FIELDS
    assert_utc_time(conversation["created_at"])
    assert_utc_time(conversation["updated_at"])
    assert_utc_time(conversation["processed_at"], nullable=True)


def dump_tables(conn: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the API could have written, for before/after comparisons."""
    return {
        table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in API_TABLES
    }
