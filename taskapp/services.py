"""Reads and writes of tasks and conversations: keyword-only functions that take the session
(or, for the single-statement reads and creates, the engine).

Tasks come back as the JSON text PostgreSQL renders for them (taskapp.representation).
Each write commits its own transaction, with its events (NOTIFY) inside it. State changes that
race with workers (retry, cancel, the run_after of an update) are single conditional UPDATEs,
so whoever commits first wins and the other sees the new state.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import representation
from .database import autocommit_connection
from .errors import Conflict, NotFound, Unprocessable
from .events import WAKEUP_CHANNEL, publish, publish_sql, wake_workers
from .models import Conversation, ConversationStatus, Task, TaskStatus
from .schemas import TaskUpdate

RETRYABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.COMPLETED)
IDEMPOTENCY_HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class TaskJSON:
    """A task as the API shows it: its id and the JSON text PostgreSQL rendered for it
    (taskapp.representation), which the routes send on unchanged."""

    id: int
    json: str


@dataclass(frozen=True)
class TaskPage:
    """One page of a task listing, as a JSON array, and the number of tasks in all pages."""

    json: str
    total: int


def _commit(session: Session) -> None:
    # Keep loaded objects as they are: the caller serialises them next, and reloading them in a
    # new transaction could find a row that a concurrent request deleted meanwhile.
    expire, session.expire_on_commit = session.expire_on_commit, False
    try:
        session.commit()
    finally:
        session.expire_on_commit = expire


def _driver_connection(session: Session) -> psycopg.Connection[Any]:
    """The psycopg connection of the session's transaction, to run the JSON-rendering
    statements (written for psycopg) inside it."""
    return session.connection().connection.driver_connection


_TASK_JSON = f"SELECT t.id, {representation.task_json()}::text FROM tasks AS t WHERE t.id = %s"


def _task_json(conn: psycopg.Connection[Any], task_id: int) -> TaskJSON:
    row = conn.execute(_TASK_JSON, (task_id,)).fetchone()
    if row is None:
        raise NotFound(f"Task {task_id} does not exist.")
    return TaskJSON(*row)


def _json_and_commit(session: Session, task_id: int) -> TaskJSON:
    """The task as the write left it, read before the commit so a concurrent delete can't
    make a successful write look like a 404."""
    task = _task_json(_driver_connection(session), task_id)
    session.commit()
    return task


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


# Reads and creates are single statements on an autocommitted connection: no BEGIN/COMMIT
# round trips (under READ COMMITTED a transaction would give two reads no common snapshot
# anyway), and the row goes straight to JSON inside PostgreSQL (bench/README.md).


def get_task(*, engine: Engine, task_id: int) -> TaskJSON:
    """One task with its conversations and error history; NotFound if it does not exist."""
    with autocommit_connection(engine) as conn:
        return _task_json(conn, task_id)


# The total comes from the counts the triggers keep (migration 0002): the same cost at any size.
_TASK_PAGE = f"""
SELECT (SELECT coalesce(sum(n), 0) FROM task_counts
        WHERE CAST(%(status)s AS text) IS NULL OR status = %(status)s),
       (SELECT coalesce(json_agg(item ORDER BY id), '[]')::text
        FROM (SELECT t.id, {representation.task_list_item_json()} AS item
              FROM tasks AS t
              WHERE CAST(%(status)s AS text) IS NULL OR t.status = %(status)s
              ORDER BY t.id
              LIMIT %(limit)s OFFSET %(offset)s) AS page)
"""


def list_tasks(*, engine: Engine, status: str | None = None, limit: int, offset: int) -> TaskPage:
    """A page of tasks ordered by id, each with its conversation count."""
    params = {"status": status, "limit": limit, "offset": offset}
    with autocommit_connection(engine) as conn:
        total, page = conn.execute(_TASK_PAGE, params).fetchone()
    return TaskPage(page, int(total))


# One statement inserts the task and its conversations, sends task.created (and the wake-up
# when it is due) and returns the task's JSON.
_INSERT_TASK = f"""
WITH t AS (
    INSERT INTO tasks (title, description, priority, scheduled_for, run_after, max_attempts)
    VALUES (%(title)s, %(description)s, %(priority)s, %(scheduled_for)s,
            coalesce(CAST(%(scheduled_for)s AS timestamptz), now()), %(max_attempts)s)
    RETURNING *
), c AS (
    INSERT INTO conversations (task_id, content)
    SELECT t.id, x.content
    FROM t, unnest(CAST(%(contents)s AS text[])) WITH ORDINALITY AS x(content, n)
    ORDER BY x.n
    RETURNING *
)
SELECT t.id,
       {representation.task_json(conversations="c")}::text,
       {publish_sql("task.created", "t")},
       CASE WHEN t.run_after <= now() THEN pg_notify('{WAKEUP_CHANNEL}', '') END
FROM t
"""


def _insert_task(
    conn: psycopg.Connection[Any],
    data: Mapping[str, Any],
    instance_id: str | None,
    default_max_attempts: int,
) -> TaskJSON:
    params = {
        "title": data["title"],
        "description": data.get("description"),
        "priority": data.get("priority", 0),
        "scheduled_for": data.get("scheduled_for"),
        "max_attempts": data.get("max_attempts", default_max_attempts),
        "contents": [item["content"] for item in data.get("conversations", [])],
        "instance_id": instance_id,
    }
    task_id, task, _created, _woken = conn.execute(_INSERT_TASK, params).fetchone()
    return TaskJSON(task_id, task)


def create_task(
    *,
    engine: Engine,
    data: Mapping[str, Any],
    instance_id: str | None,
    default_max_attempts: int,
) -> TaskJSON:
    """Create a pending task with its conversations; workers are woken if it is due."""
    with autocommit_connection(engine) as conn:
        return _insert_task(conn, data, instance_id, default_max_attempts)


def create_task_idempotently(
    *,
    engine: Engine,
    data: Mapping[str, Any],
    key: str,
    fingerprint: str,
    instance_id: str | None,
    default_max_attempts: int,
) -> TaskJSON:
    """Create a task once per key and return its first response; a repeat replays it.

    The key's row is inserted first, in the task's transaction: a concurrent request with the
    same key waits on it, then finds it committed and replays it, so one key makes one task.
    """
    with autocommit_connection(engine) as conn, conn.transaction():
        claimed = conn.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, response) VALUES (%s, %s, 'null')"
            " ON CONFLICT (key) DO NOTHING RETURNING key",
            (key, fingerprint),
        ).fetchone()
        if claimed is None:
            stored_fingerprint, task_id, response = conn.execute(
                "SELECT fingerprint, CAST(response ->> 'id' AS bigint), response::text"
                " FROM idempotency_keys WHERE key = %s",
                (key,),
            ).fetchone()
            if stored_fingerprint != fingerprint:
                raise Unprocessable(
                    "This Idempotency-Key was already used with a different request body.",
                    errors={IDEMPOTENCY_HEADER: ["Already used with a different request body."]},
                )
            return TaskJSON(task_id, response)
        task = _insert_task(conn, data, instance_id, default_max_attempts)
        conn.execute(
            "UPDATE idempotency_keys SET task_id = %s, response = CAST(%s AS json) WHERE key = %s",
            (task.id, task.json, key),
        )
        return task


# The fields a PUT may change, each a column of the same name (only these names reach the SQL).
_UPDATABLE = tuple(TaskUpdate().fields)


@functools.cache
def _update_statement(fields: tuple[str, ...]) -> str:
    # Built once per set of fields (at most 2^5): rendering the task's JSON SQL instantiates the
    # output schemas, too slow to repeat on every PUT.
    assignments = [f"{name} = %({name})s" for name in fields]
    if "scheduled_for" in fields:
        # Only a pending task waits on run_after; for the others it belongs to the worker.
        assignments.append(
            "run_after = CASE WHEN status = 'pending'"
            " THEN coalesce(CAST(%(scheduled_for)s AS timestamptz), now()) ELSE run_after END"
        )
    wake = "u.status = 'pending' AND u.run_after <= now()" if "scheduled_for" in fields else "false"
    return f"""
WITH u AS (
    UPDATE tasks SET {", ".join(assignments)}, updated_at = now()
    WHERE id = %(task_id)s
    RETURNING *
)
SELECT u.id, {representation.task_json("u")}::text,
       {publish_sql("task.updated", "u")},
       CASE WHEN {wake} THEN pg_notify('{WAKEUP_CHANNEL}', '') END
FROM u
"""


def update_task(
    *, engine: Engine, task_id: int, data: Mapping[str, Any], instance_id: str | None
) -> TaskJSON:
    """Change only the fields given; a new scheduled_for also moves a pending task's run time
    (and wakes the workers if that makes it due). One statement: the change, its event and the
    task as it now is."""
    fields = [name for name in _UPDATABLE if name in data]
    with autocommit_connection(engine) as conn:
        if not fields:
            return _task_json(conn, task_id)
        params = {**data, "task_id": task_id, "instance_id": instance_id}
        row = conn.execute(_update_statement(tuple(fields)), params).fetchone()
    if row is None:
        raise NotFound(f"Task {task_id} does not exist.")
    return TaskJSON(row[0], row[1])


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


def retry_task(*, session: Session, task_id: int, instance_id: str | None) -> TaskJSON:
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
    return _json_and_commit(session, task_id)


def cancel_task(*, session: Session, task_id: int, instance_id: str | None) -> TaskJSON:
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
    return _json_and_commit(session, task_id)


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
