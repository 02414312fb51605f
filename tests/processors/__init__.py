"""Task processors for tests, selected with TASK_PROCESSOR=tests.processors:NAME."""

from __future__ import annotations

import json
import os
import time

from taskapp.processor import Context, TaskSnapshot


class ProcessorError(RuntimeError):
    pass


def always_fail(task: TaskSnapshot) -> None:
    raise ProcessorError(f"task {task.id} cannot be processed")


def fail_first_attempt(task: TaskSnapshot) -> None:
    if task.attempts == 1:
        raise ProcessorError(f"attempt {task.attempts} of task {task.id} failed")


def fail_when_titled_fail(task: TaskSnapshot) -> None:
    if task.title.startswith("fail"):
        raise ProcessorError(f"task {task.id} is titled {task.title!r}")


def slow(task: TaskSnapshot) -> None:
    """Sleep TEST_PROCESSOR_SECONDS (default 5): time to kill or pause an instance mid-task.
    With TEST_PROCESSOR_RECORD, first append the task's id to that file: it has started."""
    if record := os.environ.get("TEST_PROCESSOR_RECORD"):
        with open(record, "a") as file:
            file.write(f"{task.id}\n")
    time.sleep(float(os.environ.get("TEST_PROCESSOR_SECONDS", "5")))


def checkpoint_each(task: TaskSnapshot, context: Context) -> dict[str, int]:
    """Work through the conversations one by one (TEST_PROCESSOR_SECONDS each, default 0.05),
    append each finished id to the file TEST_PROCESSOR_RECORD names, then checkpoint it."""
    seconds = float(os.environ.get("TEST_PROCESSOR_SECONDS", "0.05"))
    record = os.environ["TEST_PROCESSOR_RECORD"]
    for conversation in task.conversations:
        time.sleep(seconds)
        with open(record, "a") as file:
            file.write(f"{conversation.id}\n")
        context.checkpoint(conversation.id, {"length": len(conversation.content)})
    return {"done_now": len(task.conversations), "done_before": len(task.processed)}


def record_contents(task: TaskSnapshot) -> None:
    """Sleep TEST_PROCESSOR_SECONDS (default 1), then append each conversation it saw, as a
    JSON line of id and content, to the file TEST_PROCESSOR_RECORD names."""
    time.sleep(float(os.environ.get("TEST_PROCESSOR_SECONDS", "1")))
    with open(os.environ["TEST_PROCESSOR_RECORD"], "a") as file:
        for conversation in task.conversations:
            file.write(json.dumps({"id": conversation.id, "content": conversation.content}) + "\n")


def break_housekeeper(task: TaskSnapshot) -> None:
    """Make this instance's housekeeper thread end (a task titled "kill") or hang (any other
    title) at its next round, as a bug would: for the liveness probe's tests."""
    import sys
    import threading

    from taskapp import runtime

    instance = runtime.current(sys.modules["wsgi"].app)
    assert instance is not None
    housekeeper = instance.housekeeper

    if task.title == "kill":
        housekeeper._done.set()  # its loop ends, as if the thread had crashed
    else:
        release = threading.Event()
        housekeeper.run_once = release.wait  # type: ignore[assignment]
