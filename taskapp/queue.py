"""The queue's verbs: claim, complete, fail, defer, release, renew, rescue, heartbeat, and the
reports of a running attempt (checkpoint, progress, live output).

Each verb runs one named statement from sql/queue.sql through the Database gateway,
autocommitted on its own. Completion, failure and release are fenced by the
claim's lease token: a worker that lost its lease changes nothing.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.rows import dict_row

from .database import Database
from .processor import ConversationSnapshot, ProcessedConversation, TaskSnapshot
from .states import TaskStatus

# Failed attempts kept per task (the fail statement trims older ones).
ERROR_HISTORY_LIMIT = 20
MAX_RETRY_DELAY_SECONDS = 3600.0


def retry_delay(base_seconds: float, attempt: int) -> float:
    """The backoff after a failed attempt, applied by the fail statement: about
    base * 2^(attempt-1), ±25 % so that retries of a burst spread out."""
    delay = base_seconds * 2 ** max(attempt - 1, 0)
    return min(delay * random.uniform(0.75, 1.25), MAX_RETRY_DELAY_SECONDS)


@dataclass(frozen=True)
class Claim:
    """A task leased to this instance; lease_token (a UUID, in PostgreSQL's text form) fences
    every write about it."""

    task: TaskSnapshot
    lease_token: str
    max_attempts: int


@dataclass(frozen=True)
class Outcome:
    """What a fenced write did: applied=False means the lease was lost (or the task deleted).
    A completion's status is `completed`, or `pending` when conversations it never saw are
    still active (a continuation run follows, without spending an attempt)."""

    applied: bool
    status: str | None = None


DEFAULT_QUEUE = "default"


def claim(
    database: Database,
    *,
    instance_id: str,
    limit: int | Mapping[str, int],
    lease_seconds: float,
) -> list[Claim]:
    """Lease up to `limit` of the most urgent due pending tasks to this instance (an int: of
    the default queue; a mapping: so many of each queue) that their limits let start."""
    limits = {DEFAULT_QUEUE: limit} if isinstance(limit, int) else limit
    return complete_and_claim_many(
        database, [], instance_id=instance_id, limits=limits, lease_seconds=lease_seconds
    ).claims


def complete(
    database: Database, claimed: Claim, *, instance_id: str, result: str | None = None
) -> Outcome:
    """Complete a task for the holder of its lease: the conversations of its snapshot, unless
    edited since, turn processed; with others still active it goes back to pending instead."""
    round_ = complete_and_claim_many(
        database, [(claimed, result)], instance_id=instance_id, limits={}, lease_seconds=0
    )
    return round_.outcomes[0]


@dataclass(frozen=True)
class Round:
    """What one complete_and_claim statement did: an Outcome per completion, in order, the new
    claims, and how many candidates their limits refused (more may be claimable at once)."""

    outcomes: list[Outcome]
    claims: list[Claim]
    refused: int


def complete_and_claim_many(
    database: Database,
    completions: list[tuple[Claim, str | None]],
    *,
    instance_id: str,
    limits: Mapping[str, int],
    lease_seconds: float,
) -> Round:
    """Complete many tasks, each fenced by its own lease token, and claim up to limits[queue]
    more of each queue, in one statement."""
    params = {
        "task_ids": _array(claimed.task.id for claimed, _ in completions),
        "lease_tokens": _array(claimed.lease_token for claimed, _ in completions),
        "results": [result for _, result in completions],
        "instance_id": instance_id,
        "queues": list(limits),
        "limits": list(limits.values()),
        "lease_seconds": lease_seconds,
    }
    rows = database.fetch("complete_and_claim", params)
    finished_json = next((row.finished for row in rows if row.finished is not None), "[]")
    finished = {item["id"]: item["status"] for item in json.loads(finished_json)}
    outcomes = [
        Outcome(applied=claimed.task.id in finished, status=finished.get(claimed.task.id))
        for claimed, _ in completions
    ]
    claims = _claims([row for row in rows if row.id is not None])
    return Round(outcomes, claims, int(rows[0].refused or 0))


def checkpoint(
    database: Database,
    claimed: Claim,
    *,
    instance_id: str,
    conversation_id: int,
    result: str | None,
) -> Outcome:
    """Mark one conversation of the claim processed with its result (JSON text), fenced by the
    lease. applied=False: the lease is lost; status `processed`, or None when the conversation
    was edited or deleted since the claim, or already done."""
    row = _fenced(
        database,
        "checkpoint",
        claimed,
        instance_id,
        conversation_id=conversation_id,
        result=result,
    )
    if row is None or not row.held:
        return Outcome(applied=False)
    return Outcome(applied=True, status="processed" if row.checkpointed else None)


def report_progress(
    database: Database,
    claimed: Claim,
    *,
    instance_id: str,
    done: int,
    total: int | None,
    message: str | None,
) -> bool:
    """Store the attempt's progress and send task.progress; False once the lease is lost."""
    row = _fenced(
        database,
        "report_progress",
        claimed,
        instance_id,
        done=done,
        total=total,
        message=message,
    )
    return row is not None


def emit_output(
    database: Database,
    claimed: Claim,
    *,
    instance_id: str,
    conversation_id: int,
    chunks: list[tuple[int, str]],
) -> bool:
    """Send (seq, text) chunks of a conversation's live output as events, in order; False
    once the lease is lost."""
    row = _fenced(
        database,
        "emit_output",
        claimed,
        instance_id,
        conversation_id=conversation_id,
        seqs=[seq for seq, _ in chunks],
        texts=[text for _, text in chunks],
    )
    return row is not None


def defer(
    database: Database,
    claimed: Claim,
    *,
    instance_id: str,
    delay_seconds: float,
    reason: str,
    max_deferrals: int,
    throttle: bool = False,
) -> Outcome:
    """Put the task back to pending for delay_seconds without spending its attempt. applied
    False: the lease is lost; status None: it has used its MAX_DEFERRALS (nothing changed)."""
    row = _fenced(
        database,
        "defer",
        claimed,
        instance_id,
        delay=delay_seconds,
        reason=reason,
        max_deferrals=max_deferrals,
        throttle=throttle,
        keep_errors=ERROR_HISTORY_LIMIT,
    )
    if row is None or not row.held:
        return Outcome(applied=False)
    return Outcome(applied=True, status="pending" if row.deferred else None)


def _array(values: Iterable[object]) -> str:
    """A PostgreSQL array literal of ids or lease tokens (neither needs quoting), for a
    parameter the statement casts: joining text costs a tenth of adapting a list element by
    element, at hundreds of elements a dispatcher round."""
    return "{" + ",".join(map(str, values)) + "}"


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
                    for c in _json_list(row.conversations)
                ),
                processed=tuple(
                    ProcessedConversation(id=c["id"], result=c["result"])
                    for c in _json_list(row.processed)
                ),
                timeout_seconds=row.timeout_seconds,
                queue=row.queue,
                concurrency_key=row.concurrency_key,
            ),
            lease_token=row.lease_token,
            max_attempts=row.max_attempts,
        )
        for row in rows
    ]


def _fenced(
    database: Database, statement: str, claimed: Claim, instance_id: str, **params: object
) -> Any | None:
    """Run a write about a claimed task; it matches no row once the lease is lost."""
    rows = database.fetch(
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
    database: Database,
    claimed: Claim,
    *,
    instance_id: str,
    error: str,
    retry_base_seconds: float,
) -> Outcome:
    """Record a failed attempt: pending again after retry_delay() while attempts remain."""
    row = _fenced(
        database,
        "fail",
        claimed,
        instance_id,
        error=error,
        retry_delay=retry_delay(retry_base_seconds, claimed.task.attempts),
        keep_errors=ERROR_HISTORY_LIMIT,
    )
    return Outcome(applied=row is not None, status=row.status if row else None)


def release(database: Database, claimed: Claim, *, instance_id: str) -> Outcome:
    """Hand the task back without spending its attempt."""
    row = _fenced(database, "release", claimed, instance_id)
    return Outcome(applied=row is not None, status="pending" if row else None)


def take_back_unheld(database: Database, held: list[Claim], *, instance_id: str) -> list[int]:
    """Hand back the tasks this instance claimed without hearing of it (a claim's answer lost
    after its commit), given every claim it does hold; return their ids."""
    rows = database.fetch(
        "take_back_unheld",
        {"instance_id": instance_id, "lease_tokens": _array(c.lease_token for c in held)},
    )
    return [row.id for row in rows]


def completed_by(database: Database, task_ids: list[int], *, instance_id: str) -> set[int]:
    """Which of these tasks stand completed by this instance."""
    rows = database.fetch("completed_by", {"task_ids": task_ids, "instance_id": instance_id})
    return {row.id for row in rows}


def renew_leases(database: Database, held: list[Claim], *, lease_seconds: float) -> set[int]:
    """Extend the leases of the given claims; return the ids of tasks still held."""
    if not held:
        return set()
    rows = database.fetch(
        "renew_leases",
        {
            "task_ids": _array(c.task.id for c in held),
            "lease_tokens": _array(c.lease_token for c in held),
            "lease_seconds": lease_seconds,
        },
    )
    return {row.id for row in rows}


def rescue_expired(database: Database, *, instance_id: str) -> list[tuple[int, str]]:
    """Re-queue (or fail) tasks whose lease ran out; return (task id, new status) pairs."""
    rows = database.fetch("rescue_expired", {"instance_id": instance_id})
    return [(row.id, row.status) for row in rows]


def seconds_until_next_due(
    database: Database, queues: Iterable[str] = (DEFAULT_QUEUE,)
) -> float | None:
    """Seconds until a task of these queues may be claimable (None: none is waiting)."""
    (row,) = database.fetch("seconds_until_next_due", {"queues": list(queues)})
    return None if row.seconds is None else float(row.seconds)


def heartbeat(
    database: Database,
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
    database.fetch(
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


def instance_stopped(database: Database, *, instance_id: str) -> None:
    database.fetch("instance_stopped", {"instance_id": instance_id})


def forget_instances(database: Database, *, older_than_seconds: float) -> None:
    database.fetch("forget_instances", {"forget_after_seconds": older_than_seconds})


def instances(database: Database) -> list[dict[str, Any]]:
    return database.fetch("instances", row_factory=dict_row)


def queue_counts(database: Database) -> dict[str, int]:
    counts = dict.fromkeys((s.value for s in TaskStatus), 0)
    counts.update({row.status: row.n for row in database.fetch("queue_counts")})
    return counts


def oldest_pending_age(database: Database) -> float:
    (row,) = database.fetch("oldest_pending_age")
    return float(row[0] or 0)


def _json_list(text: str | None) -> list[Any]:
    return [] if text is None else json.loads(text)


def prune_finished(database: Database, *, status: str, keep_seconds: float, batch: int) -> int:
    """Delete up to `batch` tasks of a finished status unchanged for keep_seconds; how many."""
    params = {"status": status, "keep_seconds": keep_seconds, "batch": batch}
    return len(database.fetch("prune_finished", params))
