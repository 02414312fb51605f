"""Reads and writes of tasks and conversations: keyword-only functions that take the Database.

No Flask and no SQL here: each function runs named statements of taskapp/sql/tasks.sql through
the Database gateway, and chooses whether they need a transaction (most are one statement,
autocommitted). Tasks and conversations come back as the JSON text PostgreSQL renders for them
(taskapp.representation). Events (NOTIFY) are sent inside the changing statement, so they go
out only on commit. State changes that race with workers (retry, cancel, the run_after of an
update) are single conditional UPDATEs, so whoever commits first wins.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from . import metrics, queue, states
from .config import DEFAULT_QUEUE
from .database import Database
from .errors import Conflict, ConversationLimit, NotFound, PreconditionFailed
from .schemas import MAX_CONVERSATIONS_PER_TASK

# The fields a PUT /tasks/{id} may change, each a column of the same name; the input schema
# (schemas.TaskUpdate) validates them and tests check that the two agree.
TASK_FIELDS = (
    "title",
    "description",
    "priority",
    "scheduled_for",
    "max_attempts",
    "timeout_seconds",
    "queue",
    "concurrency_key",
)
CONVERSATION_FIELDS = ("content", "status")


@dataclass(frozen=True)
class Rendered:
    """A row as the API shows it: its id and the JSON text PostgreSQL rendered for it, which
    the routes send on unchanged."""

    id: int
    json: str


@dataclass(frozen=True)
class TaskPage:
    """One page of a task listing, as a JSON array, and the number of tasks in all pages."""

    json: str
    total: int


class IdempotencyKeyReused(Exception):
    """The Idempotency-Key was already used with a different request body."""


# A conditional write's precondition (If-Match): given the task as GET shows it now, whether
# the write may go ahead. The HTTP side (entity tags) stays in the routes.
Precondition = Callable[[Rendered], bool]


def _check_precondition(
    database: Database, conn: psycopg.Connection[Any], task_id: int, precondition: Precondition
) -> Rendered:
    """Lock the task for the rest of the transaction and test the precondition on it as it
    is: no other write to its row (an editor's, a worker's) can come between the test and the
    write. NotFound first:
    a missing task is a 404 whatever the precondition (RFC 9110, section 13.2.2)."""
    current = _rendered(
        database.fetchone("lock_task", {"task_id": task_id}, conn=conn), _task_not_found, task_id
    )
    if not precondition(current):
        raise PreconditionFailed(
            f"Task {task_id} has changed since the version named in If-Match; read it again "
            "and send its current ETag."
        )
    return current


@contextlib.contextmanager
def _writing(
    database: Database,
    task_id: int,
    precondition: Precondition | None,
    *,
    transaction: bool = False,
) -> Iterator[tuple[psycopg.Connection[Any], Rendered | None]]:
    """A connection for a write to one task, and the task as it was when a precondition was
    given: then the connection is a transaction in which the task was locked and tested first
    (PreconditionFailed when the test fails). Without one, a plain connection (a transaction
    only when asked)."""
    if precondition is None and not transaction:
        with database.connection() as conn:
            yield conn, None
        return
    with database.transaction() as conn:
        if precondition is None:
            yield conn, None
        else:
            yield conn, _check_precondition(database, conn, task_id, precondition)


def _task_not_found(task_id: int) -> NotFound:
    return NotFound(f"Task {task_id} does not exist.")


def _rendered(row: Any, missing: Callable[[int], NotFound], key: int) -> Rendered:
    """The row as Rendered; `missing(key)` raised when there is none (built only then: the
    hot reads should not make an exception they don't raise)."""
    if row is None:
        raise missing(key)
    return Rendered(row.id, row.json)


def get_task(*, database: Database, task_id: int) -> Rendered:
    """One task with its conversations and error history; NotFound if it does not exist."""
    return _rendered(database.fetchone("get_task", {"task_id": task_id}), _task_not_found, task_id)


def list_tasks(
    *,
    database: Database,
    status: str | None = None,
    queue: str | None = None,
    limit: int,
    offset: int,
) -> TaskPage:
    """A page of tasks ordered by id, each with its conversation count."""
    params = {"status": status, "queue": queue, "limit": limit, "offset": offset}
    row = database.fetchone("list_tasks", params)
    return TaskPage(row.json, int(row.total))


def _creation_params(
    data: Mapping[str, Any], instance_id: str | None, default_max_attempts: int
) -> dict[str, Any]:
    max_attempts = data.get("max_attempts")
    return {
        "title": data["title"],
        "description": data.get("description"),
        "priority": data.get("priority", 0),
        "scheduled_for": data.get("scheduled_for"),
        "max_attempts": default_max_attempts if max_attempts is None else max_attempts,
        "timeout_seconds": data.get("timeout_seconds"),
        "queue": data.get("queue", DEFAULT_QUEUE),
        "concurrency_key": data.get("concurrency_key"),
        "contents": [item["content"] for item in data.get("conversations", ())],
        "instance_id": instance_id,
    }


def create_task(
    *,
    database: Database,
    data: Mapping[str, Any],
    instance_id: str | None,
    default_max_attempts: int,
) -> Rendered:
    """Create a pending task with its conversations; workers are woken."""
    row = database.fetchone(
        "create_task", _creation_params(data, instance_id, default_max_attempts)
    )
    return Rendered(row.id, row.json)


def create_task_idempotently(
    *,
    database: Database,
    data: Mapping[str, Any],
    key: str,
    fingerprint: str,
    instance_id: str | None,
    default_max_attempts: int,
) -> Rendered:
    """Create a task once per key and return its first response; a repeat replays it.

    The key's row is inserted first, in the task's transaction: a concurrent request with the
    same key waits on it, then finds it committed and replays it, so one key makes one task.
    Raises IdempotencyKeyReused when the key came with another body.
    """
    with database.transaction() as conn:
        keyed = {"key": key, "fingerprint": fingerprint}
        if database.fetchone("claim_idempotency_key", keyed, conn=conn) is None:
            stored = database.fetchone("idempotent_response", keyed, conn=conn)
            if stored.fingerprint != fingerprint:
                raise IdempotencyKeyReused(key)
            return Rendered(stored.task_id, stored.json)
        params = _creation_params(data, instance_id, default_max_attempts)
        row = database.fetchone("create_task", params, conn=conn)
        stored = {"key": key, "task_id": row.id, "json": row.json}
        database.fetch("store_idempotent_response", stored, conn=conn)
        return Rendered(row.id, row.json)


def update_params(data: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """A statement's parameters for a partial update: set_NAME flags and the new values."""
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"not updatable: {sorted(unknown)}")
    params: dict[str, Any] = {}
    for name in names:
        params[f"set_{name}"] = name in data
        params[name] = data.get(name)
    return params


def update_task(
    *,
    database: Database,
    task_id: int,
    data: Mapping[str, Any],
    instance_id: str | None,
    precondition: Precondition | None = None,
) -> Rendered:
    """Change only the fields given; a new scheduled_for also moves a pending task's run time
    (and wakes the workers if that makes it due). One statement: the change, its event and the
    task as it now is. No fields: the task as it is, no event. With a precondition, the task is
    locked and tested first, in the same transaction (PreconditionFailed when it fails)."""
    if not data and precondition is None:
        return get_task(database=database, task_id=task_id)
    params = {**update_params(data, TASK_FIELDS), "task_id": task_id, "instance_id": instance_id}
    with _writing(database, task_id, precondition) as (conn, current):
        if current is not None and not data:
            return current
        row = database.fetchone("update_task", params, conn=conn)
        moving = "queue" in data or "concurrency_key" in data
        if (
            row is None
            and moving
            and database.fetchone("task_status", {"task_id": task_id}, conn=conn)
        ):
            raise Conflict(
                f"Task {task_id} is processing: its queue and concurrency_key can change "
                "once its attempt ends (or cancel it first)."
            )
    return _rendered(row, _task_not_found, task_id)


def delete_task(
    *,
    database: Database,
    task_id: int,
    instance_id: str | None,
    precondition: Precondition | None = None,
) -> None:
    """Delete a task and its conversations; a processor running it is told to stop, and its
    writes are fenced off. With a precondition, only if it holds (as in update_task)."""
    params = {"task_id": task_id, "instance_id": instance_id}
    with _writing(database, task_id, precondition) as (conn, _):
        row = database.fetchone("delete_task", params, conn=conn)
    if row is None:
        raise _task_not_found(task_id)


def _conflict(
    database: Database, conn: psycopg.Connection[Any], task_id: int, action: states.Action
) -> Conflict | NotFound:
    row = database.fetchone("task_status", {"task_id": task_id}, conn=conn)
    if row is None:
        return _task_not_found(task_id)
    return Conflict(action.conflict_message(task_id, row.status))


def _action_params(task_id: int, instance_id: str | None, action: states.Action) -> dict[str, Any]:
    return {"task_id": task_id, "instance_id": instance_id, "from_states": action.from_values}


def retry_task(
    *,
    database: Database,
    task_id: int,
    instance_id: str | None,
    precondition: Precondition | None = None,
) -> Rendered:
    """Send a failed, cancelled or completed task back to pending with fresh attempts. With a
    precondition, only if it holds (as in update_task)."""
    params = _action_params(task_id, instance_id, states.RETRY)
    with _writing(database, task_id, precondition, transaction=True) as (conn, _):
        if database.fetchone("retry_task", params, conn=conn) is None:
            raise _conflict(database, conn, task_id, states.RETRY)
        # Read before the commit, so a concurrent delete can't make this success a 404.
        row = database.fetchone("get_task", {"task_id": task_id}, conn=conn)
        return _rendered(row, _task_not_found, task_id)


def cancel_task(
    *,
    database: Database,
    task_id: int,
    instance_id: str | None,
    precondition: Precondition | None = None,
) -> Rendered:
    """Cancel a pending or processing task. A processing one is cancelled at once: its lease
    is revoked (so nothing its attempt writes later is recorded) and its instance is told to
    set the processor's cancellation flag. A finished task is a Conflict. With a
    precondition, only if it holds (as in update_task)."""
    params = _action_params(task_id, instance_id, states.CANCEL)
    with _writing(database, task_id, precondition) as (conn, _):
        row = database.fetchone("cancel_task", params, conn=conn)
        if row is None:
            raise _conflict(database, conn, task_id, states.CANCEL)
        return Rendered(row.id, row.json)


# A prune request deletes batches of this many tasks (retention's size: each a short
# transaction) for at most this long, then answers; the client asks again while not `done`,
# so one request never holds a thread and a connection for the minutes a backlog can take.
PRUNE_BATCH = 1000
PRUNE_BUDGET_SECONDS = 2.0


@dataclass(frozen=True)
class Pruned:
    """What one prune request deleted, by status, and whether nothing it asked for is left."""

    deleted: dict[str, int]
    done: bool


def prune_tasks(
    *,
    database: Database,
    statuses: list[str],
    older_than_seconds: int,
    budget_seconds: float = PRUNE_BUDGET_SECONDS,
) -> Pruned:
    """Delete finished tasks of these statuses unchanged for older_than_seconds, with their
    conversations and errors, in retention's batches (SKIP LOCKED: never waits on a task
    being changed, nor on the housekeepers pruning at the same time), within the budget."""
    deadline = time.monotonic() + budget_seconds
    deleted = dict.fromkeys(dict.fromkeys(statuses), 0)
    for status in deleted:
        while True:
            count = queue.prune_finished(
                database, status=status, keep_seconds=older_than_seconds, batch=PRUNE_BATCH
            )
            deleted[status] += count
            if count:
                metrics.tasks_pruned(status, count)
            if count < PRUNE_BATCH:
                break
            if time.monotonic() >= deadline:
                return Pruned(deleted, done=False)
    return Pruned(deleted, done=True)


def _conversation_not_found(conversation_id: int) -> NotFound:
    return NotFound(f"Conversation {conversation_id} does not exist.")


def create_conversation(
    *, database: Database, task_id: int, data: Mapping[str, Any], instance_id: str | None
) -> Rendered:
    """Add a conversation to a task; NotFound if the task does not exist, Conflict if it has
    MAX_CONVERSATIONS_PER_TASK already."""
    params = {
        "task_id": task_id,
        "content": data["content"],
        "instance_id": instance_id,
        "max_conversations": MAX_CONVERSATIONS_PER_TASK,
    }
    row = database.fetchone("create_conversation", params)
    if row is not None and row.id is None:
        raise ConversationLimit(
            f"Task {task_id} has {MAX_CONVERSATIONS_PER_TASK} conversations, the most a task "
            "may have."
        )
    return _rendered(row, _task_not_found, task_id)


def list_conversations(*, database: Database, task_id: int) -> str:
    """A task's conversations ordered by id, as a JSON array; NotFound if there is no task."""
    row = database.fetchone("list_conversations", {"task_id": task_id})
    if row.task_status is None:
        raise _task_not_found(task_id)
    return str(row.json)


def get_conversation(*, database: Database, conversation_id: int) -> Rendered:
    """One conversation; NotFound if it does not exist."""
    row = database.fetchone("get_conversation", {"conversation_id": conversation_id})
    return _rendered(row, _conversation_not_found, conversation_id)


def update_conversation(
    *, database: Database, conversation_id: int, data: Mapping[str, Any], instance_id: str | None
) -> Rendered:
    """Change a conversation's content and/or status."""
    if not data:
        return get_conversation(database=database, conversation_id=conversation_id)
    params = {
        **update_params(data, CONVERSATION_FIELDS),
        "conversation_id": conversation_id,
        "instance_id": instance_id,
    }
    row = database.fetchone("update_conversation", params)
    return _rendered(row, _conversation_not_found, conversation_id)
