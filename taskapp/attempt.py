"""One attempt at a task as the worker runs it: the fenced writes of its processor's
context, how it ended, and the errors the worker records for it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from . import queue
from .database import Database
from .processor import Context, Defer, LeaseLost, ProcessorContractError
from .queue import Claim

MAX_ERROR_LENGTH = 2000


def describe_error(exc: BaseException) -> str:
    """An exception as the error history keeps it: its type and message, bounded."""
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]


def short_error(exc: BaseException) -> str:
    """An exception on one log line."""
    return describe_error(exc).splitlines()[0][:300]


class ResultNotStorable(ProcessorContractError):
    """A result encode_result() let through but PostgreSQL refused."""


class TaskTimeout(ProcessorContractError):
    """The attempt ran past its timeout (recorded in the error history)."""


class Deferred(Exception):
    """A deferral, as the error history records it."""


class Throttled(Deferred):
    """What a throttle records: the task waits, and so does its key (or queue)."""


class DeferralsExhausted(ProcessorContractError):
    """A deferral past MAX_DEFERRALS: it fails the attempt instead."""


@dataclass
class Ending:
    """How an attempt ended, as the worker records it: a result, an error, or a deferral."""

    result: str | None = None
    error: str | None = None
    deferral: Defer | None = None


@dataclass(eq=False)
class Running:
    """An attempt whose processor is running on one of the work threads."""

    claim: Claim
    context: Context
    thread: threading.Thread
    timeout_seconds: float | None
    started: float = field(default_factory=time.monotonic)
    abandoned: bool = False

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_seconds is None else self.started + self.timeout_seconds


class AttemptWrites:
    """The fenced writes of one attempt's Context (processor.Writes)."""

    def __init__(self, database: Database, instance_id: str, claimed: Claim) -> None:
        self._database = database
        self._instance_id = instance_id
        self._claimed = claimed

    def _lost(self, what: str) -> LeaseLost:
        return LeaseLost(
            f"task {self._claimed.task.id}: this attempt no longer holds its lease; {what}"
        )

    def checkpoint(self, conversation_id: int, result: str | None) -> bool:
        outcome = queue.checkpoint(
            self._database,
            self._claimed,
            instance_id=self._instance_id,
            conversation_id=conversation_id,
            result=result,
        )
        if not outcome.applied:
            raise self._lost(f"conversation {conversation_id} was not checkpointed")
        return outcome.status == "processed"

    def progress(self, done: int, total: int | None, message: str | None) -> None:
        if not queue.report_progress(
            self._database,
            self._claimed,
            instance_id=self._instance_id,
            done=done,
            total=total,
            message=message,
        ):
            raise self._lost("its progress was not stored")

    def output(self, conversation_id: int, chunks: list[tuple[int, str]]) -> None:
        if not queue.emit_output(
            self._database,
            self._claimed,
            instance_id=self._instance_id,
            conversation_id=conversation_id,
            chunks=chunks,
        ):
            raise self._lost("its output was not sent")


def retry_writes_for(lease_seconds: float) -> float:
    """How long a result is retried through database errors before giving up on it: past
    that its lease has run out anyway, and the task runs again."""
    return max(lease_seconds * 2, 30.0)


class Backoff:
    """Growing pauses after database errors, so an outage is not hammered."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self.current = first, cap, 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.first)
        return self.current

    def reset(self) -> None:
        self.current = 0.0
