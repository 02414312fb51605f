"""Task and conversation states, and which actions move a task from which states.

The one table of the state machine: the models' CHECK constraints, the queue's and the
services' statements (given the allowed states as parameters), the 409 messages, the OpenAPI
enums and the dashboard's lists all come from here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ConversationStatus(enum.StrEnum):
    ACTIVE = "active"
    PROCESSED = "processed"


@dataclass(frozen=True)
class Action:
    """A client's request to change a task's state: from which states, to which one."""

    name: str  # the verb, as in "can be retried"
    from_states: tuple[TaskStatus, ...]
    to_state: TaskStatus

    @property
    def from_values(self) -> list[str]:
        return [status.value for status in self.from_states]

    def conflict_message(self, task_id: int, current: str) -> str:
        allowed = self.from_values
        names = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
        return f"Task {task_id} is {current}; only {names} tasks can be {self.name}."


TERMINAL = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)

RETRY = Action("retried", TERMINAL, TaskStatus.PENDING)
CANCEL = Action("cancelled", (TaskStatus.PENDING, TaskStatus.PROCESSING), TaskStatus.CANCELLED)

ACTIONS = {"retry": RETRY, "cancel": CANCEL}

TASK_STATUSES = [status.value for status in TaskStatus]
CONVERSATION_STATUSES = [status.value for status in ConversationStatus]


def sql_in(column: str, values: type[enum.StrEnum]) -> str:
    """A CHECK constraint's `column IN (...)` over an enum's values."""
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"
