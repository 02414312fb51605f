"""Tables: tasks, their conversations, their error history, instances and idempotency keys.

The CHECK constraints make illegal rows impossible whatever code writes them; the partial
indexes serve the queue's claim and rescue statements (see taskapp/sql/).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .extensions import db
from .states import ConversationStatus, TaskStatus, sql_in

if TYPE_CHECKING:
    from .extensions import Base as Model  # what db.Model is, to a type checker
else:
    Model = db.Model

TITLE_MAX_LENGTH = 255
QUEUE_NAME_MAX_LENGTH = 64
CONCURRENCY_KEY_MAX_LENGTH = 200


class Task(Model):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    title: Mapped[str] = mapped_column(String(TITLE_MAX_LENGTH))
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), server_default=TaskStatus.PENDING.value)
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    scheduled_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the task may next be claimed: its scheduled time, or the end of a retry backoff.
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    processing_instance_id: Mapped[str | None] = mapped_column(String(255))
    # The fencing token of the current claim: only its holder may complete or fail the task.
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What the processor returned (JSON), for the API and the dashboard.
    result: Mapped[Any | None] = mapped_column(JSONB)
    # The current claim's snapshot, {"conversation id": revision}: what its attempt may mark
    # processed (an edit or a new conversation after the claim is not in it).
    claim_snapshot: Mapped[dict[str, int] | None] = mapped_column(JSONB)
    # The processor's last progress report: {"done", "total", "message", "at"}.
    progress: Mapped[Any | None] = mapped_column(JSONB)
    # This task's own timeout per attempt (NULL: the TASK_TIMEOUT_SECONDS setting).
    timeout_seconds: Mapped[int | None] = mapped_column(Integer)
    # How often its processor asked to run later (bounded by MAX_DEFERRALS).
    deferrals: Mapped[int] = mapped_column(Integer, server_default="0")
    # The queue it waits in, and what it shares limits with (migration 0007).
    queue: Mapped[str] = mapped_column(String(QUEUE_NAME_MAX_LENGTH), server_default="default")
    concurrency_key: Mapped[str | None] = mapped_column(String(CONCURRENCY_KEY_MAX_LENGTH))
    # When its latest attempt was admitted (the claim's clock, after the limits' locks).
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    conversations: Mapped[list[Conversation]] = relationship(
        back_populates="task",
        order_by="Conversation.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )
    errors: Mapped[list[TaskError]] = relationship(
        order_by="TaskError.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    __table_args__ = (
        CheckConstraint(sql_in("status", TaskStatus), name="status_valid"),
        CheckConstraint("length(btrim(title)) > 0", name="title_not_blank"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
        CheckConstraint("timeout_seconds > 0", name="timeout_seconds_positive"),
        CheckConstraint(
            "(status = 'processing') = (lease_token IS NOT NULL AND lease_expires_at IS NOT NULL)",
            name="lease_iff_processing",
        ),
        CheckConstraint("length(queue) > 0", name="queue_not_blank"),
        CheckConstraint("length(concurrency_key) > 0", name="concurrency_key_not_blank"),
        # The claim: due pending tasks of a queue, most urgent first, oldest first.
        Index(
            "ix_tasks_claim",
            "queue",
            text("priority DESC"),
            "id",
            "run_after",
            postgresql_where=text("status = 'pending'"),
        ),
        # The rescuer: processing tasks whose lease ran out.
        Index(
            "ix_tasks_lease_expiry",
            "lease_expires_at",
            postgresql_where=text("status = 'processing'"),
        ),
        # The next due time, for the worker's sleep and the oldest-pending metric.
        Index(
            "ix_tasks_pending_run_after",
            "run_after",
            postgresql_where=text("status = 'pending'"),
        ),
        # Finished tasks by age, for retention (sql/retention.sql).
        Index(
            "ix_tasks_finished",
            "status",
            "updated_at",
            postgresql_where=text("status IN ('completed', 'failed', 'cancelled')"),
        ),
        # What runs per concurrency key, for the limits (taskapp_admit, migration 0007).
        Index(
            "ix_tasks_running_keys",
            "queue",
            "concurrency_key",
            postgresql_where=text("status = 'processing' AND concurrency_key IS NOT NULL"),
        ),
    )


class Conversation(Model):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    task_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    content: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), server_default=ConversationStatus.ACTIVE.value)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # The processor's result for it (a checkpoint's, or none), and when it turned processed.
    result: Mapped[Any | None] = mapped_column(JSONB)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Bumped by every content edit: an attempt marks processed only the revision it saw.
    revision: Mapped[int] = mapped_column(Integer, server_default="0")

    task: Mapped[Task] = relationship(back_populates="conversations")

    __table_args__ = (
        CheckConstraint(sql_in("status", ConversationStatus), name="status_valid"),
        CheckConstraint("length(content) > 0", name="content_not_empty"),
    )


class TaskError(Model):
    """One failed attempt of a task; the queue's fail statement keeps the newest few."""

    __tablename__ = "task_errors"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    task_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    instance_id: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class TaskCount(Model):
    """Running task counts by status, kept by triggers on tasks (migration 0002).

    A status's count is the sum over its shards; reading it costs the same at any table size.
    """

    __tablename__ = "task_counts"

    queue: Mapped[str] = mapped_column(String(QUEUE_NAME_MAX_LENGTH), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class EventWatch(Model):
    """Until when someone watches the events: taskapp_publish() sends none after that
    (migration 0011). One row, moved on by the instances that hold event streams."""

    __tablename__ = "event_watch"
    __table_args__ = (CheckConstraint("only_row", name="event_watch_only_row_check"),)

    only_row: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    watched_until: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=text("'-infinity'")
    )


class _FlowState:
    """What the claim keeps for a queue or a key: its rate's state (GCRA: the theoretical
    arrival time and the next start it allows) and a processor's throttle."""

    rate_tat: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rate_ready_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    throttled_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    throttle_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Queue(_FlowState, Model):
    """A queue's settings (migration 0007): paused, its own rate of starts, and the default
    limits of its concurrency keys. A queue without a row has no limits."""

    __tablename__ = "queues"

    name: Mapped[str] = mapped_column(String(QUEUE_NAME_MAX_LENGTH), primary_key=True)
    paused: Mapped[bool] = mapped_column(server_default=text("false"))
    rate_limit: Mapped[int | None] = mapped_column(Integer)
    rate_period_seconds: Mapped[float | None]
    rate_burst: Mapped[int | None] = mapped_column(Integer)
    key_concurrency_limit: Mapped[int | None] = mapped_column(Integer)
    key_rate_limit: Mapped[int | None] = mapped_column(Integer)
    key_rate_period_seconds: Mapped[float | None]
    key_rate_burst: Mapped[int | None] = mapped_column(Integer)


class ConcurrencyKey(_FlowState, Model):
    """One key's own limits over its queue's defaults, and its rate state (migration 0007)."""

    __tablename__ = "concurrency_keys"

    queue: Mapped[str] = mapped_column(String(QUEUE_NAME_MAX_LENGTH), primary_key=True)
    key: Mapped[str] = mapped_column(String(CONCURRENCY_KEY_MAX_LENGTH), primary_key=True)
    concurrency_limit: Mapped[int | None] = mapped_column(Integer)
    rate_limit: Mapped[int | None] = mapped_column(Integer)
    rate_period_seconds: Mapped[float | None]
    rate_burst: Mapped[int | None] = mapped_column(Integer)


class Instance(Model):
    """A running instance's heartbeat, so that /status can list the whole cluster."""

    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    worker_running: Mapped[bool] = mapped_column(server_default=text("false"))
    current_task_ids: Mapped[list[int]] = mapped_column(JSONB, server_default=text("'[]'"))
    processed_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    failed_count: Mapped[int] = mapped_column(BigInteger, server_default="0")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    heartbeat_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Model):
    """The first response to a POST /tasks/ with an Idempotency-Key, replayed on repeats."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("tasks.id", ondelete="SET NULL")
    )
    # json, not jsonb: the first response's text, replayed byte for byte (migration 0003).
    response: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
