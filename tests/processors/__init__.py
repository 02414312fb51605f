"""Task processors for tests, selected with TASK_PROCESSOR=tests.processors:NAME."""

from __future__ import annotations

import os
import time

from taskapp.queue import TaskSnapshot


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
    """Sleep TEST_PROCESSOR_SECONDS (default 5): time to kill or pause an instance mid-task."""
    time.sleep(float(os.environ.get("TEST_PROCESSOR_SECONDS", "5")))
