"""The processor's contract: what a processor is given, and how TASK_PROCESSOR is loaded.

A processor is `function(task)` or `function(task, context)` (docs/processors.md). It gets a
read-only TaskSnapshot taken at claim time, with only the conversations not yet done, and runs
outside any database transaction. Returning completes the task, its return value (any JSON,
at most RESULT_MAX_BYTES) stored as the task's `result`; raising fails the attempt (retried
with backoff while attempts remain); raising Defer runs it again later without spending an
attempt. The context checkpoints one conversation at a time (a later attempt does not do it
again), reports progress, streams live output, and carries the cancellation flag (cancel,
timeout, lost lease, end of a shutdown's grace). The built-in processor simulates work.

Which form a function is, is decided once, from its signature, when it is loaded: it gets the
context when it takes a second positional argument without a default (or *args).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

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
    # This task's own time limit per attempt, or None for the TASK_TIMEOUT_SECONDS setting.
    timeout_seconds: int | None = None
    queue: str = "default"
    concurrency_key: str | None = None


class ProcessorContractError(RuntimeError):
    """A processor broke the contract (its failure is the attempt's failure)."""


class ResultTooLarge(ProcessorContractError):
    """A result's JSON is longer than RESULT_MAX_BYTES."""


class ResultNotSerializable(ProcessorContractError):
    """A result that is not JSON PostgreSQL can store."""


class LeaseLost(RuntimeError):
    """This attempt no longer holds the task (it was cancelled or deleted, its lease ran out
    and another instance took it, or it was handed back at shutdown): nothing it writes is
    recorded."""


MAX_DEFER_SECONDS = 7 * 24 * 3600


class Cancelled(RuntimeError):
    """Raised by Context.raise_if_cancelled(): the attempt should stop (see cancel_reason)."""


class Defer(Exception):
    """Raise it to run the task again `after_seconds` from now without spending an attempt
    (the API it calls said 429, say). The deferral is recorded in the task's error history;
    past MAX_DEFERRALS deferrals of one task, a deferral fails the attempt instead."""

    def __init__(self, after_seconds: float, reason: str = "") -> None:
        if not 0 <= after_seconds <= MAX_DEFER_SECONDS:
            raise ValueError(f"Defer: after_seconds must be within 0..{MAX_DEFER_SECONDS}")
        super().__init__(after_seconds, reason)
        self.after_seconds = float(after_seconds)
        self.reason = reason

    # Throttle sets it: the whole key (or queue) waits too, not only this task.
    throttle = False


class Throttle(Defer):
    """Raise it when what the task calls pushes back for everyone sharing its limits (a 429
    with Retry-After for an API key): the task is deferred like Defer, and no task of its
    concurrency key (of its queue, when it has no key) starts anywhere in the cluster until
    after_seconds from now."""

    throttle = True


class CancelReason:
    """Why an attempt's cancellation flag is set (Context.cancel_reason)."""

    CANCELLED = "cancelled"  # POST /tasks/{id}/cancel (or the task was deleted)
    LEASE_LOST = "lease lost"  # another instance took it after this one stalled
    TIMEOUT = "timeout"  # it ran past its timeout_seconds
    SHUTDOWN = "shutdown"  # the instance's shutdown grace ended: it was handed back


# One NOTIFY carries at most 8000 bytes; a chunk of this many characters fits however JSON
# escapes it.
OUTPUT_CHUNK_CHARACTERS = 1000


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


class Writes(Protocol):
    """The fenced writes a Context makes for its attempt (the worker provides them); each
    raises LeaseLost once the attempt no longer holds the task."""

    def checkpoint(self, conversation_id: int, result: str | None) -> bool: ...

    def progress(self, done: int, total: int | None, message: str | None) -> None: ...

    def output(self, conversation_id: int, chunks: list[tuple[int, str]]) -> None: ...


class Context:
    """What a two-argument processor gets besides the task: ways to report as it goes, and
    a cancellation flag to watch.

    Every write is one statement, durable when it returns, and fenced by the attempt's lease:
    once the attempt lost the task (cancelled, deleted, taken over, handed back) each raises
    LeaseLost."""

    def __init__(self, task: TaskSnapshot, writes: Writes, result_max_bytes: int) -> None:
        self._task = task
        self._writes = writes
        self._result_max_bytes = result_max_bytes
        self._ids = frozenset(c.id for c in task.conversations)
        # The flag is the reason; the Event exists only once a processor waits on it: most
        # attempts never do, and at thousands a second an Event apiece cost real CPU.
        self._cancel_reason: str | None = None
        self._cancel_lock = threading.Lock()
        self._cancelled: threading.Event | None = None
        self._output_seq: dict[int, int] = {}

    @property
    def task(self) -> TaskSnapshot:
        """The task as claimed (the same snapshot the processor got)."""
        return self._task

    # -- reporting ----------------------------------------------------------------------------

    def checkpoint(self, conversation_id: int, result: Any = None) -> bool:
        """Mark one conversation of the snapshot processed with its result, at once. True
        when it is now processed; False when it was edited or deleted since the claim (it
        stays active: its new content is for a later run) or was already checkpointed.
        Raises ValueError for a conversation not in task.conversations, ResultTooLarge or
        ResultNotSerializable for a result that can't be stored."""
        self._check_conversation(conversation_id)
        encoded = encode_result(result, self._result_max_bytes)
        return self._writes.checkpoint(conversation_id, encoded)

    def progress(self, done: int, total: int | None = None, message: str | None = None) -> None:
        """Store how far the attempt got (shown on the task as `progress`) and send it as a
        task.progress event. `message` is kept to its first 1,000 characters."""
        if isinstance(done, bool) or not isinstance(done, int) or done < 0:
            raise ValueError("progress: done must be an integer >= 0")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
            raise ValueError("progress: total must be an integer or None")
        if message is not None:
            message = str(message)[:1000].replace("\x00", "")
        self._writes.progress(done, total, message)

    def emit(self, conversation_id: int, text: str) -> None:
        """Send partial output for a conversation (a model's tokens as they arrive) to every
        event stream client of any instance, as conversation.output events numbered from 0
        per conversation. Not stored: a client that connects later does not get it. Long
        text goes out as several chunks."""
        self._check_conversation(conversation_id)
        text = str(text).replace("\x00", "")
        if not text:
            return
        seq = self._output_seq.get(conversation_id, 0)
        chunks = []
        for start in range(0, len(text), OUTPUT_CHUNK_CHARACTERS):
            chunks.append((seq, text[start : start + OUTPUT_CHUNK_CHARACTERS]))
            seq += 1
        self._writes.output(conversation_id, chunks)
        self._output_seq[conversation_id] = seq

    def defer(self, after_seconds: float, reason: str = "") -> NoReturn:
        """Run the task again after_seconds from now, without spending an attempt (raises
        Defer: nothing after this call runs)."""
        raise Defer(after_seconds, reason)

    def throttle(self, after_seconds: float, reason: str = "") -> NoReturn:
        """Defer this task, and hold back every task of its concurrency key (its queue, when
        it has none) across the cluster, for after_seconds (raises Throttle)."""
        raise Throttle(after_seconds, reason)

    # -- cancellation -------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the attempt should stop: the task was cancelled, ran past its timeout,
        lost its lease, or the instance's shutdown grace ended. What the processor returns
        afterwards is not recorded; checkpoints made before are kept."""
        return self._cancel_reason is not None

    @property
    def cancel_reason(self) -> str | None:
        """Why the flag is set (a CancelReason value), or None while it isn't."""
        return self._cancel_reason

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking at once when the flag is set; True if it is."""
        with self._cancel_lock:
            if self._cancelled is None:
                self._cancelled = threading.Event()
                if self._cancel_reason is not None:
                    self._cancelled.set()
            cancelled = self._cancelled
        return cancelled.wait(seconds)

    def raise_if_cancelled(self) -> None:
        """Raise Cancelled when the flag is set (a convenient check between steps)."""
        if self._cancel_reason is not None:
            raise Cancelled(f"task {self._task.id}: {self._cancel_reason}")

    def cancel(self, reason: str) -> None:
        """Set the flag (the worker calls it); the first reason given stays."""
        with self._cancel_lock:
            if self._cancel_reason is not None:
                return
            self._cancel_reason = reason
            cancelled = self._cancelled
        if cancelled is not None:
            cancelled.set()

    def _check_conversation(self, conversation_id: int) -> None:
        if conversation_id not in self._ids:
            raise ValueError(
                f"conversation {conversation_id} is not one of task {self._task.id}'s "
                "conversations to process"
            )


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
    task: TaskSnapshot,
    context: Context | None = None,
    *,
    min_seconds: float = 6.0,
    max_seconds: float = 7.0,
) -> None:
    """The seed's stand-in for real work: sleep a while, uniformly in [min, max] seconds
    (ending early when the context's cancellation flag is set)."""
    if max_seconds <= 0:
        return
    duration = random.uniform(min_seconds, max_seconds)
    if context is None:
        time.sleep(duration)
    else:
        context.wait(duration)


def load_processor(settings: Settings, queue_name: str | None = None) -> Processor:
    """Resolve a queue's processor ('package.module:function': QUEUE_PROCESSORS, else
    TASK_PROCESSOR) to the function to call."""
    spec = settings.task_processor if queue_name is None else settings.processor_for(queue_name)
    setting = "TASK_PROCESSOR" if spec == settings.task_processor else "QUEUE_PROCESSORS"
    module_name, _, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{setting} {spec!r} cannot be loaded: {exc}") from exc
    if not callable(function):
        raise ConfigError(f"{setting} {spec!r} is not callable")
    if function is simulate_work:
        low, high = settings.processing_min_seconds, settings.processing_max_seconds
        return lambda task, context: simulate_work(task, context, min_seconds=low, max_seconds=high)
    return adapt(function)
