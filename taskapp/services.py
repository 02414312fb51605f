"""Reads and writes of tasks and conversations: keyword-only functions that take the session.

Each write commits its own transaction, with its events (NOTIFY) inside it. State changes that
race with workers (retry, cancel, the run_after of an update) are single conditional UPDATEs,
so whoever commits first wins and the other sees the new state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from marshmallow import Schema, fields
from sqlalchemy import case, delete, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from .errors import Conflict, NotFound, Unprocessable
from .events import publish, wake_workers
from .models import (
    Conversation,
    ConversationStatus,
    IdempotencyKey,
    Task,
    TaskCount,
    TaskStatus,
)
from .schemas import TaskOut

RETRYABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.COMPLETED)
IDEMPOTENCY_HEADER = "Idempotency-Key"
_TASK_OUT = TaskOut()  # built once: schemas are reusable and costly to build


# A task as the API shows it: its columns, with its conversations and error history (detail)
# or its conversation_count (lists).
TaskView = dict[str, Any]


@dataclass(frozen=True)
class TaskPage:
    """One page of a task listing and the number of tasks in all pages."""

    items: list[TaskView]
    total: int


def _commit(session: Session) -> None:
    # Keep loaded objects as they are: the caller serialises them next, and reloading them in a
    # new transaction could find a row that a concurrent request deleted meanwhile.
    expire, session.expire_on_commit = session.expire_on_commit, False
    try:
        session.commit()
    finally:
        session.expire_on_commit = expire


# A task is read in one statement, its conversations and errors aggregated as JSON, and
# serialised straight from the row: loading ORM objects with their relationships, in several
# round trips, cost most of a request's time (bench/README.md).
_TASK_VIEW = text("""
SELECT t.*,
       (SELECT coalesce(json_agg(json_build_object(
                   'id', c.id, 'task_id', c.task_id, 'content', c.content, 'status', c.status,
                   'created_at', c.created_at, 'updated_at', c.updated_at) ORDER BY c.id), '[]')
        FROM conversations AS c WHERE c.task_id = t.id) AS conversations,
       (SELECT coalesce(json_agg(json_build_object(
                   'attempt', e.attempt, 'instance_id', e.instance_id, 'error', e.error,
                   'at', e.at) ORDER BY e.id), '[]')
        FROM task_errors AS e WHERE e.task_id = t.id) AS errors
FROM tasks AS t
WHERE t.id = :task_id
""")
_TASK_PAGE = text("""
SELECT t.*, (SELECT count(*) FROM conversations AS c WHERE c.task_id = t.id) AS conversation_count
FROM tasks AS t
WHERE CAST(:status AS text) IS NULL OR t.status = :status
ORDER BY t.id
LIMIT :limit OFFSET :offset
""")


def _parse_times(item: dict[str, Any], *names: str) -> dict[str, Any]:
    # json_build_object renders timestamptz as ISO 8601 (the connection's time zone is UTC).
    for name in names:
        if item.get(name) is not None:
            item[name] = datetime.fromisoformat(item[name])
    return item


def _task_view(executor: Session | Connection, task_id: int) -> TaskView:
    row = executor.execute(_TASK_VIEW, {"task_id": task_id}).mappings().first()
    if row is None:
        raise NotFound(f"Task {task_id} does not exist.")
    return _as_view(row)


def _view_and_commit(session: Session, task_id: int) -> TaskView:
    """The task as the write left it, read before the commit so a concurrent delete can't
    make a successful write look like a 404."""
    task = _task_view(session, task_id)
    session.commit()
    return task


def _as_view(row: Mapping[str, Any]) -> TaskView:
    task = dict(row)
    task["conversations"] = [
        _parse_times(c, "created_at", "updated_at") for c in task["conversations"]
    ]
    task["errors"] = [_parse_times(e, "at") for e in task["errors"]]
    return task


@contextmanager
def _autocommit(session: Session) -> Iterator[Connection]:
    """A pooled connection in autocommit, for reads and single-statement writes: no BEGIN,
    COMMIT or ROLLBACK round trips. (Under READ COMMITTED, a transaction would give several
    reads no common snapshot anyway.)"""
    with session.get_bind().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


def _load_conversation(session: Session, conversation_id: int) -> Conversation:
    conversation = session.scalars(
        select(Conversation)
        .where(Conversation.id == conversation_id)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if conversation is None:
        raise NotFound(f"Conversation {conversation_id} does not exist.")
    return conversation


def _task_status(session: Session, task_id: int, *, lock: bool = False) -> str:
    query = select(Task.status).where(Task.id == task_id)
    if lock:
        # FOR KEY SHARE: the task can't be deleted under us, yet workers can still update it.
        query = query.with_for_update(key_share=True)
    status = session.scalar(query)
    if status is None:
        raise NotFound(f"Task {task_id} does not exist.")
    return status


def get_task(*, session: Session, task_id: int) -> TaskView:
    """One task with its conversations and error history; NotFound if it does not exist."""
    with _autocommit(session) as conn:
        return _task_view(conn, task_id)


def list_tasks(*, session: Session, status: str | None = None, limit: int, offset: int) -> TaskPage:
    """A page of tasks ordered by id, each with its conversation count."""
    with _autocommit(session) as conn:
        total = _count_tasks(conn, status)
        page = conn.execute(
            _TASK_PAGE, {"status": status, "limit": limit, "offset": offset}
        ).mappings()
        return TaskPage([dict(task) for task in page], total)


def _count_tasks(executor: Session | Connection, status: str | None) -> int:
    """How many tasks there are (with that status), from the counts the triggers keep."""
    query = select(func.coalesce(func.sum(TaskCount.n), 0))
    if status:
        query = query.where(TaskCount.status == status)
    return int(executor.execute(query).scalar_one())


# One statement inserts the task and its conversations, sends task.created (and the wake-up
# when it is due) and returns the task as _TASK_VIEW shows it.
_INSERT_TASK = text("""
WITH t AS (
    INSERT INTO tasks (title, description, priority, scheduled_for, run_after, max_attempts)
    VALUES (:title, :description, :priority, :scheduled_for,
            coalesce(CAST(:scheduled_for AS timestamptz), now()), :max_attempts)
    RETURNING *
), c AS (
    INSERT INTO conversations (task_id, content)
    SELECT t.id, x.content
    FROM t, unnest(CAST(:contents AS text[])) WITH ORDINALITY AS x(content, n)
    ORDER BY x.n
    RETURNING *
)
SELECT t.*,
       (SELECT coalesce(json_agg(json_build_object(
                   'id', c.id, 'task_id', c.task_id, 'content', c.content, 'status', c.status,
                   'created_at', c.created_at, 'updated_at', c.updated_at) ORDER BY c.id), '[]')
        FROM c) AS conversations,
       '[]'::json AS errors,
       pg_notify('taskapp_events', json_build_object(
           'type', 'task.created', 'task_id', t.id, 'status', t.status,
           'instance_id', CAST(:instance_id AS text), 'at', now())::text) AS created_event,
       CASE WHEN t.run_after <= now() THEN pg_notify('taskapp_wakeup', '') END AS woken
FROM t
""")


def _insert_task(
    executor: Session | Connection,
    data: Mapping[str, Any],
    instance_id: str | None,
    default_max_attempts: int,
) -> TaskView:
    params = {
        "title": data["title"],
        "description": data.get("description"),
        "priority": data.get("priority", 0),
        "scheduled_for": data.get("scheduled_for"),
        "max_attempts": data.get("max_attempts", default_max_attempts),
        "contents": [item["content"] for item in data.get("conversations", [])],
        "instance_id": instance_id,
    }
    return _as_view(executor.execute(_INSERT_TASK, params).mappings().one())


def create_task(
    *,
    session: Session,
    data: Mapping[str, Any],
    instance_id: str | None,
    default_max_attempts: int,
) -> TaskView:
    """Create a pending task with its conversations; workers are woken if it is due."""
    with _autocommit(session) as conn:
        return _insert_task(conn, data, instance_id, default_max_attempts)


def create_task_idempotently(
    *,
    session: Session,
    data: Mapping[str, Any],
    key: str,
    fingerprint: str,
    instance_id: str | None,
    default_max_attempts: int,
) -> dict[str, Any]:
    """Create a task once per key and return its serialised first response; a repeat replays it.

    The key's row is inserted first, in the task's transaction: a concurrent request with the
    same key waits on it, then finds it committed and replays it, so one key makes one task.
    """
    claimed = session.execute(
        insert(IdempotencyKey)
        .values(key=key, fingerprint=fingerprint, response={})
        .on_conflict_do_nothing(index_elements=[IdempotencyKey.key])
        .returning(IdempotencyKey.key)
    ).first()
    if claimed is None:
        stored_fingerprint, response = session.execute(
            select(IdempotencyKey.fingerprint, IdempotencyKey.response).where(
                IdempotencyKey.key == key
            )
        ).one()
        session.rollback()
        if stored_fingerprint != fingerprint:
            raise Unprocessable(
                "This Idempotency-Key was already used with a different request body.",
                errors={IDEMPOTENCY_HEADER: ["Already used with a different request body."]},
            )
        return _in_field_order(_TASK_OUT, response)
    task = _insert_task(session, data, instance_id, default_max_attempts)
    body: dict[str, Any] = _TASK_OUT.dump(task)
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.key == key)
        .values(task_id=task["id"], response=body)
    )
    session.commit()
    return body


def _in_field_order(schema: Schema, data: Mapping[str, Any]) -> dict[str, Any]:
    # JSONB does not keep key order; give a replay the byte-for-byte order of the first response.
    ordered: dict[str, Any] = {}
    for name, field in schema.dump_fields.items():
        if name not in data:
            continue
        value = data[name]
        inner = field.inner if isinstance(field, fields.List) else None
        if isinstance(inner, fields.Nested) and isinstance(value, list):
            nested = inner.schema
            value = [_in_field_order(nested, item) for item in value]
        ordered[name] = value
    return ordered


def update_task(
    *, session: Session, task_id: int, data: Mapping[str, Any], instance_id: str | None
) -> TaskView:
    """Change only the fields given; a new scheduled_for also moves a pending task's run time."""
    if not data:
        return _task_view(session, task_id)
    values: dict[str, Any] = {**data, "updated_at": func.now()}
    if "scheduled_for" in data:
        scheduled_for = data["scheduled_for"]
        run_after = scheduled_for if scheduled_for is not None else func.now()
        # Only a pending task waits on run_after; for the others it belongs to the worker.
        values["run_after"] = case(
            (Task.status == TaskStatus.PENDING.value, run_after), else_=Task.run_after
        )
    row = session.execute(
        update(Task)
        .where(Task.id == task_id)
        .values(values)
        .returning(Task.status, Task.run_after <= func.now())
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        raise NotFound(f"Task {task_id} does not exist.")
    status, due = row
    publish(session, "task.updated", task_id=task_id, status=status, instance_id=instance_id)
    if "scheduled_for" in data and status == TaskStatus.PENDING and due:
        wake_workers(session)
    return _view_and_commit(session, task_id)


def delete_task(*, session: Session, task_id: int, instance_id: str | None) -> None:
    """Delete a task and its conversations; a worker processing it lets go when it finishes."""
    status = session.scalar(
        delete(Task)
        .where(Task.id == task_id)
        .returning(Task.status)
        .execution_options(synchronize_session=False)
    )
    if status is None:
        raise NotFound(f"Task {task_id} does not exist.")
    publish(session, "task.deleted", task_id=task_id, status=status, instance_id=instance_id)
    session.commit()


def _state_conflict(session: Session, task_id: int, action: str, allowed: Sequence[str]) -> None:
    status = _task_status(session, task_id)
    names = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
    raise Conflict(f"Task {task_id} is {status}; only {names} tasks can be {action}.")


def retry_task(*, session: Session, task_id: int, instance_id: str | None) -> TaskView:
    """Send a failed, cancelled or completed task back to pending with fresh attempts."""
    retried = session.scalar(
        update(Task)
        .where(Task.id == task_id, Task.status.in_([s.value for s in RETRYABLE]))
        .values(
            status=TaskStatus.PENDING.value,
            attempts=0,
            run_after=func.now(),
            lease_token=None,
            lease_expires_at=None,
            processing_instance_id=None,
            processed_at=None,
            updated_at=func.now(),
        )
        .returning(Task.id)
        .execution_options(synchronize_session=False)
    )
    if retried is None:
        _state_conflict(session, task_id, "retried", [s.value for s in RETRYABLE])
    session.execute(
        update(Conversation)
        .where(
            Conversation.task_id == task_id,
            Conversation.status != ConversationStatus.ACTIVE.value,
        )
        .values(status=ConversationStatus.ACTIVE.value, updated_at=func.now())
        .execution_options(synchronize_session=False)
    )
    publish(
        session,
        "task.updated",
        task_id=task_id,
        status=TaskStatus.PENDING.value,
        instance_id=instance_id,
    )
    wake_workers(session)
    return _view_and_commit(session, task_id)


def cancel_task(*, session: Session, task_id: int, instance_id: str | None) -> TaskView:
    """Cancel a pending task; one already claimed by a worker is a Conflict."""
    cancelled = session.scalar(
        update(Task)
        .where(Task.id == task_id, Task.status == TaskStatus.PENDING.value)
        .values(status=TaskStatus.CANCELLED.value, updated_at=func.now())
        .returning(Task.id)
        .execution_options(synchronize_session=False)
    )
    if cancelled is None:
        _state_conflict(session, task_id, "cancelled", [TaskStatus.PENDING.value])
    publish(
        session,
        "task.cancelled",
        task_id=task_id,
        status=TaskStatus.CANCELLED.value,
        instance_id=instance_id,
    )
    return _view_and_commit(session, task_id)


def create_conversation(
    *, session: Session, task_id: int, data: Mapping[str, Any], instance_id: str | None
) -> Conversation:
    """Add a conversation to a task; NotFound if the task does not exist."""
    task_status = _task_status(session, task_id, lock=True)
    conversation = Conversation(
        task_id=task_id, content=data["content"], status=ConversationStatus.ACTIVE.value
    )
    session.add(conversation)
    session.flush()
    publish(
        session,
        "conversation.created",
        task_id=task_id,
        status=task_status,
        instance_id=instance_id,
        conversation_id=conversation.id,
    )
    conversation = _load_conversation(session, conversation.id)
    _commit(session)
    return conversation


def list_conversations(*, session: Session, task_id: int) -> list[Conversation]:
    """A task's conversations ordered by id; NotFound if the task does not exist."""
    _task_status(session, task_id)
    return list(
        session.scalars(
            select(Conversation).where(Conversation.task_id == task_id).order_by(Conversation.id)
        )
    )


def update_conversation(
    *, session: Session, conversation_id: int, data: Mapping[str, Any], instance_id: str | None
) -> Conversation:
    """Change a conversation's content and/or status."""
    if not data:
        return _load_conversation(session, conversation_id)
    task_id = session.scalar(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values({**data, "updated_at": func.now()})
        .returning(Conversation.task_id)
        .execution_options(synchronize_session=False)
    )
    if task_id is None:
        raise NotFound(f"Conversation {conversation_id} does not exist.")
    publish(
        session,
        "conversation.updated",
        task_id=task_id,
        status=_task_status(session, task_id),
        instance_id=instance_id,
        conversation_id=conversation_id,
    )
    conversation = _load_conversation(session, conversation_id)
    _commit(session)
    return conversation
