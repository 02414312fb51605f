"""Processors for the flow-control tests (tests/test_flow_cluster.py).

Selected with TASK_PROCESSOR=tests.processors.flow:NAME.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from taskapp.processor import Context, TaskSnapshot


def _pause() -> None:
    low = float(os.environ.get("TEST_FLOW_MIN_SECONDS", "0.1"))
    high = float(os.environ.get("TEST_FLOW_MAX_SECONDS", "0.2"))
    time.sleep(random.uniform(low, high))


def sleep_briefly(task: TaskSnapshot) -> dict[str, int]:
    """Sleep between TEST_FLOW_MIN_SECONDS and TEST_FLOW_MAX_SECONDS (0.1 and 0.2)."""
    _pause()
    return {"id": task.id}


def throttle_first(task: TaskSnapshot, context: Context) -> None:
    """A task titled `throttle…` throttles its key for TEST_FLOW_THROTTLE_SECONDS (2) the first
    time it runs (a marker file in TEST_FLOW_DIR remembers it); every other run sleeps
    briefly, as sleep_briefly does."""
    if task.title.startswith("throttle"):
        marker = Path(os.environ["TEST_FLOW_DIR"]) / f"throttled-{task.id}"
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            pass
        else:
            context.throttle(float(os.environ.get("TEST_FLOW_THROTTLE_SECONDS", "2")), "429")
    _pause()
