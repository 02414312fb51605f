"""The queue's verbs: claim, complete, fail, release, renew, rescue, heartbeat.

Each verb runs one named statement from sql/queue.sql as one autocommitted statement, through
SQLAlchemy Core on the shared engine (no ORM unit of work on the hot path). Completion,
failure and release are fenced by the claim's lease token: a worker that lost its lease
changes nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.engine import Connection, Engine, Row

from .models import ERROR_HISTORY_LIMIT

_SQL_FILE = Path(__file__).with_name("sql") / "queue.sql"


@contextmanager
def _autocommit(engine: Engine) -> Iterator[Connection]:
    """A pooled connection in autocommit mode.

    Every verb is a single statement, atomic on its own, so an explicit transaction would
    only add BEGIN and COMMIT round trips, and a window in which a vanished client could
    leave rows locked.
    """
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


def _load_statements(path: Path) -> dict[str, TextClause]:
    """Split the file on '-- name: X' markers into named statements."""
    statements: dict[str, TextClause] = {}
    for chunk in re.split(r"^-- name: ", path.read_text(), flags=re.MULTILINE)[1:]:
        name, _, body = chunk.partition("\n")
        statements[name.strip()] = text(body.strip().rstrip(";"))
    return statements


STATEMENTS = _load_statements(_SQL_FILE)


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
    with _autocommit(engine) as conn:
        rows = conn.execute(
            STATEMENTS["complete_and_claim"],
            {
                "task_id": claimed.task.id if claimed else None,
                "lease_token": claimed.lease_token if claimed else None,
                "instance_id": instance_id,
                "limit": limit,
                "lease_seconds": lease_seconds,
            },
        ).all()
    applied = bool(rows[0].completed)
    outcome = Outcome(applied=applied, status="completed" if applied else None)
    return outcome, _claims([row for row in rows if row.id is not None])


def _claims(rows: list[Row]) -> list[Claim]:
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
) -> Row | None:
    """Run a write about a claimed task; it matches no row once the lease is lost."""
    with _autocommit(engine) as conn:
        return conn.execute(
            STATEMENTS[statement],
            {
                "task_id": claimed.task.id,
                "lease_token": claimed.lease_token,
                "instance_id": instance_id,
                **params,
            },
        ).first()


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
    with _autocommit(engine) as conn:
        rows = conn.execute(
            STATEMENTS["renew_leases"],
            {
                "task_ids": [c.task.id for c in held],
                "lease_tokens": [c.lease_token for c in held],
                "lease_seconds": lease_seconds,
            },
        ).all()
    return {row.id for row in rows}


def rescue_expired(engine: Engine, *, instance_id: str) -> list[tuple[int, str]]:
    """Re-queue (or fail) tasks whose lease ran out; return (task id, new status) pairs."""
    with _autocommit(engine) as conn:
        rows = conn.execute(STATEMENTS["rescue_expired"], {"instance_id": instance_id}).all()
    return [(row.id, row.status) for row in rows]


def seconds_until_next_due(engine: Engine) -> float | None:
    with _autocommit(engine) as conn:
        seconds = conn.execute(STATEMENTS["seconds_until_next_due"]).scalar()
    return None if seconds is None else float(seconds)


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
    with _autocommit(engine) as conn:
        conn.execute(
            STATEMENTS["heartbeat"],
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
    with _autocommit(engine) as conn:
        conn.execute(STATEMENTS["instance_stopped"], {"instance_id": instance_id})


def forget_instances(engine: Engine, *, older_than_seconds: float) -> None:
    with _autocommit(engine) as conn:
        conn.execute(STATEMENTS["forget_instances"], {"forget_after_seconds": older_than_seconds})


def instances(engine: Engine) -> list[dict[str, Any]]:
    with _autocommit(engine) as conn:
        return [dict(row._mapping) for row in conn.execute(STATEMENTS["instances"])]


def queue_counts(engine: Engine) -> dict[str, int]:
    from .models import TaskStatus

    counts = dict.fromkeys((s.value for s in TaskStatus), 0)
    with _autocommit(engine) as conn:
        counts.update({row.status: row.n for row in conn.execute(STATEMENTS["queue_counts"])})
    return counts


def oldest_pending_age(engine: Engine) -> float:
    with _autocommit(engine) as conn:
        return float(conn.execute(STATEMENTS["oldest_pending_age"]).scalar() or 0)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value
