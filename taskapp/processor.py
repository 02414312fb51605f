"""The processor's contract: what a processor is given, and how TASK_PROCESSOR is loaded.

A processor is `function(task)` or `function(task, context)` (docs/processors.md). It gets a
read-only TaskSnapshot taken at claim time, with only the conversations not yet done, and runs
outside any database transaction. Returning completes the task, its return value (any JSON,
at most RESULT_MAX_BYTES) stored as the task's `result`; raising fails the attempt (retried
with backoff while attempts remain). The context's checkpoint() marks one conversation done
with its result at once, so a later attempt does not do it again. The built-in processor
simulates work.

Which form a function is, is decided once, from its signature, when it is loaded: it gets the
context when it takes a second positional argument without a default (or *args).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, Settings


@dataclass(frozen=True)
class ConversationSnapshot:
    id: int
    content: str


@dataclass(frozen=True)
class ProcessedConversation:
    """A conversation an earlier attempt (or checkpoint) already finished, with its result."""

    id: int
    result: Any


@dataclass(frozen=True)
class TaskSnapshot:
    """What a processor sees of a task: a read-only copy taken at claim time.

    `conversations` are the ones still to do (`active`); `processed` the ones already done,
    with the results their checkpoints stored."""

    id: int
    title: str
    description: str | None
    priority: int
    attempts: int
    conversations: tuple[ConversationSnapshot, ...]
    processed: tuple[ProcessedConversation, ...] = ()


class ProcessorContractError(RuntimeError):
    """A processor broke the contract (its failure is the attempt's failure)."""


class ResultTooLarge(ProcessorContractError):
    """A result's JSON is longer than RESULT_MAX_BYTES."""


class ResultNotSerializable(ProcessorContractError):
    """A result that is not JSON PostgreSQL can store."""


class LeaseLost(RuntimeError):
    """This attempt no longer holds the task (its lease ran out and another instance took it,
    the task was handed back at shutdown, or deleted): nothing it writes is recorded."""


# A \u0000 escape in JSON text (not an escaped backslash followed by "u0000"): jsonb refuses it.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def encode_result(value: Any, max_bytes: int) -> str | None:
    """A result as the JSON text stored for it (None stays SQL NULL); raise ResultTooLarge or
    ResultNotSerializable when it can't be stored."""
    if value is None:
        return None
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
        raise ResultNotSerializable(f"the result is not JSON: {exc}") from None
    if _NUL_ESCAPE.search(text):
        raise ResultNotSerializable("the result contains the NUL character (\\u0000)")
    if size > max_bytes:
        raise ResultTooLarge(
            f"the result is {size} bytes of JSON, more than RESULT_MAX_BYTES ({max_bytes})"
        )
    return text


class Context:
    """What a two-argument processor gets besides the task: a way to report as it goes.

    checkpoint(conversation_id, result) is the one verb for now; it is durable when it
    returns. Room is left for more (progress, live output, a cancellation flag, defer)."""

    def __init__(
        self,
        task: TaskSnapshot,
        write_checkpoint: Callable[[int, str | None], bool],
        result_max_bytes: int,
    ) -> None:
        self._task = task
        self._write_checkpoint = write_checkpoint
        self._result_max_bytes = result_max_bytes
        self._ids = frozenset(c.id for c in task.conversations)

    @property
    def task(self) -> TaskSnapshot:
        """The task as claimed (the same snapshot the processor got)."""
        return self._task

    def checkpoint(self, conversation_id: int, result: Any = None) -> bool:
        """Mark one conversation of the snapshot processed with its result, at once (one
        statement, fenced by the lease). True when it is now processed; False when it was
        edited or deleted since the claim (it stays active: its new content is for a later
        run) or was already checkpointed. Raises LeaseLost once the attempt lost the task,
        ValueError for a conversation not in task.conversations, ResultTooLarge or
        ResultNotSerializable for a result that can't be stored."""
        if conversation_id not in self._ids:
            raise ValueError(
                f"conversation {conversation_id} is not one of task {self._task.id}'s "
                "conversations to process"
            )
        encoded = encode_result(result, self._result_max_bytes)
        return self._write_checkpoint(conversation_id, encoded)


# What the worker calls: every processor, whichever form it was written in, as (task, context).
Processor = Callable[[TaskSnapshot, Context], object]


def takes_context(function: Callable[..., object]) -> bool:
    """True when `function` takes a second positional argument (without a default) or *args."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = 0
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if (
            parameter.kind
            in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            and parameter.default is inspect.Parameter.empty
        ):
            positional += 1
    return positional >= 2


def adapt(function: Callable[..., object]) -> Processor:
    """Either form of processor as the two-argument form the worker calls (decided once)."""
    if getattr(function, "_taskapp_adapted", False) or takes_context(function):
        return function

    def one_argument(task: TaskSnapshot, context: Context) -> object:
        return function(task)

    one_argument._taskapp_adapted = True  # type: ignore[attr-defined]
    return one_argument


def simulate_work(
    task: TaskSnapshot, *, min_seconds: float = 6.0, max_seconds: float = 7.0
) -> None:
    """The seed's stand-in for real work: sleep a while, uniformly in [min, max] seconds."""
    if max_seconds > 0:
        time.sleep(random.uniform(min_seconds, max_seconds))


def load_processor(settings: Settings) -> Processor:
    """Resolve TASK_PROCESSOR ('package.module:function') to the function to call."""
    module_name, _, attr = settings.task_processor.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"TASK_PROCESSOR {settings.task_processor!r} cannot be loaded: {exc}"
        ) from exc
    if not callable(function):
        raise ConfigError(f"TASK_PROCESSOR {settings.task_processor!r} is not callable")
    if function is simulate_work:
        low, high = settings.processing_min_seconds, settings.processing_max_seconds
        return adapt(lambda task: simulate_work(task, min_seconds=low, max_seconds=high))
    return adapt(function)
