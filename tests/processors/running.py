"""Processors for tests/test_running_tasks.py: cancellation, timeouts, deferrals, progress and
live output, seen from inside the processor.

One processor, `by_title`, runs the behaviour its task's title names (the title's first word),
with parameters from the task's description (a JSON object, or empty). Each behaviour records
what it observes as JSON lines in `$TEST_RUNNING_DIR/<task id>.jsonl` (wall-clock times from
time.time(), so the test, on the same machine, can compare them with its own), and waits for
the test where it must, on files the test creates in that directory (`go-<task id>`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from taskapp.processor import Context, Defer, LeaseLost, TaskSnapshot

_lock = threading.Lock()

# How long a processor waits for the test's go-ahead before giving up (a failed test).
GATE_SECONDS = 30.0


def _dir() -> Path:
    return Path(os.environ["TEST_RUNNING_DIR"])


def record(task: TaskSnapshot, kind: str, **data: Any) -> None:
    """Append one observation: {"kind", "at", "attempts", "thread", ...data}."""
    line = {
        "kind": kind,
        "at": time.time(),
        "attempts": task.attempts,
        "thread": threading.current_thread().name,
        **data,
    }
    with _lock, open(_dir() / f"{task.id}.jsonl", "a") as file:
        file.write(json.dumps(line) + "\n")


def records(directory: Path, task_id: int, kind: str | None = None) -> list[dict[str, Any]]:
    """What the processors recorded for a task, oldest first (the test reads them with this)."""
    path = Path(directory) / f"{task_id}.jsonl"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    # A line still being written has no newline yet: not read until it is whole.
    lines = text.split("\n")[:-1]
    found = [json.loads(line) for line in lines]
    return [r for r in found if kind is None or r["kind"] == kind]


def _gate(task: TaskSnapshot, context: Context) -> None:
    """Wait until the test creates go-<task id> (a stream it opened is ready, say)."""
    gate = _dir() / f"go-{task.id}"
    deadline = time.monotonic() + GATE_SECONDS
    while not gate.exists():
        if context.wait(0.02) or time.monotonic() > deadline:
            raise RuntimeError(f"task {task.id}: no go-ahead from the test")


def _params(task: TaskSnapshot) -> dict[str, Any]:
    return json.loads(task.description) if task.description else {}


# -- behaviours -------------------------------------------------------------------------------


def wait_for_cancel(task: TaskSnapshot, context: Context) -> dict[str, str]:
    """Loop on context.wait(0.05) until the flag is set; record when, and why; then try to
    write (each should raise LeaseLost) and return a value that must not be stored."""
    record(task, "started")
    deadline = time.monotonic() + GATE_SECONDS
    while not context.wait(0.05):
        if time.monotonic() > deadline:
            record(task, "never cancelled")
            raise RuntimeError(f"task {task.id}: the flag was never set")
    record(task, "flag", cancelled=context.cancelled, reason=context.cancel_reason)
    writes = {}
    for name, write in (
        ("checkpoint", lambda: context.checkpoint(task.conversations[0].id, {"late": True})),
        ("progress", lambda: context.progress(1, 1, "after the cancel")),
        ("emit", lambda: context.emit(task.conversations[0].id, "after the cancel")),
    ):
        try:
            write()
        except LeaseLost:
            writes[name] = "LeaseLost"
        except Exception as exc:
            writes[name] = type(exc).__name__
        else:
            writes[name] = "written"
    record(task, "returning", writes=writes)
    return {"returned": "after the cancel"}


def ignore_timeout(task: TaskSnapshot, context: Context) -> dict[str, bool]:
    """Sleep `sleep` seconds (default 30) without looking at the flag."""
    record(task, "started")
    time.sleep(float(_params(task).get("sleep", 30)))
    record(task, "returned", cancelled=context.cancelled, reason=context.cancel_reason)
    return {"late": True}


def stop_on_timeout(task: TaskSnapshot, context: Context) -> dict[str, bool]:
    """Wait for the flag (at most 30 s), record it, and return."""
    record(task, "started")
    context.wait(GATE_SECONDS)
    record(task, "flag", cancelled=context.cancelled, reason=context.cancel_reason)
    return {"stopped": True}


def raise_on_timeout(task: TaskSnapshot, context: Context) -> None:
    """Check the flag between short steps with raise_if_cancelled() (Cancelled propagates)."""
    record(task, "started")
    deadline = time.monotonic() + GATE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if context.cancelled:
            record(task, "flag", cancelled=True, reason=context.cancel_reason)
        context.raise_if_cancelled()
    raise RuntimeError(f"task {task.id}: the flag was never set")


def quick(task: TaskSnapshot, context: Context) -> dict[str, bool]:
    """Sleep `sleep` seconds (default 0.5), recording when it starts and ends."""
    record(task, "started")
    time.sleep(float(_params(task).get("sleep", 0.5)))
    record(task, "ended")
    return {"quick": True}


def defer_once(task: TaskSnapshot, context: Context) -> dict[str, int]:
    """On its first run defer for `seconds` (default 3); complete on the next."""
    earlier = records(_dir(), task.id, "run")
    record(task, "run")
    if not earlier:
        seconds = float(_params(task).get("seconds", 3))
        record(task, "defer", seconds=seconds)
        context.defer(seconds, "rate limited")
    return {"runs": len(earlier) + 1}


def always_defer(task: TaskSnapshot, context: Context) -> None:
    """Defer for 0 s, every time (raising Defer itself rather than calling context.defer)."""
    record(task, "run")
    raise Defer(0, "always")


def report_progress(task: TaskSnapshot, context: Context) -> dict[str, int]:
    """After the go-ahead, report progress(i, n, msg) and checkpoint each conversation; then
    wait for the go-ahead `release-<id>` before returning, so the test sees the task while it
    still runs."""
    _gate(task, context)
    total = len(task.conversations)
    for done, conversation in enumerate(task.conversations, 1):
        context.progress(done, total, f"conversation {done} of {total}")
        context.checkpoint(conversation.id, {"n": done})
    record(task, "reported", total=total)
    release = _dir() / f"release-{task.id}"
    deadline = time.monotonic() + GATE_SECONDS
    while not release.exists():
        if context.wait(0.02) or time.monotonic() > deadline:
            raise RuntimeError(f"task {task.id}: never released")
    return {"done": total}


def emit_chunks(task: TaskSnapshot, context: Context) -> dict[str, int]:
    """After the go-ahead, emit `chunks` (default 200) texts f"{i} " for the first conversation
    and one long text (2,500 characters, so three chunks) for the second, if any."""
    _gate(task, context)
    count = int(_params(task).get("chunks", 200))
    first = task.conversations[0].id
    for i in range(count):
        context.emit(first, f"{i} ")
    if len(task.conversations) > 1:
        context.emit(task.conversations[1].id, "".join(chr(ord("a") + n % 26) for n in range(2500)))
    record(task, "emitted", chunks=count)
    return {"chunks": count}


BEHAVIOURS = {
    f.__name__: f
    for f in (
        wait_for_cancel,
        ignore_timeout,
        stop_on_timeout,
        raise_on_timeout,
        quick,
        defer_once,
        always_defer,
        report_progress,
        emit_chunks,
    )
}


def by_title(task: TaskSnapshot, context: Context) -> object:
    """Run the behaviour the task's title names (its first word)."""
    return BEHAVIOURS[task.title.split()[0]](task, context)
