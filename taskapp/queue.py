"""The queue's verbs: claim, complete, fail, release, renew, rescue, heartbeat.

Each verb runs one named statement from sql/queue.sql, autocommitted on its own, straight on a
pooled psycopg connection: no ORM unit of work and none of SQLAlchemy's per-statement
bookkeeping on the worker's hot path. Completion, failure and release are fenced by the
claim's lease token: a worker that lost its lease changes nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from psycopg.rows import RowFactory, dict_row, namedtuple_row
from sqlalchemy.engine import Engine

from .database import autocommit_connection
from .models import ERROR_HISTORY_LIMIT

_SQL_FILE = Path(__file__).with_name("sql") / "queue.sql"


def _load_statements(path: Path) -> dict[str, str]:
    """Split the file on '-- name: X' markers into named statements, their `:name`
    parameters written as psycopg's `%(name)s` (`::type` casts are left alone)."""
    statements: dict[str, str] = {}
    for chunk in re.split(r"^-- name: ", path.read_text(), flags=re.MULTILINE)[1:]:
        name, _, body = chunk.partition("\n")
        body = body.strip().rstrip(";").replace("%", "%%")
        statements[name.strip()] = re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", body)
    return statements


STATEMENTS = _load_statements(_SQL_FILE)


def _run(
    engine: Engine,
    name: str,
    params: dict[str, Any] | None = None,
    row_factory: RowFactory[Any] = namedtuple_row,
) -> list[Any]:
    """Run one named statement, autocommitted, and return its rows (none for a plain write)."""
    with autocommit_connection(engine) as conn, conn.cursor(row_factory=row_factory) as cursor:
        cursor.execute(STATEMENTS[name], params)
        return cursor.fetchall() if cursor.description else []


@dataclass(frozen=True)
class ConversationSnapshot:
    id: int
    content: str


@dataclass(frozen=True)
class TaskSnapshot:
    """What a processor sees of a task: a read-only copy taken at claim time."""

    id: int
    title: str
    description: str | None
    priority: int
    attempts: int
    conversations: tuple[ConversationSnapshot, ...]


@dataclass(frozen=True)
class Claim:
    """A task leased to this instance; lease_token fences every write about it."""

    task: TaskSnapshot
    lease_token: uuid.UUID
    max_attempts: int


@dataclass(frozen=True)
class Outcome:
    """What a fenced write did: applied=False means the lease was lost (or the task deleted)."""

    applied: bool
    status: str | None = None


def claim(engine: Engine, *, instance_id: str, limit: int, lease_seconds: float) -> list[Claim]:
    """Lease up to `limit` of the most urgent due pending tasks to this instance."""
    _, claims = _complete_and_claim(engine, None, instance_id, limit, lease_seconds)
    return claims


def complete_and_claim(
    engine: Engine, claimed: Claim, *, instance_id: str, limit: int, lease_seconds: float
) -> tuple[Outcome, list[Claim]]:
    """Complete a task and claim the next ones in one statement (the worker's busy path)."""
    return _complete_and_claim(engine, claimed, instance_id, limit, lease_seconds)


def complete(engine: Engine, claimed: Claim, *, instance_id: str) -> Outcome:
    """Complete a task, every conversation processed, for the holder of its lease."""
    outcome, _ = _complete_and_claim(engine, claimed, instance_id, 0, 0)
    return outcome


def _complete_and_claim(
    engine: Engine, claimed: Claim | None, instance_id: str, limit: int, lease_seconds: float
) -> tuple[Outcome, list[Claim]]:
    rows = _run(
        engine,
        "complete_and_claim",
        {
            "task_id": claimed.task.id if claimed else None,
            "lease_token": claimed.lease_token if claimed else None,
            "instance_id": instance_id,
            "limit": limit,
            "lease_seconds": lease_seconds,
        },
    )
    applied = bool(rows[0].completed)
    outcome = Outcome(applied=applied, status="completed" if applied else None)
    return outcome, _claims([row for row in rows if row.id is not None])


def _claims(rows: list[Any]) -> list[Claim]:
    return [
        Claim(
            task=TaskSnapshot(
                id=row.id,
                title=row.title,
                description=row.description,
                priority=row.priority,
                attempts=row.attempts,
                conversations=tuple(
                    ConversationSnapshot(id=c["id"], content=c["content"])
                    for c in _json(row.conversations)
                ),
            ),
            lease_token=row.lease_token,
            max_attempts=row.max_attempts,
        )
        for row in rows
    ]


def _fenced(
    engine: Engine, statement: str, claimed: Claim, instance_id: str, **params: object
) -> Any | None:
    """Run a write about a claimed task; it matches no row once the lease is lost."""
    rows = _run(
        engine,
        statement,
        {
            "task_id": claimed.task.id,
            "lease_token": claimed.lease_token,
            "instance_id": instance_id,
            **params,
        },
    )
    return rows[0] if rows else None


def fail(
    engine: Engine, claimed: Claim, *, instance_id: str, error: str, retry_delay: float
) -> Outcome:
    row = _fenced(
        engine,
        "fail",
        claimed,
        instance_id,
        error=error,
        retry_delay=retry_delay,
        keep_errors=ERROR_HISTORY_LIMIT,
    )
    return Outcome(applied=row is not None, status=row.status if row else None)


def release(engine: Engine, claimed: Claim, *, instance_id: str) -> Outcome:
    """Hand the task back without spending its attempt."""
    row = _fenced(engine, "release", claimed, instance_id)
    return Outcome(applied=row is not None, status="pending" if row else None)


def renew_leases(engine: Engine, held: list[Claim], *, lease_seconds: float) -> set[int]:
    """Extend the leases of the given claims; return the ids of tasks still held."""
    if not held:
        return set()
    rows = _run(
        engine,
        "renew_leases",
        {
            "task_ids": [c.task.id for c in held],
            "lease_tokens": [c.lease_token for c in held],
            "lease_seconds": lease_seconds,
        },
    )
    return {row.id for row in rows}


def rescue_expired(engine: Engine, *, instance_id: str) -> list[tuple[int, str]]:
    """Re-queue (or fail) tasks whose lease ran out; return (task id, new status) pairs."""
    rows = _run(engine, "rescue_expired", {"instance_id": instance_id})
    return [(row.id, row.status) for row in rows]


def seconds_until_next_due(engine: Engine) -> float | None:
    (row,) = _run(engine, "seconds_until_next_due")
    return None if row.seconds is None else float(row.seconds)


def heartbeat(
    engine: Engine,
    *,
    instance_id: str,
    hostname: str,
    pid: int,
    worker_running: bool,
    current_task_ids: list[int],
    processed_count: int,
    failed_count: int,
    started_at: datetime,
) -> None:
    _run(
        engine,
        "heartbeat",
        {
            "instance_id": instance_id,
            "hostname": hostname,
            "pid": pid,
            "worker_running": worker_running,
            "current_task_ids": json.dumps(current_task_ids),
            "processed_count": processed_count,
            "failed_count": failed_count,
            "started_at": started_at,
        },
    )


def instance_stopped(engine: Engine, *, instance_id: str) -> None:
    _run(engine, "instance_stopped", {"instance_id": instance_id})


def forget_instances(engine: Engine, *, older_than_seconds: float) -> None:
    _run(engine, "forget_instances", {"forget_after_seconds": older_than_seconds})


def instances(engine: Engine) -> list[dict[str, Any]]:
    return _run(engine, "instances", row_factory=dict_row)


def queue_counts(engine: Engine) -> dict[str, int]:
    from .models import TaskStatus

    counts = dict.fromkeys((s.value for s in TaskStatus), 0)
    counts.update({row.status: row.n for row in _run(engine, "queue_counts")})
    return counts


def oldest_pending_age(engine: Engine) -> float:
    (row,) = _run(engine, "oldest_pending_age")
    return float(row[0] or 0)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
